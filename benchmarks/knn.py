"""kNN benchmark, one script, all figures from the same machine and run.

1. Exact self-join of N = 100,000 synthetic vectors of dim 512, k = 10: our kNN stage (the
   real stage: Parquet features in, Ray actors, Parquet shards out; wall time) against FAISS
   `IndexFlatL2.search` on the same base (10,000 queries, rate extrapolated: it is linear in
   the queries) and against the machine's own matmul rate (the faster of `torch.mm` and numpy's
   BLAS, which the stage may use instead: `vectors.TileGemm`), each measured before and after
   the stage (the faster kept). Rates are GFLOP/s of the 2*N*N*d multiply-adds a brute-force
   self-join needs, whatever the stage computes (the symmetric path computes about half).
2. Approximate: index stage + kNN stage over 1,000,000 x 128 synthetic vectors (1,000 Gaussian
   clusters with 16-dim structure plus isotropic noise, a stand-in for real embeddings:
   uniform noise has no neighbourhoods to find), recall@10 of the kNN graph against exact
   search on 1,000 sampled queries, and the peak memory (PSS summed over the driver and every
   Ray process, sampled every 0.2 s).
3. Memory against N (`knn_rss_ratio_2m_200k`): the index + kNN stages' peak memory (as in 2)
   minus the index file's size, at 2,000,000 over 200,000 vectors of --ann-dim, ANN path.

    python benchmarks/knn.py [--n 100000] [--dim 512] [--ann-n 1000000] [--ann-dim 128] [--cpus 2]
                             [--parts exact,ann,rss] [--rss-small 200000] [--rss-large 2000000]

The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa

# this checkout's featscope in the driver, as the other benchmarks do (PYTHONPATH=. for its Ray workers too)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_features(run_path: str, vecs: np.ndarray, rows_per_file: int = 65536) -> None:
    from featscope.core.rundir import RunDir, write_table_atomic
    from featscope.stages.extract import features_schema

    run = RunDir(run_path)
    n, d = vecs.shape
    for f, lo in enumerate(range(0, n, rows_per_file)):
        v = vecs[lo:lo + rows_per_file]
        m = len(v)
        write_table_atomic(run.p("features", "emb", f"part-{f:05d}.parquet"), pa.table({
            "image_id": pa.array(np.arange(lo, lo + m, dtype=np.int64)), "view": pa.array(["orig"] * m),
            "pred": pa.array(np.zeros(m, np.int32)), "prob": pa.array(np.ones(m, np.float32)),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), d)}, schema=features_schema(d)))
    run.write_meta({"layers": [{"name": "emb", "alias": "node", "node": "emb", "pooling": "none", "dim": d}],
                    "index_layers": [{"name": "emb", "features": "emb", "metric": "l2"}]})


def matmul_peak(threads: int, d: int) -> dict:
    """GFLOP/s of a 4096 x 16384 x d float32 matmul through torch's BLAS and numpy's (different
    libraries: MKL and OpenBLAS in the x86 wheels; the kNN stage may use either, TileGemm)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    a, b = torch.randn(4096, d), torch.randn(16384, d)
    out = torch.empty(4096, 16384)
    rates, reps = {}, 5
    with threadpool_limits(threads, user_api="blas"):
        for name, mm in (("torch", lambda: torch.mm(a, b.T, out=out)),
                         ("numpy", lambda: np.matmul(a.numpy(), b.numpy().T, out=out.numpy()))):
            mm()
            t = time.perf_counter()
            for _ in range(reps):
                mm()
            rates[name] = 2 * 4096 * 16384 * d * reps / (time.perf_counter() - t) / 1e9
    return rates


def faiss_flat(base: np.ndarray, nq: int, k: int, threads: int) -> float:
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    t = time.perf_counter()
    index.search(base[:nq], k + 1)
    return 2 * nq * len(base) * base.shape[1] / (time.perf_counter() - t) / 1e9


