"""Twins: where each perturbed view lands relative to its original, for the continuity measure.

For every index layer (vector set x metric) and every (image, view) with view != orig:
  feature_dist        d(f(x), f(x')) in the layer's metric (the shared convention: l2 =
                      Euclidean, cosine = 1 - cosine similarity)
  twin_rank           1 + the number of other images b with d(f(x), f(b)) < d(f(x), f(x')):
                      the rank f(x') would take among f(x)'s neighbours in the original index
                      (1 = nearest), counted exactly over the whole base set
  nearest_other_dist  d(f(x), nearest image of another class): the view is "continuous" when
                      it stays closer than that (continuity_accuracy)
One exact pass of blocked matmul over the base per query block (the same cost as an exact kNN
self-join); above `continuity_queries` images, a seeded sample of queries is used.
Written to twins/<layer>/part-00000.parquet (exposed as the `twins` view).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featscope.core.rundir import layer_dir, read_json, read_table, RunDir, write_json_atomic, write_table_atomic

from .vectors import B_CHUNK, Q_BLOCK, exact_distances, feature_files, load_base, prepare

SCHEMA = pa.schema([("layer", pa.string()), ("image_id", pa.int64()), ("view", pa.string()),
                    ("feature_dist", pa.float32()), ("twin_rank", pa.int64()), ("nearest_other_dist", pa.float32())])


def _views(run: RunDir, features: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, views, vecs = [], [], []
    for f in feature_files(run, features):
        t = read_table(f, columns=["image_id", "view", "vec"])
        t = t.filter(pc.not_equal(t.column("view"), "orig"))
        if t.num_rows:
            col = t.column("vec").combine_chunks()
            vecs.append(col.flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, col.type.list_size))
            ids.append(t.column("image_id").to_numpy())
            views.append(np.asarray(t.column("view").to_pylist(), dtype=object))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, object), np.zeros((0, 1), np.float32)
    return np.concatenate(ids), np.concatenate(views), prepare(np.concatenate(vecs), metric)


def _labels(run: RunDir) -> dict[int, int]:
    t = read_table(run.p("images"), columns=["image_id", "label"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("label").to_pylist()))


def twins_for_layer(run: RunDir, entry: dict, max_queries: int, seed: int, device: str = "cpu") -> pa.Table:
    import torch

    name, features, metric = entry["name"], entry["features"], entry["metric"]
    base_ids, base = load_base(run, features, metric)
    v_ids, v_names, v_vecs = _views(run, features, metric)
    if len(v_ids) == 0:
        return SCHEMA.empty_table()
    label_of = _labels(run)
    base_labels = np.array([label_of.get(int(i), -1) for i in base_ids])
    pos = {int(i): p for p, i in enumerate(base_ids)}
    queries = np.unique(v_ids)
    if len(queries) > max_queries:  # seeded sample of the images whose views are measured
        queries = np.sort(np.random.default_rng(seed).choice(queries, max_queries, replace=False))
    keep = np.isin(v_ids, queries)
    v_ids, v_names, v_vecs = v_ids[keep], v_names[keep], v_vecs[keep]
    qpos = np.array([pos[int(i)] for i in v_ids])
    if metric == "cosine":
        # for unit vectors 1 - cos = ||a - b||^2 / 2: exactly 0 for an unchanged view, never negative
        twin_d = (0.5 * ((base[qpos] - v_vecs) ** 2).sum(1)).astype(np.float32)
    else:
        twin_d = exact_distances(base[qpos], v_vecs[:, None, :], metric)[:, 0]

    base_t = torch.from_numpy(base).to(device)
    base_sq = (base_t * base_t).sum(1)
    lab_t = torch.from_numpy(base_labels).to(device)
    rank = np.ones(len(v_ids), np.int64)
    other = np.full(len(v_ids), np.inf, np.float32)
    order = np.argsort(qpos, kind="stable")  # group each image's views together
    with torch.inference_mode():
        for lo in range(0, len(order), Q_BLOCK):
            rows = order[lo:lo + Q_BLOCK]
            q = base_t[torch.from_numpy(qpos[rows]).to(device)]
            qsq = (q * q).sum(1, keepdim=True)
            td = torch.from_numpy(twin_d[rows]).to(device)[:, None]
            self_pos = torch.from_numpy(qpos[rows]).to(device)[:, None]
            qlab = lab_t[self_pos[:, 0]][:, None]
            cnt = torch.zeros(len(rows), dtype=torch.int64, device=device)
            near = torch.full((len(rows),), float("inf"), device=device)
            for blo in range(0, len(base), B_CHUNK):
                b = base_t[blo:blo + B_CHUNK]
                if metric == "cosine":
                    d = 1.0 - q @ b.T
                else:
                    d = (qsq - 2.0 * (q @ b.T) + base_sq[blo:blo + B_CHUNK]).clamp_(min=0).sqrt_()
                idx = torch.arange(blo, blo + len(b), device=device)[None, :]
                not_self = idx != self_pos
                cnt += ((d < td) & not_self).sum(1)
                diff = lab_t[blo:blo + B_CHUNK][None, :] != qlab
                near = torch.minimum(near, torch.where(diff, d, torch.full_like(d, float("inf"))).min(1).values)
            rank[rows] = 1 + cnt.cpu().numpy()
            other[rows] = near.cpu().numpy()
    return pa.table({"layer": [name] * len(v_ids), "image_id": pa.array(v_ids, pa.int64()),
                     "view": pa.array(list(v_names), pa.string()), "feature_dist": pa.array(twin_d, pa.float32()),
                     "twin_rank": pa.array(rank), "nearest_other_dist": pa.array(other, pa.float32())}, schema=SCHEMA)


def write_twins(run: RunDir, meta: dict, max_queries: int, seed: int) -> dict:
    """Compute twins for every index layer that has perturbed views; skip those already done."""
    from .vectors import base_signature

    done, rows = 0, 0
    for entry in meta.get("index_layers", []):
        if not meta.get("views"):
            break
        folder = ("twins", layer_dir(entry["name"]))
        sig = {"base": base_signature(run, entry["features"], entry["metric"]), "views": meta["views"],
               "max_queries": max_queries, "seed": seed}
        marker = run.p(*folder, "_done.json")
        if run.parquet_files(*folder) and read_json(marker) == sig:
            continue
        table = twins_for_layer(run, entry, max_queries, seed)
        write_table_atomic(run.p(*folder, "part-00000.parquet"), table)
        write_json_atomic(marker, sig)
        done += 1
        rows += table.num_rows
    return {"twin_layers": done, "twin_rows": rows}
