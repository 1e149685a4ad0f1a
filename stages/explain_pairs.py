"""Explanation pairs: each perturbed view's explanation map against the original's, per method.

For every method in maps/ and every (image, view) with view != orig, from the stored maps (E the
original's map, E' the view's, R the original's map carried by the view's own shift or rotation:
the equivariance correction; R = E for views that move nothing):
  orig_l2             ||E||_2
  l1, l2              ||E - E'||_1, ||E - E'||_2 (Montavon's continuity, Quantus's Lipschitz and
                      sensitivities divide these)
  rel_l2              ||(E - E') / (E + (E == 0) * 1e-6)||_2: the numerator of the relative input and
                      output stabilities (Agarwal et al. 2022) as Quantus computes it
  pearson, spearman   correlation of the two maps over their cells (Spearman: average ranks of ties,
                      as scipy); NULL when a map is constant
  topk_iou            IoU of the `topk` % highest cells of each map (ties: the lower cell index first)
  *_eq                the same against R instead of E (equal to the uncorrected for a view that is
                      not geometric)
One output shard per maps shard: explain_pairs/<method>/part-NNNNN.parquet (the
`explanation_pairs` view); queries/explanation_continuity.sql turns them into the scores.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featscope.core.rundir import RunDir, read_json, read_table, write_json_atomic, write_table_atomic

EPS_MIN = 1e-6  # Quantus's eps_min
CHUNK = 256  # view rows compared at a time, on up to 4 threads (56 x 56 maps: ~6 MB per float64 array, ~15 arrays)

SCHEMA = pa.schema([("method", pa.string()), ("image_id", pa.int64()), ("view", pa.string()),
                    ("class", pa.int32()), ("geometric", pa.bool_()), ("cells", pa.int32()),
                    ("orig_l2", pa.float64()), ("l1", pa.float64()), ("l2", pa.float64()), ("rel_l2", pa.float64()),
                    ("pearson", pa.float64()), ("spearman", pa.float64()), ("topk_iou", pa.float64()),
                    ("l1_eq", pa.float64()), ("l2_eq", pa.float64()), ("pearson_eq", pa.float64()),
                    ("spearman_eq", pa.float64()), ("topk_iou_eq", pa.float64()), ("topk", pa.float64())])


def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of (n, cells) arrays; NaN where a row is constant."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), np.nan)


def order_and_ranks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise: the cells from highest to lowest (ties: lower index first) and each cell's
    ascending rank, ties given their average rank (scipy's rankdata): Spearman = Pearson of ranks.
    One stable sort per row serves both; on the stored float16 values numpy sorts by radix."""
    order = np.argsort(-a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, 1)
    n, c = a.shape
    new = np.ones((n, c), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]  # a tie group starts (each row starts one)
    group = np.cumsum(new.ravel()) - 1
    ordinal = np.tile(np.arange(c, 0, -1, dtype=np.float64), n)  # position p from the top: rank c - p
    mean = (np.bincount(group, weights=ordinal) / np.bincount(group))[group].reshape(n, c)
    rank = np.empty((n, c), dtype=np.float64)
    np.put_along_axis(rank, order, mean, axis=1)
    return order, rank


