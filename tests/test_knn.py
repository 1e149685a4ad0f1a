"""kNN graph: exact path against numpy brute force (per-shard and symmetric self-join), the knn view,
self-exclusion, resume, ANN path (l2, PQ and cosine), a kNN actor killed mid-stream."""
from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from featscope.core import catalog
from featscope.core.progress import progress
from featscope.core.rundir import read_json
from featscope.stages import index, knn, vectors
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


# IVF,Flat's own distances are exact; PQ codes are lossy, so those candidates' rows are read from
# the base's scratch file (stages/basefile.py) and their distances recomputed: both must be exact
@pytest.mark.parametrize("factory,min_recall,metric", [("auto", 0.95, "l2"), ("IVF16,PQ8", 0.6, "l2"),
                                                       ("auto", 0.95, "cosine")])
def test_knn_through_ann_index(ray_session, tmp_path, factory, min_recall, metric):
    vecs = clustered(6000, 16, centers=40, seed=4)
    run, ids = make_run(tmp_path / "run", vecs, metrics=(metric,))
    name = "emb" if metric == "l2" else "emb:cosine"
    cfg = config(k=10, index_flat_max=1000, exact_knn_max=1000, shard_size=2048, index_factory=factory)
    index.run(run, cfg, progress)
    knn.run(run, cfg, progress)
    stats = run.read_stats("knn")  # the layer's summary
    assert len(stats) == 1 and stats[0]["method"] == "index"
    assert ("PQ" in stats[0]["index"]) == (factory != "auto")
    nid, dist, qid = as_matrix(knn_table(run, name), 10)
    order = {int(i): p for p, i in enumerate(ids)}
    rows = np.array([order[int(q)] for q in qid])
    pos, want = brute_force(vecs, 10, metric)
    truth = ids[pos[rows]]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nid.tolist(), truth.tolist())])
    assert recall >= min_recall, recall
    assert (nid != qid[:, None]).all()
    # the distances reported are exact even where the neighbour set is approximate
    found = np.array([[order[int(i)] for i in row] for row in nid])
    a, b = vecs[rows][:, None].astype(np.float64), vecs[found].astype(np.float64)
    if metric == "cosine":
        exact = 1 - (a * b).sum(2) / (np.linalg.norm(a, axis=2) * np.linalg.norm(b, axis=2))
    else:
        exact = np.linalg.norm(b - a, axis=2)
    np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-4)
    assert (np.diff(dist, axis=1) >= 0).all()  # ranked nearest first


def symmetric_self_join(vecs, k, metric, blas=None, mixed=False):
    """stages.vectors.self_join_candidates + finish over the whole base, as the stage runs them;
    blas: "torch" or "numpy" computes every tile (default: TileGemm's trials, then its choice);
    mixed: check that both computed tiles (TileGemm's trials ran within this join)."""
    import torch

    x = vectors.prepare(vecs, metric)
    ids = np.arange(len(x), dtype=np.int64)
    base_t = torch.from_numpy(x)
    base_sq = (base_t * base_t).sum(1)
    gemm = vectors.TileGemm(base_t, base_sq, metric, (vectors.SYM_ROWS, vectors.SYM_COLS), numpy_blas=True)
    gemm.chosen = blas
    blocks = [vectors.finish(x[lo:hi], ids[lo:hi], cand, x, ids, k, metric)
              for lo, hi, cand in vectors.self_join_candidates(base_t, base_sq, k + 1, metric, gemm=gemm)]
    if mixed:
        assert all(gemm.seconds.values())
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


@pytest.mark.parametrize("metric,blas", [("l2", None), ("cosine", None), ("l2", "numpy"), ("cosine", "numpy"),
                                         ("l2", "torch")])
