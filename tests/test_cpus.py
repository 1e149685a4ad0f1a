"""featscope/core/cpus.py: the cores a process may use, affinity capped by a cgroup CPU quota
(what Ray's own count reads), on fake cgroup trees of both versions."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from featscope.core import cpus

AFFINITY = len(os.sched_getaffinity(0))


def _tree(tmp_path, files: dict, proc: str):
    for rel, text in files.items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return str(tmp_path / "cg"), str(tmp_path / "cgroup")


def test_v2_quota_of_own_cgroup_and_the_smallest_of_its_ancestors(tmp_path):
    root, proc = _tree(tmp_path, {"cpu.max": "max 100000\n", "a/cpu.max": "300000 100000\n",
                                  "a/b/cpu.max": "max 100000\n"}, "0::/a/b\n")
    assert cpus.cgroup_quota(root, proc) == 3.0
    root, proc = _tree(tmp_path, {"a/b/cpu.max": "50000 100000\n"}, "0::/a/b\n")
    assert cpus.cgroup_quota(root, proc) == 0.5
    assert cpus.usable_cpus(root, proc) == 1  # a fraction of a core is one thread


def test_v1_quota(tmp_path):
    root, proc = _tree(tmp_path, {"cpu/docker/x/cpu.cfs_quota_us": "150000\n",
                                  "cpu/docker/x/cpu.cfs_period_us": "100000\n",
                                  "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
                       "4:cpu,cpuacct:/docker/x\n3:memory:/docker/x\n")
    assert cpus.cgroup_quota(root, proc) == 1.5
    assert cpus.usable_cpus(root, proc) == min(AFFINITY, 2)


def test_container_view_reads_the_root(tmp_path):
    # in a container's namespace /proc/self/cgroup says "/", and the quota sits at the root
    root, proc = _tree(tmp_path, {"cpu.max": "100000 100000\n"}, "0::/\n")
    assert cpus.usable_cpus(root, proc) == 1


@pytest.mark.parametrize("files", [{}, {"cpu.max": "max 100000\n"}, {"cpu.max": "garbage\n"},
                                   {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}])
def test_no_quota_is_the_affinity(tmp_path, files):
    root, proc = _tree(tmp_path, files, "0::/\n")
    assert cpus.cgroup_quota(root, proc) is None
    assert cpus.usable_cpus(root, proc) == AFFINITY


def test_a_quota_above_the_affinity_does_not_raise_it(tmp_path):
    root, proc = _tree(tmp_path, {"cpu.max": f"{(AFFINITY + 8) * 100000} 100000\n"}, "0::/\n")
    assert cpus.usable_cpus(root, proc) == AFFINITY


@pytest.mark.skipif(AFFINITY < 2 or not hasattr(os, "sched_setaffinity"), reason="needs two cores")
def test_affinity_narrowed_with_taskset_like_call():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from featscope.core.cpus import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_extract_without_ray_takes_the_quota_not_the_affinity(monkeypatch):
    from featscope.stages import extract

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a run that never started Ray
    monkeypatch.setattr(cpus, "cgroup_quota", lambda *a, **k: 1.0)
    resources, nodes = extract._resources()
    assert resources == {"CPU": 1.0} and nodes[0]["Resources"]["CPU"] == 1.0
