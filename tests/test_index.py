"""Index stage: the autofaiss-style choice, ANN recall written to the json, plain read_index, resume."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from featscope.core.progress import progress
from featscope.stages import index
from tests.synthetic_runs import brute_force, clustered, config, make_run


def test_choice_follows_size_and_memory():
    cfg = config()
    assert index.choose_factory(50_000, 512, cfg) == "Flat"
    assert index.choose_factory(500_000, 512, cfg) == "IVF1024,Flat"
    assert index.choose_factory(5_000, 64, config(index_flat_max=1000)).startswith("HNSW")
    assert ",PQ" in index.choose_factory(5_000_000, 512, config(index_memory_gb=1))
    assert index.choose_factory(10, 4, config(index_factory="HNSW16")) == "HNSW16"


@pytest.mark.parametrize("flat_max,kind", [(1000, "IVF"), (5000, "HNSW")])
def test_ann_recall_at_10(tmp_path, flat_max, kind):
    n = 12_000 if kind == "IVF" else 6_000
    vecs = clustered(n, 32, centers=60, seed=5)
    run, ids = make_run(tmp_path / "run", vecs)
    res = index.run(run, config(index_flat_max=flat_max), progress)
    info = json.loads((tmp_path / "run" / "index" / "emb.json").read_text())
    assert info["factory"].startswith(kind) and info["metric"] == "l2" and "array_distance" in info["distance"]
    assert info["recall_at_k"] >= 0.95 and info["k"] == 10 and info["held_out"]
    assert res["min_recall_at_k"] == info["recall_at_k"] and info["n"] == n
    # checked independently: plain read_index, numpy brute force, 300 queries
    ix = faiss.read_index(str(tmp_path / "run" / "index" / "emb.faiss"))
    assert ix.ntotal == n
    q = np.arange(0, n, n // 300)
    _, found = ix.search(vecs[q], 11)
    pos, _ = brute_force(vecs, 10, "l2", rows=q)
    truth = ids[pos]
    recall = np.mean([len(set(f[f != ids[i]][:10]) & set(t)) / 10 for i, f, t in zip(q, found, truth)])
    assert recall >= 0.93


def test_flat_cosine_returns_image_ids_and_resumes(tmp_path):
    vecs = clustered(800, 12, seed=6)
    run, ids = make_run(tmp_path / "run", vecs, metrics=("l2", "cosine"))
    assert index.run(run, config(), progress)["redone"] == 2
    info = json.loads((tmp_path / "run" / "index" / "emb@cosine.json").read_text())
    assert info["factory"] == "Flat" and info["metric"] == "cosine" and info["recall_at_k"] == 1.0
    ix = faiss.read_index(str(tmp_path / "run" / "index" / "emb@cosine.faiss"))
    x = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sim, found = ix.search(x[:5], 1)
    assert list(found[:, 0]) == list(ids[:5]) and np.allclose(sim[:, 0], 1, atol=1e-5)
    assert index.run(run, config(), progress)["redone"] == 0
    assert index.run(run, config(index_factory="HNSW16"), progress)["redone"] == 2
    assert json.loads((tmp_path / "run" / "index" / "emb.json").read_text())["factory"] == "HNSW16"


def test_bad_factory_is_a_user_error(tmp_path):
    from featscope.core.config import UserError

    run, _ = make_run(tmp_path / "run", clustered(300, 8, seed=7))
    with pytest.raises(UserError):
        index.run(run, config(index_factory="NotAnIndex12"), progress)