def test_symmetric_self_join_equals_brute_force_and_per_shard_path(monkeypatch, metric, blas):
    # small tiles and groups, none dividing N or each other: diagonal squares, partial row blocks and
    # column chunks, both two-stage top-k paths (with their tails) and the plain top-k fallback
    sizes = [("SYM_ROWS", 300), ("SYM_COLS", 470), ("Q_BLOCK", 256), ("B_CHUNK", 390), ("GROUP", 3), ("COL_GROUP", 5)]
    for name, val in sizes:
        monkeypatch.setattr(vectors, name, val)
    rng = np.random.default_rng(5)
    vecs = rng.normal(size=(1337, 12)).astype(np.float32)
    twins = [3, 299, 300, 301, 900, 1336]  # identical vectors across tile edges: ties at distance 0
    vecs[twins] = vecs[3]
    k = 5  # = len(twins) - 1: a twin's neighbours are exactly the other twins
    nid, dist = symmetric_self_join(vecs, k, metric, blas, mixed=blas is None)
    pos, want = brute_force(vecs, k, metric)
    np.testing.assert_allclose(dist, want, rtol=1e-5, atol=1e-5)
    assert (nid != np.arange(len(vecs))[:, None]).all()
    for t in twins:
        assert sorted(nid[t]) == sorted(set(twins) - {t}) and (dist[t] < 1e-3).all()
    # which twins a row near them gets is an exact tie: compare the others
    others = ~np.isin(pos, twins).any(1) & ~np.isin(np.arange(len(vecs)), twins)
    assert (nid[others] == pos[others]).mean() > 0.999  # near-ties aside
    # the per-shard path (exact_candidates per query block): the same distances, the same ids up to the twins' ties
    ids = np.arange(len(vecs), dtype=np.int64)
    x = vectors.prepare(vecs, metric)
    ref_n, ref_d = vectors.exact_search(x, x, ids, k, metric, query_ids=ids)
    np.testing.assert_array_equal(dist, ref_d)
    np.testing.assert_array_equal(nid[others], ref_n[others])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_numpy_tile_scores_equal_torch_and_numpy_float64(metric):
    # the biases folded into numpy's GEMM give torch's symmetric scores, and both the float64 ones
    import torch

    x = vectors.prepare(np.random.default_rng(8).normal(size=(300, 20)).astype(np.float32) * 3, metric)
    t = torch.from_numpy(x)
    sq = (t * t).sum(1)
    got = np.empty((100, 150), np.float32)
    vectors.symmetric_scores_numpy(x, sq.numpy(), 50, 150, 120, 270, metric, got)
    ref = vectors.symmetric_scores(t, sq, 50, 150, 120, 270, metric, torch.empty(100, 150)).numpy()
    a, b = x[50:150].astype(np.float64), x[120:270].astype(np.float64)
    exact = -(a @ b.T) if metric == "cosine" else ((a[:, None, :] - b[None]) ** 2).sum(2)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("slow", ["torch", "numpy"])
def test_tile_gemm_keeps_the_faster_blas(monkeypatch, slow):
    # each BLAS computes GEMM_TRIALS full-size tiles in turn, then the faster one all the rest;
    # tiles of another shape (diagonal squares, the last column chunk) never count
    import time as _time

    import torch

    calls = {"torch": 0, "numpy": 0}
    real = {"torch": vectors.symmetric_scores, "numpy": vectors.symmetric_scores_numpy}

    def counted(name):
        def f(*a):
            if a[3] - a[2] == 40 and a[5] - a[4] == 60:  # full-size tiles (the trials among them)
                calls[name] += 1
                if name == slow:
                    _time.sleep(0.02)
            return real[name](*a)
        return f

    monkeypatch.setattr(vectors, "symmetric_scores", counted("torch"))
    monkeypatch.setattr(vectors, "symmetric_scores_numpy", counted("numpy"))
    x = np.random.default_rng(9).normal(size=(500, 8)).astype(np.float32)
    t = torch.from_numpy(x)
    sq = (t * t).sum(1)
    gemm = vectors.TileGemm(t, sq, "l2", (40, 60), numpy_blas=True)
    blocks = list(vectors.self_join_candidates(t, sq, 4, "l2", rows=40, cols=60, gemm=gemm))
    fast = "numpy" if slow == "torch" else "torch"
    assert gemm.chosen == fast and gemm.name == fast
    full = sum(1 for lo in range(0, 500 - 39, 40) for j in range(lo + 40, 500 - 59, 60))
    assert calls[slow] == vectors.GEMM_TRIALS and calls[fast] == full - vectors.GEMM_TRIALS and full > 30
    ids = np.arange(500, dtype=np.int64)
    dist = np.concatenate([vectors.finish(x[lo:hi], ids[lo:hi], cand, x, ids, 3, "l2")[1] for lo, hi, cand in blocks])
    np.testing.assert_allclose(dist, brute_force(x, 3, "l2")[1], rtol=1e-5, atol=1e-5)  # whichever BLAS


