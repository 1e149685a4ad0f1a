"""Synthetic runs for the measure tests (queries/, stages/analyze.py): images/, features/, knn/
(exact, by numpy) and run.json with the exact schemas the pipeline writes, without running a model.

Classes are Gaussian clusters of uneven sizes, one class has a single image (R = 0 in
MAP@R), predictions are mostly right, and one image is planted as a confident mislabel.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featscope.core.rundir import layer_dir

CLASS_SIZES = (70, 55, 45, 40, 29, 1)
LAYERS = {"conv": 6, "penultimate": 4}  # features layer -> dim
INDEX_LAYERS = [{"name": "conv", "features": "conv", "metric": "l2"},
                {"name": "penultimate", "features": "penultimate", "metric": "l2"},
                {"name": "penultimate:cosine", "features": "penultimate", "metric": "cosine"}]
K = 6  # even, so that kNN votes tie


class Synthetic:
    """The arrays behind a synthetic run, for the independent numpy computations in tests."""

    def __init__(self, seed: int = 0, spread: float = 1.0):
        rng = np.random.default_rng(seed)
        self.labels = np.repeat(np.arange(len(CLASS_SIZES)), CLASS_SIZES).astype(np.int32)
        n = len(self.labels)
        self.ids = np.sort(rng.choice(2 ** 40, n, replace=False)).astype(np.int64)
        rng.shuffle(self.ids)  # ids not in label order
        self.names = np.array([f"class{c}" for c in range(len(CLASS_SIZES))])
        self.vectors = {}
        for layer, dim in LAYERS.items():
            centres = rng.normal(0, 1.6, (len(CLASS_SIZES), dim))
            self.vectors[layer] = (centres[self.labels] + rng.normal(0, spread, (n, dim))).astype(np.float32)
        self.pred = np.where(rng.random(n) < 0.8, self.labels, rng.integers(0, len(CLASS_SIZES), n)).astype(np.int32)
        self.prob = rng.uniform(0.3, 1.0, n).astype(np.float32)
        # the planted mislabel: labelled class 1, looks like class 0, predicted 0 with confidence
        self.planted = 1 + CLASS_SIZES[0]  # second image of class 1
        for layer in LAYERS:
            self.vectors[layer][self.planted] = self.vectors[layer][: CLASS_SIZES[0]].mean(0)
        self.pred[self.planted], self.prob[self.planted] = 0, 0.999

    def distances(self, layer: dict) -> np.ndarray:
        x = self.vectors[layer["features"]].astype(np.float64)
        if layer["metric"] == "cosine":
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
            return 1.0 - x @ x.T
        sq = (x * x).sum(1)
        return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))

    def knn(self, layer: dict, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """(neighbour positions [n, k], float32 distances [n, k]), self excluded, nearest first."""
        d = self.distances(layer)
        np.fill_diagonal(d, np.inf)
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(d, order, 1).astype(np.float32)


def write_run(path: str, syn: Synthetic, k: int = K, shards: int = 2) -> str:
    from featscope.stages.extract import features_schema
    from featscope.stages.ingest import IMAGES_SCHEMA

    os.makedirs(path, exist_ok=True)
    n = len(syn.ids)
    parts = np.array_split(np.arange(n), shards)
    for s, rows in enumerate(parts):
        pq.write_table(pa.table({
            "image_id": syn.ids[rows], "uri": [f"mem://{i}.png" for i in rows], "label": syn.labels[rows],
            "label_name": syn.names[syn.labels[rows]], "split": ["train"] * len(rows),
            "width": np.full(len(rows), 8, np.int32), "height": np.full(len(rows), 8, np.int32),
            "bytes": [b""] * len(rows)}, schema=IMAGES_SCHEMA), os.path.join(_mk(path, "images"), f"part-{s:05d}.parquet"))
        for layer, dim in LAYERS.items():
            vec = syn.vectors[layer][rows]
            pq.write_table(pa.table({
                "image_id": syn.ids[rows], "view": ["orig"] * len(rows), "pred": syn.pred[rows], "prob": syn.prob[rows],
                "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim)}, schema=features_schema(dim)),
                os.path.join(_mk(path, "features", layer_dir(layer)), f"part-{s:05d}.parquet"))
    for layer in INDEX_LAYERS:
        order, dist = syn.knn(layer, k)
        for s, rows in enumerate(parts):
            pq.write_table(pa.table({
                "layer": [layer["name"]] * (len(rows) * k), "query_id": np.repeat(syn.ids[rows], k),
                "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), len(rows)),
                "neighbor_id": syn.ids[order[rows]].ravel(), "distance": dist[rows].ravel()},
                schema=pa.schema([("layer", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                                  ("neighbor_id", pa.int64()), ("distance", pa.float32())])),
                os.path.join(_mk(path, "knn", layer_dir(layer["name"])), f"part-{s:05d}.parquet"))
    meta = {"fingerprint": "synthetic", "config": {"k": k, "seed": 0},
            "dataset": {"classes": list(syn.names)},
            "layers": [{"name": l, "alias": l, "node": l, "dim": d, "pooling": "gap" if l == "conv" else "none"}
                       for l, d in LAYERS.items()],
            "index_layers": INDEX_LAYERS}
    with open(os.path.join(path, "run.json"), "w") as fh:
        json.dump(meta, fh)
    return path


def _mk(*parts: str) -> str:
    folder = os.path.join(*parts)
    os.makedirs(folder, exist_ok=True)
    return folder
