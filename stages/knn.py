"""kNN graph: every image's k nearest neighbours (own id excluded) per index layer
-> `knn/<layer>/part-NNNNN.parquet` (layer, query_id, rank, neighbor_id, distance).

Exact (blocked torch matmul + top-k, see stages/vectors.py) up to `exact_knn_max` vectors,
through the layer's FAISS index beyond; either way the distances are exact, in the index
json's metric: recomputed from the vectors, or, for IVF,Flat, FAISS's own (computed on the raw
vectors, within ~1 ulp of a recomputation). A row the index leaves short of k neighbours
is redone exactly.

Exact, two paths with the same results (ids up to exact ties, same distances): when one actor
does every shard of the layer (one node, no partial resume) it runs the symmetric self-join
(`KnnWorker.self_join`: half the matmul of a brute-force join, each shard written as soon as
its rows are final, the shards streamed back to the driver); otherwise each shard is its own
task against the whole base (`KnnWorker.shard`). On the 2-core dev machine the symmetric path
measured faster than FAISS `IndexFlatL2.search` (benchmarks/RESULTS.md, `## knn`).

Ray: one worker actor per node (per GPU when there is one). Exact: the base vectors are
`ray.put` once per layer and each actor reads them zero-copy from the object store (the join
reads the whole base for every query block). ANN: each actor reads the index file and writes
its own scratch copy of the base from the run directory (`basefile.BaseFile`), read through a
memory map whose pages are dropped after each query block, so memory does not grow with N
beyond the index itself (benchmarks/RESULTS.md, `## knn`). Each actor
owns all its node's cores (one process running torch on 2 threads measured the same as two
single-threaded ones, and holds one copy of an ANN index instead of two). The unit of work and
of resume is a block of `shard_size` consecutive queries; its stats file
(`stats/knn/<layer>/part-NNNNN.json`, written last) records k, the method and the base and
index signatures, and a shard whose record no longer matches is redone.
"""
from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pyarrow as pa

from featscope.core.config import UserError
from featscope.core.rundir import layer_dir, local_file, read_json, remove, RunDir, shard_name, write_json_atomic, write_table_atomic

from .basefile import BaseFile
from .vectors import (NUMPY_BLAS_ENV, base_signature, count_orig, exact_candidates, feature_files, finish, load_base,
                      score_buffer, squared_norms)

