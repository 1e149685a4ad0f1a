"""The measure suite (queries/*.sql on DuckDB) over a synthetic run of 1,000,000 images x k = 10
kNN edges, beside pandas computing the same numbers from the same Parquet files.

The synthetic run: 1000 classes of 1000 images, kNN edges that land in the query's class with
probability 0.7 (distances ascending with rank), predictions right 90% of the time, 16-dim
vectors for the global pairs and triplets, and a knn_deep of 10,000 sampled queries x
R = 999 (the analyze stage's default for a run this size caps the sample at deep_queries), and
the analyze stage's knn_labels (written with its own code, timed apart from the suite).
The seeded global samples (which image pairs and triplets) are drawn by the SQL's hash scheme
and handed to pandas, which computes everything else itself. Both sides read the Parquet files
inside their timing. Last line: one JSON object.

    python benchmarks/queries.py [--images 1000000] [--classes 1000] [--k 10] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from featscope import queries  # noqa: E402
from featscope.core import catalog  # noqa: E402
from featscope.core.rundir import RunDir  # noqa: E402

KNN_SCHEMA = pa.schema([("layer", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                        ("neighbor_id", pa.int64()), ("distance", pa.float32())])
LAYER = "penultimate"
# the measures over the kNN graph (continuity.sql needs perturbed views, which this run has not)
SUITE = ("knn_agreement", "class_distances", "per_class", "suspicious", "layer_comparison")
DIM = 16


def make_run(path: str, n: int, classes: int, k: int, deep_queries: int, seed: int = 0) -> None:
    from featscope.stages.extract import features_schema
    from featscope.stages.ingest import IMAGES_SCHEMA

    rng = np.random.default_rng(seed)
    ids = rng.choice(2 ** 62, n, replace=False).astype(np.int64)
    labels = (np.arange(n) % classes).astype(np.int32)
    rng.shuffle(labels)
    names = np.array([f"class{c:04d}" for c in range(classes)], dtype=object)
    by_class = np.argsort(labels, kind="stable")
    start = np.searchsorted(labels[by_class], np.arange(classes))
    size = np.bincount(labels, minlength=classes)

    def neighbours(rows: np.ndarray, depth: int, p_same: float) -> np.ndarray:
        same = rng.random((len(rows), depth)) < p_same
        lab = labels[rows][:, None]
        own = by_class[start[lab] + rng.integers(0, 1 << 30, (len(rows), depth)) % size[lab]]
        other = rng.integers(0, n, (len(rows), depth))
        nb = np.where(same, own, other)
        return np.where(nb == rows[:, None], (nb + 1) % n, nb)  # self excluded

    os.makedirs(path)
    shard = 250_000
    pred = np.where(rng.random(n) < 0.9, labels, rng.integers(0, classes, n)).astype(np.int32)
    prob = rng.uniform(0.2, 1.0, n).astype(np.float32)
    vec = (rng.normal(0, 1, (classes, DIM))[labels] + rng.normal(0, 1, (n, DIM))).astype(np.float32)
    for s, r0 in enumerate(range(0, n, shard)):
        rows = np.arange(r0, min(n, r0 + shard))
        m = len(rows)
        name = f"part-{s:05d}.parquet"
        _write(path, "images", name, pa.table({
            "image_id": ids[rows], "uri": pa.array([f"mem://{i}" for i in rows]), "label": labels[rows],
            "label_name": names[labels[rows]], "split": pa.array(["train"] * m), "width": np.full(m, 32, np.int32),
            "height": np.full(m, 32, np.int32), "bytes": pa.array([b""] * m, pa.binary())}, schema=IMAGES_SCHEMA))
        _write(path, f"features/{LAYER}", name, pa.table({
            "image_id": ids[rows], "view": pa.array(["orig"] * m), "pred": pred[rows], "prob": prob[rows],
            "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec[rows].ravel()), DIM)}, schema=features_schema(DIM)))
        nb = neighbours(rows, k, 0.7)
        dist = np.sort(rng.gamma(4.0, 0.5, (m, k)).astype(np.float32), axis=1)
        _write(path, f"knn/{LAYER}", name, _knn_table(ids[rows], ids[nb], dist))
    depth = int(min(size.max() - 1, 1000))
    rows = np.sort(rng.choice(n, min(deep_queries, n), replace=False))
    nb = neighbours(rows, depth, 0.5)
    dist = np.sort(rng.gamma(4.0, 0.5, (len(rows), depth)).astype(np.float32), axis=1)
    # as the analyze stage stores it: each query down to its R (capped at the depth), with hit (the
    # neighbour carries the query's label) and hits (the hits at this rank or nearer)
    hit = labels[nb] == labels[rows][:, None]
    keep = np.arange(1, depth + 1)[None, :] <= np.minimum(size[labels[rows]] - 1, depth)[:, None]
    deep = _knn_table(ids[rows], ids[nb], dist).append_column("hit", pa.array(hit.ravel())).append_column(
        "hits", pa.array(np.cumsum(hit, axis=1, dtype=np.int32).ravel())).filter(pa.array(keep.ravel()))
    _write(path, f"knn_deep/{LAYER}", "part-00000.parquet", deep)
    meta = {"fingerprint": "benchmark", "config": {"k": k, "seed": 0}, "dataset": {"classes": list(names)},
            "layers": [{"name": LAYER, "alias": LAYER, "node": "fc", "dim": DIM, "pooling": "none"}],
            "index_layers": [{"name": LAYER, "features": LAYER, "metric": "l2"}]}
    with open(os.path.join(path, "run.json"), "w") as fh:
        json.dump(meta, fh)


def _knn_table(qids: np.ndarray, nbr_ids: np.ndarray, dist: np.ndarray) -> pa.Table:
    q, depth = nbr_ids.shape
    return pa.table({"layer": pa.array([LAYER] * (q * depth)), "query_id": np.repeat(qids, depth),
                     "rank": np.tile(np.arange(1, depth + 1, dtype=np.int32), q),
                     "neighbor_id": nbr_ids.ravel(), "distance": dist.ravel()}, schema=KNN_SCHEMA)


def _write(path: str, folder: str, name: str, table: pa.Table) -> None:
    os.makedirs(os.path.join(path, folder), exist_ok=True)
    pq.write_table(table, os.path.join(path, folder, name))


def sql_suite(path: str, threads: int) -> tuple[dict, dict]:
    meta = RunDir(path).read_meta()
    con = catalog.connect(path, locked=False)
    con.execute(f"SET threads = {threads}")
    out, seconds = {}, {}
    for m in SUITE:
        t0 = time.perf_counter()
        out[m] = queries.run_measure(con, m, {}, meta).to_pandas()
        seconds[m] = round(time.perf_counter() - t0, 3)
    return out, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--deep-queries", type=int, default=10_000)
    ap.add_argument("--keep", help="build the run here and keep it (reused if it exists)")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads (the bar is 2 cores)")
    ap.add_argument("--skip-pandas", action="store_true")
    a = ap.parse_args()
    path = a.keep or os.path.join(tempfile.mkdtemp(prefix="featscope-bench-"), "run")
    if not os.path.exists(os.path.join(path, "run.json")):
        t0 = time.perf_counter()
        make_run(path, a.images, a.classes, a.k, a.deep_queries)
        print(f"synthetic run: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    # the labelled knn edges, as the analyze stage writes them once per knn (not part of the suite:
    # timed apart; a kept run made before them gets them here)
    from featscope.stages.analyze import write_knn_labels

    t0 = time.perf_counter()
    labels_written = write_knn_labels(RunDir(path))
    labels_seconds = round(time.perf_counter() - t0, 3)
    if labels_written:
        print(f"knn_labels (analyze stage): {labels_seconds} s", file=sys.stderr)
    sql, per_measure = sql_suite(path, a.threads)
    suite = round(sum(per_measure.values()), 3)
    print(f"SQL suite: {suite} s {per_measure}", file=sys.stderr)
    result = {"images": a.images, "k": a.k, "edges": a.images * a.k, "suite_seconds": suite,
              "per_measure_seconds": per_measure}
    if labels_written:
        result["knn_labels_seconds"] = labels_seconds
    if not a.skip_pandas:
        from queries_pandas import draws, pandas_suite, same_results

        sample = draws(path)  # the seeded samples, drawn by the SQL's hash scheme (not timed)
        t0 = time.perf_counter()
        pd_out = pandas_suite(path, sample)
        result["pandas_seconds"] = round(time.perf_counter() - t0, 3)
        print(f"pandas: {result['pandas_seconds']} s", file=sys.stderr)
        result["vs_pandas"] = round(result["pandas_seconds"] / suite, 2)
        result["same_results"] = same_results(sql, pd_out)
    if not a.keep:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
