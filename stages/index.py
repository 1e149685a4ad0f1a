"""Index: one FAISS index per index layer -> `index/<layer>.faiss` + `index/<layer>.json`.

The index type is chosen from N, dim and `index_memory_gb` the way autofaiss chooses it
(https://github.com/criteo/autofaiss, `get_optimal_index_keys_v2`), with our thresholds:
- `Flat` (exact) up to `index_flat_max` vectors, when the raw vectors fit the budget;
- `HNSW{M}` below ~10k vectors past that, where IVF has too few points to train its lists;
- `IVF{nlist},Flat` while the raw vectors fit the budget (a self-join is a batch of N queries:
  one k-means to train, and nprobe trades speed for recall predictably);
- `IVF{nlist},PQ{m}` otherwise, m as large as the budget allows.
`index_factory` names any FAISS factory string instead. Vectors are added under their
image_id, so the `.faiss` file opened with plain `faiss.read_index` returns image ids.

Training uses a seeded sample; recall@k (own id excluded, as in the kNN graph) is measured
against exact search on held-out vectors (not in the training sample), and nprobe / efSearch
are doubled until it reaches `index_recall`. The tuned value is stored in the index file itself
(FAISS writes nprobe and efSearch) and in the json, which is written last: an index whose json
exists and matches the current request and features is complete and is not rebuilt.
"""
from __future__ import annotations

import math
import time

import numpy as np

from featscope.core.config import UserError
from featscope.core.rundir import exists, getsize, layer_dir, read_json, RunDir, write_file_atomic, write_json_atomic

from .basefile import BaseFile, return_freed_memory
from .vectors import DISTANCE_NOTE, base_signature, exact_search

EVAL_QUERIES = 1000
HNSW_BELOW = 39 * 256  # fewer points than this cannot train 256 IVF lists (FAISS wants 39 per list)