def test_symmetric_self_join_of_a_tiny_base():
    # k = N - 1, as the stage clamps it: every row's neighbours are all the others
    nid, dist = symmetric_self_join(np.random.default_rng(6).normal(size=(4, 3)).astype(np.float32), 3, "l2")
    assert [sorted(r) for r in nid.tolist()] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert np.isfinite(dist).all() and (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_stage_symmetric_path_and_partial_resume_agree(ray_session, tmp_path, metric):
    # N > Q_BLOCK and not a multiple of it: three row blocks, shards that straddle them
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(4500, 16)).astype(np.float32)
    vecs[[10, 2100, 4499]] = vecs[10]
    run, ids = make_run(tmp_path / "run", vecs, metrics=(metric,))
    name = "emb" if metric == "l2" else "emb:cosine"
    cfg = config(k=6, shard_size=1000)
    knn.run(run, cfg, progress)
    layer_stats = read_json(run.p("stats", "knn", name.replace(":", "@") + ".json"))
    assert layer_stats["path"] == "symmetric" and layer_stats["redone"] == 5
    # no full-size tile at this N: torch computed them; numpy was a candidate all the same, i.e. the
    # actor started with NUMPY_BLAS_ENV in its environment (its runtime_env)
    shard = read_json(run.stats_path(f"knn/{name.replace(':', '@')}", 0))
    assert layer_stats["gemm"] == shard["gemm"] == "torch" and set(shard["gemm_trials"]) == {"torch", "numpy"}
    first = knn_table(run, name)
    nid, dist, qid = as_matrix(first, 6)
    order = {int(i): p for p, i in enumerate(ids)}
    rows = np.array([order[int(q)] for q in qid])
    pos, want = brute_force(vecs, 6, metric)
    np.testing.assert_allclose(dist, want[rows], rtol=1e-4, atol=1e-4)
    assert (nid == ids[pos[rows]]).mean() > 0.999
    assert (nid != qid[:, None]).all()
    # some shards missing: the per-shard path redoes them, and they come out the same
    stats = tmp_path / "run" / "stats" / "knn" / name.replace(":", "@")
    for i in (1, 4):
        (stats / f"part-0000{i}.json").unlink()
    (tmp_path / "run" / "knn" / name.replace(":", "@") / "part-00001.parquet").unlink()
    res = knn.run(run, cfg, progress)
    assert res["redone"] == 2
    layer_stats = read_json(run.p("stats", "knn", name.replace(":", "@") + ".json"))
    assert layer_stats["path"] == "per-shard"
    again = knn_table(run, name)
    for col in ("query_id", "rank", "neighbor_id", "distance"):
        np.testing.assert_array_equal(again[col].to_numpy(), first[col].to_numpy())


def test_knn_actor_killed_mid_stream_is_retried_with_the_same_output(ray_session, tmp_path):
    """The symmetric self-join streams its shards from one actor (a Ray streaming generator): a
    kill between two yields must end in the same files as an uninterrupted run, not in a hang or
    a stage that stops short (Ray re-runs the generator; shard writes are idempotent)."""
    import threading

    import psutil

    vecs = np.random.default_rng(11).normal(size=(24000, 64)).astype(np.float32)
    cfg = config(k=5, shard_size=1000)
    ref, _ = make_run(tmp_path / "ref", vecs)
    knn.run(ref, cfg, progress)
    run, _ = make_run(tmp_path / "run", vecs)
    stats = tmp_path / "run" / "stats" / "knn" / "emb"
    killed: list[tuple[int, int]] = []

    def kill_the_actor_after_its_first_shard():
        deadline = time.monotonic() + 300  # a liveness guard, not a timing assertion
        while not (stats.exists() and any(stats.iterdir())):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        for p in psutil.process_iter(["cmdline"]):
            if any("KnnWorker" in c for c in p.info["cmdline"] or []):
                p.kill()
                killed.append((p.pid, len(list(stats.iterdir()))))
                return

    killer = threading.Thread(target=kill_the_actor_after_its_first_shard, daemon=True)
    killer.start()
    res = knn.run(run, cfg, progress)
    killer.join(timeout=60)
    assert killed and killed[0][1] < 24, "the actor must die in the middle of the stream"
    assert res["shards"] == 24 and res["rows"] == 24000 * 5
    assert read_json(run.p("stats", "knn", "emb.json"))["path"] == "symmetric"
    again, first = knn_table(run), knn_table(ref)
    for col in ("query_id", "rank", "neighbor_id", "distance"):
        np.testing.assert_array_equal(again[col].to_numpy(), first[col].to_numpy())
