"""Analyze: the deep search that precision@1 / R-precision / MAP@R need, the twins table of the
continuity measure (stages/twins.py), then every measure in queries/ into
`results/<measure>.parquet`.

Musgrave et al.'s R-precision and MAP@R look at the R = class size - 1 nearest images of each
query, far deeper than the kNN graph's k. So this stage runs its own exact search (blocked
torch matmul + topk, float64 so that the ranking is exact) for every image when there are at
most `deep_queries` images, else for a seeded sample of `deep_queries` images, down to depth
min(largest R, deep_k), and writes it as `knn_deep/<layer>/part-00000.parquet`: for each query
its min(R, deep_k) nearest, in the schema of knn/ plus `hit` (the neighbour carries the query's
label) and `hits` (the hits at this rank or nearer). Reference shards are streamed: memory holds
the queries' running top lists, not the dataset.

It also writes `knn_labels/<layer>/part-00000.parquet`: every knn edge with the query's label and
prediction and the neighbour's label, the join that knn_agreement.sql would otherwise make on
every connection.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featscope import queries
from featscope.core import catalog
from featscope.core.config import Config, UserError
from featscope.core.rundir import AtomicParquetWriter, layer_dir, read_json, read_table, RunDir, write_json_atomic, write_table_atomic

# knn/'s columns plus hit (the neighbour carries the query's label) and hits (the hits at this rank
# or nearer), each query down to its own R (capped at the depth). Stored here, where the labels are
# at hand, they spare knn_agreement.sql a join of ~10M deep edges to the images (~0.6 s of the
# 1M-image suite on 2 cores) and its per-query lists of hit ranks (~0.3 s): precision@1,
# R-precision and MAP@R are plain sums per query. knn_deep files written before them (every
# query to the same depth; no hit, or no hits) get both from the catalog view
# (featscope/core/catalog.py), cut at each query's R there.
DEEP_SCHEMA = pa.schema([("layer", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                         ("neighbor_id", pa.int64()), ("distance", pa.float32()), ("hit", pa.bool_()),
                         ("hits", pa.int32())])
DEEP_FORMAT = 2  # 1: every query to the same depth, without hits
# the knn edges with their labels (knn_agreement.sql's edges; the catalog's knn_labels view). The
# join of ~10M edges to the images twice cost ~1 s of the 1M-image suite on 2 cores, on every
# connection; made here once per knn. knn_labels/<layer>.json holds what it was made from
# (catalog.knn_labels_sources): the catalog reads the file only while those files are unchanged
LABELS_SCHEMA = pa.schema([("layer", pa.string()), ("query_id", pa.int64()), ("rank", pa.int32()),
                           ("distance", pa.float32()), ("label", pa.int32()), ("pred", pa.int32()),
                           ("neighbor_label", pa.int32())])
Q_BLOCK, R_CHUNK = 1024, 8192  # 1024 x 8192 float64 scores = 64 MB
SUMMARY_COLUMNS = ["layer", "agreement", "knn_accuracy", "map_at_r", "knn_auc", "global_auc",
                   "global_triplet_violation_rate", "continuity_accuracy"]


def _shards(run: RunDir, features: str):
    """(image_id int64 [n], vectors float32 [n, d]) of the `orig` view, one features shard at a time."""
    for f in run.parquet_files("features", layer_dir(features)):
        t = read_table(f, columns=["image_id", "view", "vec"])
        t = t.filter(pc.equal(t.column("view"), "orig"))
        if t.num_rows:
            col = t.column("vec").combine_chunks()
            dim = col.type.list_size if hasattr(col.type, "list_size") else len(col[0])
            yield t.column("image_id").to_numpy(), col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def _prepare(x: np.ndarray, metric: str):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return torch.nn.functional.normalize(t, dim=1) if metric == "cosine" else t


def deep_search(run: RunDir, features: str, metric: str, query_ids: np.ndarray, depth: int):
    """The `depth` nearest (self excluded) of each query: (neighbor ids, distances), nearest first."""
    import torch

    qids = np.sort(query_ids)
    wanted = np.zeros(len(qids), dtype=bool)
    qvecs = None
    for ids, vecs in _shards(run, features):  # pass 1: the queries' vectors
        pos = np.searchsorted(qids, ids).clip(max=len(qids) - 1)
        hit = qids[pos] == ids
        if qvecs is None:
            qvecs = np.zeros((len(qids), vecs.shape[1]), dtype=np.float32)
        qvecs[pos[hit]] = vecs[hit]
        wanted[pos[hit]] = True
    if qvecs is None or not wanted.all():
        raise UserError(f"knn_deep: some query images have no '{features}' vectors in {run.root}")
    q = _prepare(qvecs, metric)
    q_sq = (q * q).sum(1)
    q_id = torch.from_numpy(qids.copy())
    best_d = torch.full((len(qids), 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((len(qids), 0), dtype=torch.int64)
    for ids, vecs in _shards(run, features):  # pass 2: every reference shard once
        ref_all, rid_all = _prepare(vecs, metric), torch.from_numpy(ids.copy())
        for r0 in range(0, len(ids), R_CHUNK):
            ref, rid = ref_all[r0:r0 + R_CHUNK], rid_all[r0:r0 + R_CHUNK]
            ref_sq = (ref * ref).sum(1)
            new_d, new_i = [], []
            for q0 in range(0, len(qids), Q_BLOCK):
                qb = q[q0:q0 + Q_BLOCK]
                if metric == "cosine":
                    d = 1.0 - qb @ ref.T
                else:  # squared L2; the square root is taken once at the end
                    d = (q_sq[q0:q0 + Q_BLOCK, None] + ref_sq[None, :] - 2.0 * (qb @ ref.T)).clamp_min_(0)
                d[q_id[q0:q0 + Q_BLOCK, None] == rid[None, :]] = float("inf")  # self excluded
                kk = min(depth, d.shape[1])
                dv, di = torch.topk(d, kk, dim=1, largest=False)
                new_d.append(dv)
                new_i.append(rid[di])
            cat_d = torch.cat([best_d, torch.cat(new_d)], dim=1)
            cat_i = torch.cat([best_i, torch.cat(new_i)], dim=1)
            kk = min(depth, cat_d.shape[1])
            best_d, pos = torch.topk(cat_d, kk, dim=1, largest=False)
            best_i = torch.gather(cat_i, 1, pos)
    dist, nbr = best_d.numpy(), best_i.numpy()
    order = np.lexsort((nbr, dist), axis=1)  # nearest first, ties by image id: deterministic
    dist, nbr = np.take_along_axis(dist, order, 1), np.take_along_axis(nbr, order, 1)
    if metric != "cosine":
        dist = np.sqrt(dist)
    return qids, nbr, dist.astype(np.float32)




def write_deep_knn(run: RunDir, meta: dict, max_queries: int, max_depth: int, seed: int) -> dict:
    """knn_deep/ for every index layer; returns what was searched (sample, depth)."""
    images = read_table(run.p("images"), columns=["image_id", "label"])
    image_ids, image_labels = images.column("image_id").to_numpy(), images.column("label").to_numpy()
    label_of = dict(zip(image_ids, image_labels))
    by_id = np.argsort(image_ids)

    def labels(of_ids: np.ndarray) -> np.ndarray:
        return image_labels[by_id[np.searchsorted(image_ids, of_ids, sorter=by_id)]]

    info = {"deep_images": 0, "deep_queries": 0, "deep_k": 0, "deep_sample": "none"}
    for layer in meta.get("index_layers", []):
        name, features, metric = layer["name"], layer["features"], layer["metric"]
        ids = np.sort(np.concatenate([i for i, _ in _shards(run, features)] or [np.zeros(0, np.int64)]))
        classes, sizes = np.unique([label_of[i] for i in ids], return_counts=True)
        depth = int(min(sizes.max() - 1, max_depth)) if len(sizes) else 0
        sample = "all" if len(ids) <= max_queries else f"seeded sample (seed {seed})"
        query_ids = ids if len(ids) <= max_queries else \
            np.sort(np.random.default_rng(seed).choice(ids, max_queries, replace=False))
        info = {"deep_images": len(ids), "deep_queries": len(query_ids), "deep_k": depth, "deep_sample": sample}
        marker = run.p("knn_deep", layer_dir(name) + ".json")
        stamp = {"fingerprint": meta.get("fingerprint"), "features": features, "metric": metric, **info,
                 "format": DEEP_FORMAT}
        if run.parquet_files("knn_deep", layer_dir(name)) and read_json(marker) == stamp:
            continue  # already searched with the same settings
        path = run.p("knn_deep", layer_dir(name), "part-00000.parquet")
        if depth == 0:
            continue
        qids, nbr, dist = deep_search(run, features, metric, query_ids, depth)
        hit = labels(nbr.ravel()).reshape(nbr.shape) == labels(qids)[:, None]
        hits = np.cumsum(hit, axis=1, dtype=np.int32)
        r = np.minimum(sizes[np.searchsorted(classes, labels(qids))] - 1, depth)  # each query's R, capped
        ranks = np.arange(1, depth + 1, dtype=np.int32)
        writer = AtomicParquetWriter(path, DEEP_SCHEMA)
        try:
            for q0 in range(0, len(qids), 4096):
                keep = ranks[None, :] <= r[q0:q0 + 4096, None]
                n = int(keep.sum())
                writer.write(pa.table({
                    "layer": pa.array([name] * n, pa.string()),
                    "query_id": np.repeat(qids[q0:q0 + 4096], keep.sum(axis=1)),
                    "rank": np.broadcast_to(ranks, keep.shape)[keep],
                    "neighbor_id": nbr[q0:q0 + 4096][keep], "distance": dist[q0:q0 + 4096][keep],
                    "hit": hit[q0:q0 + 4096][keep], "hits": hits[q0:q0 + 4096][keep]},
                    schema=DEEP_SCHEMA))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_json_atomic(marker, stamp)
    return info


def write_knn_labels(run: RunDir) -> int:
    """knn_labels/ for every index layer whose file is missing or was made from other files;
    returns the edges written. The rows are the catalog's own fallback join."""
    meta = run.read_meta()
    todo = [k["name"] for k in meta.get("index_layers", [])
            if run.parquet_files("knn", layer_dir(k["name"]))
            and not (run.parquet_files("knn_labels", layer_dir(k["name"]))
                     and read_json(catalog.knn_labels_marker(run, k["name"])) == catalog.knn_labels_sources(run, k["name"]))]
    written = 0
    for name in todo:
        sources = catalog.knn_labels_sources(run, name)
        marker = catalog.knn_labels_marker(run, name)
        con = catalog.connect(run.path, locked=False)  # here knn_labels is the join (no file, or a stale one)
        rows = con.sql("SELECT * FROM knn_labels WHERE layer = $layer", params={"layer": name})
        writer = AtomicParquetWriter(run.p("knn_labels", layer_dir(name), "part-00000.parquet"), LABELS_SCHEMA)
        try:
            for batch in rows.to_arrow_reader(1 << 20):
                writer.write(pa.Table.from_batches([batch]).cast(LABELS_SCHEMA))
                written += batch.num_rows
        except BaseException:
            writer.abort()
            raise
        finally:
            con.close()
        writer.close()
        write_json_atomic(marker, sources)
    return written