def n_lists(n: int) -> int:
    """~2 sqrt(N) rounded to a power of two, with at least 39 training points per list.

    autofaiss takes 4-16 sqrt(N) for query latency; a self-join is a throughput job where the
    k-means training (cost ~ nlist^2) dominated at 4 sqrt(N) on 2 cores.
    """
    nlist = 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n))))
    return max(1, min(nlist, n // 39))


def choose_factory(n: int, d: int, cfg) -> str:
    if cfg.index_factory and cfg.index_factory != "auto":
        return cfg.index_factory
    budget = cfg.index_memory_gb * 2**30
    raw = n * (4 * d + 8)  # vectors + int64 ids
    if n <= cfg.index_flat_max and raw <= budget:
        return "Flat"
    if n < HNSW_BELOW:
        m = int((budget / n - 4 * d) // 8)  # HNSW level 0 keeps 2M int32 links per vector
        if m >= 8:
            return f"HNSW{min(m, 32)}"
    nlist = n_lists(n)
    if raw * 1.1 <= budget:
        return f"IVF{nlist},Flat"
    for m in (64, 48, 32, 24, 16, 8, 4):
        if d % m == 0 and m < d and n * (m + 8) * 1.1 <= budget:
            return f"IVF{nlist},PQ{m}"
    raise UserError(f"index_memory_gb={cfg.index_memory_gb} is too small for {n} vectors of dim {d}")


def _gpu():
    """FAISS GPU resources when FAISS was built with GPU support and torch sees a GPU; else None."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return None
    try:
        import torch

        return faiss.StandardGpuResources() if torch.cuda.is_available() else None
    except Exception:  # a broken CUDA setup falls back to the CPU
        return None


def _search_param(index, factory: str):
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", [2**i for i in range(int(math.log2(ivf.nlist)) + 1)] + [ivf.nlist]
    if "HNSW" in factory:
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    return None, [None]


def recall_at_k(index, queries, qids, truth, k: int) -> float:
    """Share of the exact k neighbours (own id excluded) that the index returns in its k."""
    _, found = index.search(queries, k + 1)
    hits = 0
    for row, q, t in zip(found, qids, truth):
        hits += len(set(row[row != q][:k].tolist()) & set(t.tolist()))
    return hits / max(1, truth.size)


def build(base: np.ndarray, ids: np.ndarray, factory: str, metric: str, k: int, target: float, seed: int,
          release=None, gather=None):
    """Train on a sample, add everything under image ids, tune the search parameter on held-out vectors.

    base may be memory-mapped (`basefile.BaseFile.rows`): it is read in blocks, `release` drops
    the pages read after each and `gather` reads random rows, so the index is the only N-sized
    thing held.
    """
    import faiss

    release = release or (lambda: None)

    n, d = base.shape
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2)
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap2(index)  # Flat / HNSW keep positions; the map makes them image ids
    order = np.random.default_rng(seed).permutation(n)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = 10  # instead of FAISS's 25: training dominated the build on 2 cores; nprobe tuning pays for it
    n_train = 0
    if not index.is_trained:
        n_train = min(n, max(40 * (ivf.nlist if ivf is not None else 1), 20_000 if "PQ" in factory else 0))
        n_train = min(n_train, max(n - EVAL_QUERIES, n // 2))  # keep queries held out
    held = order[n_train:][:EVAL_QUERIES] if n_train < n else order[:EVAL_QUERIES]
    res, device = _gpu(), "cpu"
    work = index
    if res is not None:
        try:
            work, device = faiss.index_cpu_to_gpu(res, 0, index), "cuda"
        except Exception:  # HNSW and some quantisers have no GPU version
            work = index
    if n_train:
        sample = base[np.sort(order[:n_train])]  # a copy: the map's pages can go
        release()
        work.train(sample)
        del sample
    for lo in range(0, n, 65536):
        work.add_with_ids(base[lo:lo + 65536], ids[lo:lo + 65536])
        release()
    kk = min(k, n - 1)
    queries, qids = base[held], ids[held]
    truth, _ = exact_search(queries, base, ids, kk, metric, query_ids=qids, device=device, release=release,
                            gather=gather)
    name, values = _search_param(work, factory)
    ps = faiss.GpuParameterSpace() if device == "cuda" else faiss.ParameterSpace()
    for value in values:
        if name:
            ps.set_index_parameter(work, name, value)
        recall = recall_at_k(work, queries, qids, truth, kk) if kk > 0 else 1.0
        if recall >= target:
            break
    if device == "cuda":
        index = faiss.index_gpu_to_cpu(work)
        if name:
            faiss.ParameterSpace().set_index_parameter(index, name, value)
    return index, {"search_params": {name: value} if name else {}, "recall_at_k": round(recall, 4), "k": kk,
                   "recall_queries": len(held), "held_out": n_train < n, "train_size": n_train, "device": device}


def run(run_dir: RunDir, cfg, progress) -> dict:
    import faiss

    meta = run_dir.read_meta()
    entries = meta.get("index_layers", [])
    # what the index depends on (not k: k only sets where recall is measured)
    request = {"index_factory": cfg.index_factory, "index_memory_gb": cfg.index_memory_gb,
               "index_flat_max": cfg.index_flat_max, "index_recall": cfg.index_recall, "seed": cfg.seed}
    built, rows, seconds, recalls = 0, 0, 0.0, []
    for entry in progress(entries, "index", unit="index"):
        name, metric = entry["name"], entry["metric"]
        path = run_dir.p("index", layer_dir(name))
        sig = base_signature(run_dir, entry["features"], metric)
        old = read_json(path + ".json")
        if old and old.get("base") == sig and old.get("request") == request and exists(path + ".faiss"):
            rows, recalls = rows + old["n"], recalls + [old["recall_at_k"]]
            continue
        t0 = time.perf_counter()
        # streamed from a scratch file: the base is never held in RAM beside the index it fills
        base = BaseFile.write(run_dir, entry["features"], metric)
        ids, dim = base.ids, base.rows.shape[1]
        factory = choose_factory(len(ids), dim, cfg)
        try:
            index, info = build(base.rows, ids, factory, metric, cfg.k, cfg.index_recall, cfg.seed, base.release,
                                base.gather)
        except RuntimeError as exc:  # FAISS rejects a factory string or a training set
            raise UserError(f"index for layer '{name}' ({factory}): {str(exc).strip().splitlines()[-1]}") from None
        finally:
            base.close()
            del base
        write_file_atomic(path + ".faiss", lambda tmp: faiss.write_index(index, tmp))
        info.update({"layer": name, "features": entry["features"], "metric": metric, "distance": DISTANCE_NOTE[metric],
                     "factory": factory, "n": len(ids), "dim": int(dim), "base": sig, "request": request,
                     "bytes": getsize(path + ".faiss"), "seconds": round(time.perf_counter() - t0, 3)})
        write_json_atomic(path + ".json", info)  # last: its presence marks the index complete
        del index
        return_freed_memory()  # the index's heap, before the next index or the kNN actors load theirs
        if info["recall_at_k"] < cfg.index_recall:
            from featscope.core.progress import say

            say(f"warning: index {name} ({factory}) reaches recall@{info['k']} {info['recall_at_k']} "
                f"< index_recall {cfg.index_recall}: raise index_memory_gb")
        built, rows, seconds = built + 1, rows + len(ids), seconds + info["seconds"]
        recalls.append(info["recall_at_k"])
    return {"indexes": len(entries), "redone": built, "rows": rows, "seconds": round(seconds, 3),
            "min_recall_at_k": min(recalls) if recalls else None}
