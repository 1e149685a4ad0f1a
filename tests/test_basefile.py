"""The base set's scratch copy (stages/basefile.py): the same vectors as load_base, nothing left on
disk, pages read through the map dropped by release(), random rows read without mapping them, a
full disk as one clear error."""
from __future__ import annotations

import os

import numpy as np
import pytest

from featscope.core.config import UserError
from featscope.stages.basefile import BaseFile
from featscope.stages.vectors import exact_search, load_base
from tests.synthetic_runs import brute_force, clustered, make_run


def _mapped_kb(marker: str) -> dict:
    """Size and Rss (kB) of this process's mappings whose file name contains marker (/proc/self/smaps)."""
    out, current = {"Size": 0, "Rss": 0}, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line: address perms offset dev inode [path]
                current = marker in line
            elif current and head[0].rstrip(":") in out:
                out[head[0].rstrip(":")] += int(head[1])
    return out


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_scratch_copy_holds_load_bases_vectors_and_leaves_no_file(tmp_path, metric):
    vecs = clustered(3000, 24, seed=3)
    run, _ = make_run(tmp_path / "run", vecs, files=4)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    base = BaseFile.write(run, "emb", metric, str(scratch))
    ids, ram = load_base(run, "emb", metric)
    assert np.array_equal(base.ids, ids) and base.rows.dtype == np.float32
    assert np.array_equal(base.rows, ram)  # bit for bit: twins and kNN compare distances against these rows
    assert os.listdir(scratch) == []  # unlinked at once: a killed actor leaves nothing
    base.close()


def test_release_drops_the_pages_read_and_search_is_unchanged(tmp_path):
    vecs = clustered(20000, 64, seed=4)  # 5 MB mapped
    run, _ = make_run(tmp_path / "run", vecs, files=2, perturbed=0)
    base = BaseFile.write(run, "emb", "l2", str(tmp_path))
    assert _mapped_kb("featscope-base-")["Size"] >= 20000 * 64 * 4 // 1024
    float(base.rows.sum())  # touch every page
    assert _mapped_kb("featscope-base-")["Rss"] >= 20000 * 64 * 4 // 1024 * 0.9
    base.release()
    assert _mapped_kb("featscope-base-")["Rss"] == 0
    # random rows by pread: the rows asked for, and nothing of the file mapped into the process
    pos = np.random.default_rng(0).integers(0, 20000, (300, 7))
    assert np.array_equal(base.gather(pos), vecs[pos])
    assert _mapped_kb("featscope-base-")["Rss"] == 0
    # the exact search over the map, released per chunk, finds what numpy's brute force finds
    nid, dist = exact_search(vecs[:50], base.rows, base.ids, 5, "l2", query_ids=base.ids[:50], release=base.release,
                             gather=base.gather)
    assert _mapped_kb("featscope-base-")["Rss"] == 0
    want_pos, want_d = brute_force(vecs, 5, "l2", rows=np.arange(50))
    assert np.array_equal(nid, base.ids[want_pos]) and np.allclose(dist, want_d, rtol=1e-5)
    base.close()


def test_a_scratch_dir_that_cannot_take_the_copy_is_one_user_error(tmp_path):
    run, _ = make_run(tmp_path / "run", clustered(100, 8, seed=5))
    with pytest.raises(UserError, match="TMPDIR") as err:
        BaseFile.write(run, "emb", "l2", str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