KNN_SCHEMA = pa.schema([("layer", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                        ("neighbor_id", pa.int64()), ("distance", pa.float32())])


class KnnWorker:
    """Holds one layer's base (exact: zero-copy from the object store; ANN: its own scratch copy,
    `basefile.BaseFile`) and, for ANN, its index."""

    def __init__(self, run_path: str, layer: str, ids: np.ndarray | None, base: np.ndarray | None,
                 index_path: str | None, metric: str, k: int, threads: int, device: str, features: str | None = None):
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        threadpool_limits(threads, user_api="blas")  # numpy's BLAS too (the self-join may use it: TileGemm)
        self.run, self.layer, self.metric, self.k, self.device = RunDir(run_path), layer, metric, k, device
        self.release, self.gather = (lambda: None), None
        if base is None:  # ANN: the base streamed from this process's own scratch copy (basefile.py)
            scratch = BaseFile.write(self.run, features, metric)
            ids, base, self.release, self.gather = scratch.ids, scratch.rows, scratch.release, scratch.gather
        self.ids, self.base = ids, base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the store's arrays are read-only; torch only reads them
            self.base_t = torch.from_numpy(base).to(device)
        # ||b||^2 for the exact search; on the ANN path only when a short row needs it (_exact)
        self.base_sq = squared_norms(self.base_t) if metric == "l2" and index_path is None else None
        self.buf = score_buffer(device)
        self.index = None
        if index_path is not None:
            import faiss

            faiss.omp_set_num_threads(threads)
            with local_file(index_path) as path:  # a download when the run is on object storage
                self.index = faiss.read_index(path)
            self.order = np.argsort(ids, kind="stable")  # image id -> base position
            self.sorted_ids = ids[self.order]
            # IVF,Flat scores the raw vectors: its distances are exact (within ~1 ulp of a recomputation)
            # and no candidate row need be read; PQ codes are lossy: their rows are read from the base
            self.codes_exact = isinstance(faiss.downcast_index(self.index), faiss.IndexIVFFlat)

    def _exact(self, q: np.ndarray, qids: np.ndarray):
        import torch

        if self.metric == "l2" and self.base_sq is None:
            self.base_sq = squared_norms(self.base_t, self.release)
        cand = exact_candidates(torch.from_numpy(q).to(self.device), self.base_t, self.base_sq, self.k + 1,
                                self.metric, self.buf, self.release)
        out = finish(q, qids, cand, self.base, self.ids, self.k, self.metric, self.gather)
        self.release()
        return out

    def _ann(self, q: np.ndarray, qids: np.ndarray):
        scores, found = self.index.search(q, self.k + 1)
        exact = None
        if self.codes_exact:  # FAISS's squared L2 / inner product -> the shared convention
            exact = np.sqrt(np.maximum(scores, 0)) if self.metric == "l2" else 1.0 - scores
        pos = self.order[np.clip(np.searchsorted(self.sorted_ids, found), 0, len(self.ids) - 1)]
        pos = np.where((found >= 0) & (self.ids[pos] == found), pos, -1)
        nid, dist = finish(q, qids, pos, self.base, self.ids, self.k, self.metric, self.gather, exact)
        self.release()  # the queries' rows read through the map
        short = ~np.isfinite(dist).all(axis=1)
        if short.any():
            nid[short], dist[short] = self._exact(q[short], qids[short])
        return nid, dist

    def shard(self, index: int, lo: int, hi: int, record: dict) -> dict:
        from .vectors import Q_BLOCK

        start = time.perf_counter()
        parts = []
        for a in range(lo, hi, Q_BLOCK):
            b = min(hi, a + Q_BLOCK)
            q, qids = np.array(self.base[a:b]), self.ids[a:b]  # a copy: the map's pages are dropped per block
            parts.append(self._ann(q, qids) if self.index is not None else self._exact(q, qids))
        nid, dist = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return self._write(index, lo, nid, dist, record, start)

    def self_join(self, shards: list, record: dict):
        """Every shard of the layer by the symmetric exact self-join (half the matmul, see
        `vectors.self_join_candidates`); a shard is written as soon as its rows are final.
        Yields each shard's stats (a Ray streaming generator: the driver's progress moves)."""
        from .vectors import SYM_COLS, SYM_ROWS, TileGemm, self_join_candidates

        n = len(self.ids)
        nid, dist = np.empty((n, self.k), np.int64), np.empty((n, self.k), np.float32)
        pending = sorted(shards, key=lambda s: s[1])
        start = time.perf_counter()
        gemm = TileGemm(self.base_t, self.base_sq, self.metric, (SYM_ROWS, SYM_COLS))
        for lo, hi, cand in self_join_candidates(self.base_t, self.base_sq, self.k + 1, self.metric, gemm=gemm):
            nid[lo:hi], dist[lo:hi] = finish(self.base[lo:hi], self.ids[lo:hi], cand, self.base, self.ids,
                                             self.k, self.metric)
            while pending and pending[0][2] <= hi:
                index, slo, shi = pending.pop(0)
                # which BLAS computes the tiles now, and what its trials measured (seconds per tile)
                extra = {"gemm": gemm.name, "gemm_trials": {n: [round(t, 4) for t in v] for n, v in gemm.seconds.items()}}
                yield self._write(index, slo, nid[slo:shi], dist[slo:shi], record, start, extra)
                start = time.perf_counter()

    def _write(self, index: int, lo: int, nid: np.ndarray, dist: np.ndarray, record: dict, start: float,
               extra: dict | None = None) -> dict:
        m, k = nid.shape
        table = pa.table({"layer": pa.array([self.layer] * (m * k), pa.string()),
                          "query_id": pa.array(np.repeat(self.ids[lo:lo + m], k)),
                          "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), m)),
                          "neighbor_id": pa.array(nid.ravel()), "distance": pa.array(dist.ravel())}, schema=KNN_SCHEMA)
        write_table_atomic(self.run.p("knn", layer_dir(self.layer), shard_name(index) + ".parquet"), table)
        stats = {**record, "shard": index, "rows": m * k, "queries": m,
                 "seconds": round(time.perf_counter() - start, 3), **(extra or {})}
        self.run.write_stats(f"knn/{layer_dir(self.layer)}", index, stats)  # last: the shard is complete
        return stats


def _workers(cfg, method: str, n_jobs: int) -> tuple[int, dict, int, str]:
    """(actors, Ray resources per actor, torch/FAISS threads, device)."""
    import ray

    # the cluster's GPUs, not the driver's: a head without a GPU still gets GPU workers
    gpus = int(ray.cluster_resources().get("GPU", 0)) if cfg.device != "cpu" else 0
    if gpus and method == "exact":
        return min(gpus, n_jobs), {"num_gpus": 1, "num_cpus": 1}, 1, "cuda"
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    per_node = int(min(n["Resources"]["CPU"] for n in nodes)) if nodes else 1
    return max(1, min(len(nodes) or 1, n_jobs)), {"num_cpus": per_node}, per_node, "cpu"


def _index_info(run_dir: RunDir, name: str) -> dict | None:
    return read_json(run_dir.p("index", layer_dir(name) + ".json"))


def _plan(cfg, name: str, n: int, sig: str, info: dict | None) -> tuple[dict, list]:
    """What a finished shard must record for this run, and the shards: (index, first, end) query rows."""
    exact = n <= cfg.exact_knn_max or (info is not None and info.get("factory") == "Flat")
    if not exact and (info is None or info.get("base") != sig):
        raise UserError(f"layer '{name}' has {n} vectors (> exact_knn_max={cfg.exact_knn_max}) and no current "
                        f"index: run the index stage first")
    record = {"layer": name, "k": min(cfg.k, n - 1), "method": "exact" if exact else "index", "base": sig,
              "index": None if exact else info["factory"] + "|" + json.dumps(info.get("search_params"), sort_keys=True)}
    size = max(1, cfg.shard_size)
    return record, [(i, lo, min(n, lo + size)) for i, lo in enumerate(range(0, n, size))]


def knn_layer(run_dir: RunDir, cfg, entry: dict, progress) -> dict:
    import ray

    name, metric = entry["name"], entry["metric"]
    stage = f"knn/{layer_dir(name)}"
    sig = base_signature(run_dir, entry["features"], metric)
    info = _index_info(run_dir, name)
    summary_path = run_dir.p("stats", "knn", layer_dir(name) + ".json")

    def current(record: dict, i: int) -> bool:
        if not run_dir.shard_done(stage, i):
            return False
        old = read_json(run_dir.stats_path(stage, i)) or {}
        return all(old.get(key) == val for key, val in record.items())

    # resume without reading the vectors when the layer's summary and every shard still match
    old = read_json(summary_path)
    if old and old.get("base") == sig:
        record, shards = _plan(cfg, name, old["queries"], sig, info)
        if all(current(record, i) for i, _, _ in shards):
            return {**old, "redone": 0}
    n = sum(count_orig(feature_files(run_dir, entry["features"])))
    if n == 0:
        raise UserError(f"layer '{entry['features']}' has no vectors with view 'orig' in {run_dir.root}")
    record, shards = _plan(cfg, name, n, sig, info)
    k, exact = record["k"], record["method"] == "exact"
    todo = [s for s in shards if not current(record, s[0])]
    # shards of an earlier, larger base would otherwise stay visible in the knn view
    for f in run_dir.parquet_files("knn", layer_dir(name))[len(shards):]:
        remove(f)
    t0 = time.perf_counter()
    path = None  # what computed the shards redone now: symmetric (one actor, all shards) or per-shard
    if todo and k > 0:
        n_actors, resources, threads, device = _workers(cfg, record["method"], len(todo))
        # each actor reads the index file itself (the run directory is shared, as for every stage):
        # no serialised copy in the driver or the object store
        index_path = None if exact else run_dir.p("index", layer_dir(name) + ".faiss")
        if exact:  # the exact join reads the whole base per query block: in RAM, put once, mapped by every actor
            ids, base = load_base(run_dir, entry["features"], metric)
            ids_ref, base_ref = ray.put(ids), ray.put(base)
            del ids, base
        else:  # ANN: each actor streams its own scratch copy (N x d never held beside the index)
            ids_ref = base_ref = None
        # a worker killed mid-shard is restarted and the shard retried; shard writes are idempotent
        # the environment numpy's BLAS needs to be a candidate for the self-join's tiles (read when
        # numpy loads: set for the actor's process from its start; merged with a job's runtime_env)
        env = {"runtime_env": {"env_vars": NUMPY_BLAS_ENV}} if exact and device == "cpu" else {}
        cls = ray.remote(max_restarts=-1, max_task_retries=-1, **resources, **env)(KnnWorker)
        actors = [cls.remote(run_dir.path, name, ids_ref, base_ref, index_path, metric, k, threads, device,
                             entry["features"]) for _ in range(n_actors)]
        # the self-join computes each pair once for both its sides: only when one actor holds both
        # sides of every pair, i.e. does every shard; several actors or a partial resume go per shard
        path = "symmetric" if exact and n_actors == 1 and len(todo) == len(shards) else "per-shard"
        if path == "symmetric":
            stream = actors[0].self_join.options(num_returns="streaming").remote(todo, record)
            done = (ray.get(ref) for ref in stream)
        else:
            done = [actors[j % n_actors].shard.remote(i, lo, hi, record) for j, (i, lo, hi) in enumerate(todo)]
        try:
            for _ in progress(done, f"knn {name}", len(shards) - len(todo), len(shards)):
                pass
        finally:
            for a in actors:
                ray.kill(a)
    stats = [read_json(run_dir.stats_path(stage, i)) for i, _, _ in shards] if k > 0 else []
    out = {**record, "shards": len(shards), "redone": len(todo), "rows": sum(s["rows"] for s in stats),
           "queries": n, "seconds": round(sum(s["seconds"] for s in stats), 3), "path": path,
           "gemm": stats[-1].get("gemm") if path == "symmetric" else None,  # the self-join's BLAS (TileGemm)
           "wall_seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(summary_path, out)
    return out


def run(run_dir: RunDir, cfg, progress) -> dict:
    entries = run_dir.read_meta().get("index_layers", [])
    res = [knn_layer(run_dir, cfg, e, progress) for e in entries]
    return {"layers": len(res), "k": cfg.k, "shards": sum(r["shards"] for r in res),
            "redone": sum(r["redone"] for r in res), "rows": sum(r["rows"] for r in res),
            "seconds": round(sum(r["seconds"] for r in res), 3)}