def run(run_dir: RunDir, cfg: Config, progress) -> dict:
    t0 = time.perf_counter()
    meta = run_dir.read_meta()
    info = write_deep_knn(run_dir, meta, cfg.deep_queries, cfg.deep_k, cfg.seed)
    info["knn_labels_written"] = write_knn_labels(run_dir)
    from featscope.stages.twins import write_twins  # what the continuity measure reads (perturbed views)

    info.update(write_twins(run_dir, meta, cfg.continuity_queries, cfg.seed))
    from featscope.stages.explain_pairs import write_pairs  # what explanation_continuity reads

    info.update(write_pairs(run_dir, meta, cfg.explain_topk, progress))
    catalog.write_catalog(run_dir)
    con = catalog.connect(run_dir.path, locked=True)  # the results are written with pyarrow
    for measure in progress(list(queries.MEASURES), desc="analyze", unit="measure"):
        given = {"seed": cfg.seed} if any(p.name == "seed" for p in queries.params(measure)) else {}
        table = queries.run_measure(con, measure, given, meta)
        write_table_atomic(run_dir.p("results", measure + ".parquet"), table)
        if measure == "distance_histogram":  # its input (the pairs view, the sampled pairs): not needed again
            con.execute("DROP VIEW IF EXISTS results_class_distances_pairs")
            con.execute("DROP TABLE IF EXISTS results_class_distances_global")
    return {"measures": len(queries.MEASURES), "layers": len(meta.get("index_layers", [])), **info,
            "seconds": round(time.perf_counter() - t0, 2)}