class PeakMemory:
    """Peak of the summed PSS of this process and all its descendants (the embedded Ray)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self.at_peak: dict = {}  # process name -> its PSS in the sample of the peak (where the memory is)
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total, each = 0, {}
            for p in [me] + me.children(recursive=True):
                try:
                    pss = p.memory_full_info().pss
                    name = "driver" if p.pid == me.pid else p.name()
                    total += pss
                    each[name] = each.get(name, 0) + pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if total > self.peak:
                self.peak, self.at_peak = total, each
            time.sleep(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(1000, d)).astype(np.float32) * 4
    basis = rng.normal(size=(16, d)).astype(np.float32) / 4  # 16-dim structure inside each cluster
    out = np.empty((n, d), np.float32)
    for lo in range(0, n, 100_000):
        m = min(100_000, n - lo)
        out[lo:lo + m] = (centers[rng.integers(0, 1000, m)] + rng.normal(size=(m, 16)).astype(np.float32) @ basis
                          + 0.1 * rng.normal(size=(m, d)).astype(np.float32))
    return out


def exact_part(a, tmp: str, k: int, out: dict) -> None:
    from featscope.core.config import build_config
    from featscope.core.progress import progress
    from featscope.core.rundir import RunDir
    from featscope.stages import knn

    base = np.random.default_rng(0).normal(size=(a.n, a.dim)).astype(np.float32)
    flops = 2.0 * a.n * a.n * a.dim
    nq = min(a.faiss_queries, a.n)
    # the references are measured before and after the stage and the faster run kept: on a shared
    # machine the load changes within minutes, and the higher reference is the conservative one
    mm, flat = [matmul_peak(a.cpus, a.dim)], [faiss_flat(base, nq, k, a.cpus)]
    write_features(os.path.join(tmp, "exact"), base)
    cfg = build_config(None, None, [f"k={k}", "shard_size=4096"])
    run = RunDir(os.path.join(tmp, "exact"))
    t = time.perf_counter()
    res = knn.run(run, cfg, progress)
    wall = time.perf_counter() - t
    assert res["rows"] == a.n * k
    out["load_avg_after_exact"] = round(os.getloadavg()[0], 2)
    mm.append(matmul_peak(a.cpus, a.dim))
    flat.append(faiss_flat(base, nq, k, a.cpus))
    del base
    # the machine's matmul rate: the faster BLAS (torch's or numpy's), the faster of before and after
    out.update({"matmul_gflops": round(max(max(r.values()) for r in mm), 1),
                "matmul_gflops_runs": [{n: round(v, 1) for n, v in r.items()} for r in mm],
                "faiss_flat_gflops": round(max(flat), 1), "faiss_flat_gflops_runs": [round(r, 1) for r in flat]})
    summary = json.load(open(run.p("stats", "knn", "emb.json")))  # the stage's layer summary
    out.update({"exact_n": a.n, "exact_dim": a.dim, "exact_seconds": round(wall, 2),
                "exact_compute_seconds": res["seconds"], "ours_gflops": round(flops / wall / 1e9, 1),
                "exact_path": summary["path"], "exact_gemm": summary.get("gemm")})
    out["vs_faiss_flat"] = round(out["ours_gflops"] / out["faiss_flat_gflops"], 2)
    out["vs_matmul_peak"] = round(out["ours_gflops"] / out["matmul_gflops"], 2)


def ann_part(a, tmp: str, k: int, out: dict) -> None:
    import pyarrow.dataset as ds

    from featscope.core.config import build_config
    from featscope.core.progress import progress
    from featscope.core.rundir import RunDir
    from featscope.stages import index, knn
    from featscope.stages.vectors import exact_search

    vecs = clustered(a.ann_n, a.ann_dim)
    path = os.path.join(tmp, "ann")
    write_features(path, vecs)
    run = RunDir(path)
    cfg = build_config(None, None, [f"k={k}", "shard_size=65536", "exact_knn_max=0", "index_recall=0.9"])
    with PeakMemory() as mem:
        t = time.perf_counter()
        ires = index.run(run, cfg, progress)
        t_index = time.perf_counter() - t
        kres = knn.run(run, cfg, progress)
        t_knn = time.perf_counter() - t - t_index
    info = json.load(open(run.p("index", "emb.json")))
    # recall@10 of the written graph against exact search, on 1,000 sampled queries
    sample = np.random.default_rng(1).choice(a.ann_n, 1000, replace=False)
    truth, _ = exact_search(vecs[sample], vecs, np.arange(a.ann_n), k, "l2", query_ids=sample)
    got = ds.dataset(run.parquet_files("knn", "emb")).to_table(
        filter=ds.field("query_id").isin(sample)).to_pandas().sort_values(["query_id", "rank"])
    found = {q: g["neighbor_id"].tolist() for q, g in got.groupby("query_id")}
    recall = np.mean([len(set(found[q]) & set(t.tolist())) / k for q, t in zip(sample, truth)])
    out.update({"ann_n": a.ann_n, "ann_dim": a.ann_dim, "ann_factory": info["factory"],
                "ann_search_params": info["search_params"], "ann_index_recall_at_10": info["recall_at_k"],
                "ann_recall_at_10": round(float(recall), 4), "ann_index_seconds": round(t_index, 1),
                "ann_knn_seconds": round(t_knn, 1), "ann_peak_rss_gb": round(mem.peak / 2**30, 2),
                "ann_rows": kres["rows"], "index_redone": ires["redone"]})


def rss_part(a, tmp: str, k: int, out: dict) -> None:
    """knn_rss_ratio_2m_200k: the peak memory of the index + kNN stages (PSS summed over the driver
    and every Ray process) minus the index file's size, at --rss-large over --rss-small vectors of
    --ann-dim (ANN path forced): how much more than the index itself the stages hold as N grows."""
    import gc
    import shutil

    from featscope.core.config import build_config
    from featscope.core.progress import progress
    from featscope.core.rundir import RunDir
    from featscope.stages import index, knn

    net = {}
    for n in (a.rss_small, a.rss_large):
        path = os.path.join(tmp, f"rss-{n}")
        vecs = clustered(n, a.ann_dim, seed=2)
        write_features(path, vecs)
        del vecs
        gc.collect()  # the driver's copy is not the stages' memory
        run = RunDir(path)
        cfg = build_config(None, None, [f"k={k}", "shard_size=65536", "exact_knn_max=0", "index_recall=0.9"])
        with PeakMemory() as mem:
            index.run(run, cfg, progress)
            index_peak, index_at, mem.peak = mem.peak, mem.at_peak, 0  # each stage's own peak: where it goes
            knn.run(run, cfg, progress)
            knn_peak, knn_at = mem.peak, mem.at_peak
        peak = max(index_peak, knn_peak)
        size = os.path.getsize(run.p("index", "emb.faiss"))
        net[n] = peak - size
        out[f"rss_{n}"] = {"peak_gb": round(peak / 2**30, 3), "index_stage_peak_gb": round(index_peak / 2**30, 3),
                           "knn_stage_peak_gb": round(knn_peak / 2**30, 3), "index_file_gb": round(size / 2**30, 3),
                           "net_gb": round(net[n] / 2**30, 3),
                           "index_stage_gb_by_process": {k: round(v / 2**30, 3) for k, v in index_at.items() if v > 2**25},
                           "knn_stage_gb_by_process": {k: round(v / 2**30, 3) for k, v in knn_at.items() if v > 2**25},
                           "factory": json.load(open(run.p("index", "emb.json")))["factory"]}
        shutil.rmtree(path, ignore_errors=True)
    out.update({"rss_small_n": a.rss_small, "rss_large_n": a.rss_large,
                "knn_rss_ratio_2m_200k": round(net[a.rss_large] / net[a.rss_small], 3)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ann-n", type=int, default=1_000_000)
    ap.add_argument("--ann-dim", type=int, default=128)
    ap.add_argument("--faiss-queries", type=int, default=10_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rss-small", type=int, default=200_000)
    ap.add_argument("--rss-large", type=int, default=2_000_000)
    ap.add_argument("--parts", default="exact,ann,rss", help="comma-separated: exact, ann, rss")
    a = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from featscope.core.progress import set_quiet
    from featscope.pipeline.runner import connect_ray

    set_quiet(True)
    k, out = 10, {"load_avg_start": round(os.getloadavg()[0], 2)}  # other work on the machine skews every rate
    connect_ray(num_cpus=a.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        if "exact" in a.parts:
            exact_part(a, tmp, k, out)
            print(json.dumps(out), flush=True)
        if "ann" in a.parts:
            ann_part(a, tmp, k, out)
            print(json.dumps(out), flush=True)
        if "rss" in a.parts:
            rss_part(a, tmp, k, out)
    out["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
