"""A run directory holding only synthetic feature vectors: enough for the index and kNN stages."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from featscope.core.config import build_config
from featscope.core.rundir import RunDir, write_table_atomic
from featscope.stages.extract import features_schema


def clustered(n: int, d: int, centers: int = 50, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """Gaussian blobs: neighbourhoods with structure, like real embeddings (uniform noise has none)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)) * 3
    return (c[rng.integers(0, centers, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


def make_run(path, vecs: np.ndarray, metrics=("l2",), files: int = 3, perturbed: int = 50, seed: int = 0):
    """features/emb/part-*.parquet (+ `noise:0.1` rows that must stay out of the base) and run.json."""
    run = RunDir(str(path))
    n, d = vecs.shape
    ids = np.random.default_rng(seed).choice(2**62, size=n, replace=False).astype(np.int64)
    bounds = np.linspace(0, n, files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        v = vecs[lo:hi]
        views = ["orig"] * len(v)
        extra = min(perturbed, len(v))  # perturbed copies: same ids, shifted vectors
        v = np.concatenate([v, v[:extra] + 5.0])
        rows_ids = np.concatenate([ids[lo:hi], ids[lo:lo + extra]])
        views += ["noise:0.1"] * extra
        write_table_atomic(run.p("features", "emb", f"part-{f:05d}.parquet"), pa.table({
            "image_id": pa.array(rows_ids), "view": pa.array(views), "pred": pa.array(np.zeros(len(v), np.int32)),
            "prob": pa.array(np.ones(len(v), np.float32)),
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), d)}, schema=features_schema(d)))
    names = {m: "emb" if m == "l2" else f"emb:{m}" for m in metrics}
    run.write_meta({"layers": [{"name": "emb", "alias": "node", "node": "emb", "pooling": "none", "dim": d}],
                    "index_layers": [{"name": names[m], "features": "emb", "metric": m} for m in metrics]})
    return run, ids


def config(**sets):
    return build_config(None, None, [f"{k}={v}" for k, v in sets.items()])


def brute_force(vecs: np.ndarray, k: int, metric: str, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """numpy float64 k nearest of vecs[rows] (own row excluded): (positions, distances), shared convention."""
    x = vecs.astype(np.float64)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - x[rows] @ x.T
    else:
        sq = (x * x).sum(1)
        dist = np.sqrt(np.maximum(sq[rows, None] + sq[None, :] - 2 * x[rows] @ x.T, 0))
    dist[np.arange(len(rows)), rows] = np.inf
    pos = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return pos, np.take_along_axis(dist, pos, 1)