def top_mask(order: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(order.shape, dtype=bool)
    np.put_along_axis(mask, order[:, :k], True, axis=1)
    return mask


def iou(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    inter = (a & b).sum(1)
    return inter / (2 * k - inter)


def top_count(cells: int, percent: float) -> int:
    return max(1, min(cells, math.ceil(cells * percent / 100 - 1e-9)))


def compare(e: np.ndarray, v: np.ndarray, r: np.ndarray, geometric: np.ndarray, percent: float,
            scales: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Every figure of one chunk: e, v, r (n, cells) float16 as stored (orig, view, carried orig,
    each divided by its row's `scales`: ranks and top cells are the same either way); r equals e
    where `geometric` is False, so its ranks and top cells are only computed where it is not."""
    k = top_count(e.shape[1], percent)
    (order_e, rank_e), (order_v, rank_v) = order_and_ranks(e), order_and_ranks(v)
    top_e, top_v = top_mask(order_e, k), top_mask(order_v, k)
    rank_r, top_r = rank_e.copy(), top_e.copy()
    if geometric.any():
        order_g, rank_r[geometric] = order_and_ranks(r[geometric])
        top_r[geometric] = top_mask(order_g, k)
    e, v, r = (a.astype(np.float64) * sc.astype(np.float64)[:, None] for a, sc in zip((e, v, r), scales))
    d, dr = e - v, r - v
    return {"orig_l2": np.sqrt((e * e).sum(1)), "l1": np.abs(d).sum(1), "l2": np.sqrt((d * d).sum(1)),
            "rel_l2": np.sqrt(((d / (e + (e == 0) * EPS_MIN)) ** 2).sum(1)),
            "pearson": pearson(e, v), "spearman": pearson(rank_e, rank_v), "topk_iou": iou(top_e, top_v, k),
            "l1_eq": np.abs(dr).sum(1), "l2_eq": np.sqrt((dr * dr).sum(1)), "pearson_eq": pearson(r, v),
            "spearman_eq": pearson(rank_r, rank_v), "topk_iou_eq": iou(top_r, top_v, k)}


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    col = col.combine_chunks()
    size = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), size)  # float16, as stored


def pairs_for_shard(path: str, method: str, percent: float) -> pa.Table:
    t = read_table(path, columns=["image_id", "view", "class", "scale", "map", "ref_scale", "ref"])
    is_orig = pc.equal(t.column("view"), "orig")
    orig, views = t.filter(is_orig), t.filter(pc.invert(is_orig))
    if not views.num_rows or not orig.num_rows:
        return SCHEMA.empty_table()
    o_ids = orig.column("image_id").to_numpy()
    o_maps = _matrix(orig.column("map"))
    o_scale = orig.column("scale").to_numpy()
    pos = {int(i): p for p, i in enumerate(o_ids)}
    keep = np.array([int(i) in pos for i in views.column("image_id").to_numpy()])
    views = views.filter(pa.array(keep))
    ids = views.column("image_id").to_numpy()
    cells = o_maps.shape[1]
    out: dict[str, list] = {k: [] for k in SCHEMA.names if k not in ("method", "image_id", "view", "class",
                                                                        "geometric", "cells", "topk")}
    geometric = views.column("ref").is_valid().to_numpy(zero_copy_only=False)

    def one(lo: int) -> dict[str, np.ndarray]:
        chunk = views.slice(lo, CHUNK)
        rows = [pos[int(i)] for i in ids[lo:lo + CHUNK]]
        e, e_scale = o_maps[rows], o_scale[rows]
        v, v_scale = _matrix(chunk.column("map")), chunk.column("scale").to_numpy()
        g = geometric[lo:lo + CHUNK]
        r, r_scale = e.copy(), e_scale.copy()
        if g.any():
            refs = chunk.column("ref").combine_chunks()
            r[g] = _matrix(pa.chunked_array([refs.filter(pa.array(g))]))
            r_scale[g] = chunk.column("ref_scale").to_numpy(zero_copy_only=False)[g]
        return compare(e, v, r, g, percent, (e_scale, v_scale, r_scale))

    # numpy's sorts and reductions release the GIL: chunks are compared on every core
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        for figures in pool.map(one, range(0, views.num_rows, CHUNK)):
            for k, val in figures.items():
                out[k].append(val)
    n = views.num_rows
    cols = {"method": pa.array([method] * n, pa.string()), "image_id": pa.array(ids, pa.int64()),
            "view": views.column("view"), "class": views.column("class"), "geometric": pa.array(geometric),
            "cells": pa.array(np.full(n, cells, np.int32))}
    for k, parts in out.items():
        val = np.concatenate(parts)
        cols[k] = pa.array(val, pa.float64(), mask=np.isnan(val))
    cols["topk"] = pa.array(np.full(n, float(percent)))
    return pa.table(cols, schema=SCHEMA)


def write_pairs(run: RunDir, meta: dict, percent: float, progress=None) -> dict:
    """explain_pairs/<method>/ for every method with maps; a method already paired the same way is skipped."""
    from featscope.core.catalog import explanation_methods

    done, rows = 0, 0
    for method in explanation_methods(run):
        files = run.parquet_files("maps", method)
        if not files or not meta.get("views"):
            continue
        # the shards' extract stats change whenever a shard is extracted again (seconds, replica)
        extracted = [(s.get("shard"), s.get("seconds"), s.get("replica_pid")) for s in run.read_stats("extract")]
        sig = {"fingerprint": meta.get("fingerprint"), "topk": percent, "shards": [f.rsplit("/", 1)[-1] for f in files],
               "extracted": [list(e) for e in sorted(extracted, key=str)]}
        marker = run.p("explain_pairs", method, "_done.json")
        if run.parquet_files("explain_pairs", method) and read_json(marker) == sig:
            continue
        it = files if progress is None else progress(files, desc=f"explain pairs ({method})", unit="shard")
        for f in it:
            table = pairs_for_shard(f, method, percent)
            write_table_atomic(run.p("explain_pairs", method, f.rsplit("/", 1)[-1]), table)
            rows += table.num_rows
        write_json_atomic(marker, sig)
        done += 1
    return {"explain_methods": done, "explain_pair_rows": rows}
