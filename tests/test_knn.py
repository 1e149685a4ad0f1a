"""kNN graph: exact path against numpy brute force, the knn view, self-exclusion, resume, ANN path."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from featscope.core import catalog
from featscope.core.progress import progress
from featscope.stages import index, knn
from tests.synthetic_runs import brute_force, clustered, config, make_run


def knn_table(run, layer="emb"):
    t = pq.read_table(run.parquet_files("knn", layer.replace(":", "@"))).to_pandas()
    return t.sort_values(["query_id", "rank"])


def as_matrix(t, k):
    n = len(t) // k
    return t["neighbor_id"].to_numpy().reshape(n, k), t["distance"].to_numpy().reshape(n, k), \
        t["query_id"].to_numpy().reshape(n, k)[:, 0]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_knn_equals_brute_force(ray_session, tmp_path, metric):
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(1300, 24)).astype(np.float32)  # continuous values: no ties
    run, ids = make_run(tmp_path / "run", vecs, metrics=(metric,))
    cfg = config(k=7, shard_size=500)
    res = knn.run(run, cfg, progress)
    assert res["shards"] == 3 and res["redone"] == 3
    name = "emb" if metric == "l2" else "emb:cosine"
    nid, dist, qid = as_matrix(knn_table(run, name), 7)
    pos, want = brute_force(vecs, 7, metric)
    order = {int(i): p for p, i in enumerate(ids)}
    rows = np.array([order[int(q)] for q in qid])
    assert sorted(qid) == sorted(ids)  # every image once, the perturbed rows never as queries
    np.testing.assert_allclose(dist, want[rows], rtol=1e-4, atol=1e-4)
    assert (nid == ids[pos[rows]]).mean() > 0.999  # ties aside


def test_knn_view_has_k_rows_per_image_and_never_self(ray_session, tmp_path):
    vecs = clustered(900, 16, seed=2)
    vecs[100:110] = vecs[0]  # eleven identical vectors: self ties with ten twins at distance 0
    run, ids = make_run(tmp_path / "run", vecs)
    knn.run(run, config(k=5, shard_size=256), progress)
    catalog.write_catalog(run)
    con = catalog.connect(run.path)
    per = con.sql("SELECT query_id, count(*) n, count(DISTINCT rank) r, min(rank) lo, max(rank) hi, "
                  "sum((query_id = neighbor_id)::INT) self FROM knn GROUP BY 1").fetchall()
    assert len(per) == 900
    assert {(n, r, lo, hi, s) for _, n, r, lo, hi, s in per} == {(5, 5, 1, 5, 0)}
    twins = con.sql(f"SELECT neighbor_id, distance FROM knn WHERE query_id = {ids[0]} ORDER BY rank").fetchall()
    assert all(d == 0 for _, d in twins) and {n for n, _ in twins} <= set(ids[100:110].tolist())
    ordered = con.sql("SELECT count(*) FROM (SELECT query_id, distance, lag(distance) OVER "
                      "(PARTITION BY query_id ORDER BY rank) prev FROM knn) WHERE distance < prev").fetchall()[0][0]
    assert ordered == 0


def test_resume_skips_finished_shards_and_redoes_on_new_k(ray_session, tmp_path):
    run, _ = make_run(tmp_path / "run", clustered(600, 8, seed=3))
    assert knn.run(run, config(k=4, shard_size=200), progress)["redone"] == 3
    first = [p.stat().st_mtime_ns for p in sorted((tmp_path / "run" / "knn" / "emb").iterdir())]
    assert knn.run(run, config(k=4, shard_size=200), progress)["redone"] == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "run" / "knn" / "emb").iterdir())] == first
    (tmp_path / "run" / "stats" / "knn" / "emb" / "part-00001.json").unlink()  # an unfinished shard
    assert knn.run(run, config(k=4, shard_size=200), progress)["redone"] == 1
    res = knn.run(run, config(k=6, shard_size=200), progress)
    assert res["redone"] == 3 and res["rows"] == 600 * 6
    assert len(knn_table(run)) == 600 * 6


def test_knn_through_ann_index(ray_session, tmp_path):
    vecs = clustered(6000, 16, centers=40, seed=4)
    run, ids = make_run(tmp_path / "run", vecs)
    cfg = config(k=10, index_flat_max=1000, exact_knn_max=1000, shard_size=2048)
    index.run(run, cfg, progress)
    knn.run(run, cfg, progress)
    assert run.read_stats("knn")[0]["method"] == "index"
    nid, dist, qid = as_matrix(knn_table(run), 10)
    order = {int(i): p for p, i in enumerate(ids)}
    rows = np.array([order[int(q)] for q in qid])
    pos, want = brute_force(vecs, 10, "l2")
    truth = ids[pos[rows]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nid.tolist(), truth.tolist())])
    assert recall >= 0.95
    assert (nid != qid[:, None]).all()
    # the distances reported are exact even where the neighbour set is approximate
    found = np.array([[order[int(i)] for i in row] for row in nid])
    exact = np.linalg.norm(vecs[found].astype(np.float64) - vecs[rows][:, None].astype(np.float64), axis=2)
    np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-4)