def summary_rows(run_path: str) -> tuple[list[str], list[tuple]]:
    """The short table `featscope run` ends with: the headline figures of each layer."""
    run = RunDir(run_path)
    path = run.p("results", "layer_comparison.parquet")
    try:
        t = read_table(path)
    except FileNotFoundError:
        return SUMMARY_COLUMNS, []
    t = t.filter(pc.equal(t.column("kind"), "features")) if "kind" in t.column_names else t
    return SUMMARY_COLUMNS, list(zip(*[t.column(c).to_pylist() for c in SUMMARY_COLUMNS]))


EXPLANATION_COLUMNS = ["method", "n", "continuity_mean", "continuity_eq_mean", "spearman_eq_mean",
                       "topk_iou_eq_mean", "max_sensitivity", "local_lipschitz", "flip_rate"]


def explanation_rows(run_path: str) -> tuple[list[str], list[tuple]]:
    """Each explanation method over every view (explanation_continuity, view 'all'), most continuous
    first by the equivariance-corrected rank correlation."""
    try:
        t = read_table(RunDir(run_path).p("results", "explanation_continuity.parquet"))
    except FileNotFoundError:
        return EXPLANATION_COLUMNS, []
    rows = sorted((r for r in t.to_pylist() if r["view"] == "all"),
                  key=lambda r: -(r["spearman_eq_mean"] if r["spearman_eq_mean"] is not None else -2))
    return EXPLANATION_COLUMNS, [tuple(r[c] for c in EXPLANATION_COLUMNS) for r in rows]


CONTINUITY_COLUMNS = ["layer", "view", "lipschitz_mean", "twin_rank_mean", "continuity_accuracy", "flip_rate",
                      "cam_continuity_mean"]


def continuity_rows(run_path: str) -> tuple[list[str], list[tuple]]:
    """The continuity headline of each layer x view (scope 'all') for the run summary."""
    try:
        t = read_table(RunDir(run_path).p("results", "continuity.parquet"))
    except FileNotFoundError:
        return CONTINUITY_COLUMNS, []
    rows = [r for r in t.to_pylist() if r["scope"] == "all"]
    return CONTINUITY_COLUMNS, [tuple(r[c] for c in CONTINUITY_COLUMNS) for r in rows]


def deep_note(run_path: str) -> str:
    """One line that says which queries precision@1 / R-precision / MAP@R were computed on."""
    a = RunDir(run_path).read_meta().get("stages", {}).get("analyze", {})
    if not a.get("deep_queries"):
        return "precision@1, R-precision, MAP@R: not computed (no class has two images)"
    return (f"precision@1, R-precision, MAP@R: exact search, {a['deep_queries']} of {a['deep_images']} images "
            f"as queries ({a['deep_sample']}), R capped at {a['deep_k']}")
