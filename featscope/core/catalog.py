"""catalog.sql: the DuckDB views over a run directory, and read-only connections to it.

Views: images, layers, predictions, embeddings (vec as FLOAT[] for every layer), explanations
(method, image_id, view, class, height, width, map, ref: every explanation method's maps),
explanation_pairs (the analyze stage's comparisons of each view's map with the original's), one
`embeddings_<layer>` view per layer with vec cast back to FLOAT[dim] (Parquet loses the
fixed-size-list length) so that array_distance / array_cosine_distance work, cams, knn,
knn_deep (the analyze stage's deeper search for a sample of queries), knn_labels (every knn edge
with the query's label and prediction and the neighbour's label), index_layers (layer,
features, metric, pooling, dim: what each knn `layer` value is) and errors. Paths are
absolute, so `duckdb -init RUN/catalog.sql` works from any directory; featscope regenerates
the file whenever it writes the run (and in memory on every connection, so a moved run still
works).
"""
from __future__ import annotations

import os
import re
from urllib.parse import unquote

import duckdb

from .config import UserError
from .rundir import RunDir, file_stamp, join, layer_dir, read_json, read_schema

_EMPTY = {
    "images": "SELECT NULL::BIGINT AS image_id, NULL::VARCHAR AS uri, NULL::INTEGER AS label, "
              "NULL::VARCHAR AS label_name, NULL::VARCHAR AS split, NULL::INTEGER AS width, NULL::INTEGER AS height",
    "predictions": "SELECT NULL::BIGINT AS image_id, NULL::VARCHAR AS view, NULL::INTEGER AS pred, NULL::FLOAT AS prob",
    "embeddings": "SELECT NULL::VARCHAR AS layer, NULL::BIGINT AS image_id, NULL::VARCHAR AS view, NULL::FLOAT[] AS vec",
    "knn": "SELECT NULL::VARCHAR AS layer, NULL::BIGINT AS query_id, NULL::INTEGER AS rank, "
           "NULL::BIGINT AS neighbor_id, NULL::FLOAT AS distance",
    "knn_deep": "SELECT NULL::VARCHAR AS layer, NULL::BIGINT AS query_id, NULL::INTEGER AS rank, "
                "NULL::BIGINT AS neighbor_id, NULL::FLOAT AS distance, NULL::BOOLEAN AS hit, NULL::INTEGER AS hits",
    "knn_labels": "SELECT NULL::VARCHAR AS layer, NULL::BIGINT AS query_id, NULL::INTEGER AS rank, "
                  "NULL::FLOAT AS distance, NULL::INTEGER AS label, NULL::INTEGER AS pred, NULL::INTEGER AS neighbor_label",
    "index_layers": "SELECT NULL::VARCHAR AS layer, NULL::VARCHAR AS features, NULL::VARCHAR AS metric, "
                    "NULL::VARCHAR AS pooling, NULL::INTEGER AS dim",
    "errors": "SELECT NULL::VARCHAR AS uri, NULL::VARCHAR AS stage, NULL::VARCHAR AS error, NULL::VARCHAR AS message",
    "perturbations": "SELECT NULL::BIGINT AS image_id, NULL::VARCHAR AS view, NULL::FLOAT AS input_dist, "
                     "NULL::FLOAT AS input_rel_dist, NULL::FLOAT AS logit_dist",
    "explanations": "SELECT NULL::VARCHAR AS method, NULL::BIGINT AS image_id, NULL::VARCHAR AS view, "
                    "NULL::INTEGER AS class, NULL::INTEGER AS height, NULL::INTEGER AS width, NULL::FLOAT[] AS map, "
                    "NULL::FLOAT[] AS ref",
    "explanation_pairs": "SELECT " + ", ".join(
        f"NULL::{t} AS {c}" for c, t in [("method", "VARCHAR"), ("image_id", "BIGINT"), ("view", "VARCHAR"),
                                         ("class", "INTEGER"), ("geometric", "BOOLEAN"), ("cells", "INTEGER"),
                                         ("orig_l2", "DOUBLE"), ("l1", "DOUBLE"), ("l2", "DOUBLE"),
                                         ("rel_l2", "DOUBLE"), ("pearson", "DOUBLE"), ("spearman", "DOUBLE"),
                                         ("topk_iou", "DOUBLE"), ("l1_eq", "DOUBLE"), ("l2_eq", "DOUBLE"),
                                         ("pearson_eq", "DOUBLE"), ("spearman_eq", "DOUBLE"),
                                         ("topk_iou_eq", "DOUBLE"), ("topk", "DOUBLE")]),
    "twins": "SELECT NULL::VARCHAR AS layer, NULL::BIGINT AS image_id, NULL::VARCHAR AS view, "
             "NULL::FLOAT AS feature_dist, NULL::BIGINT AS twin_rank, NULL::FLOAT AS nearest_other_dist",
    "cams": "SELECT NULL::BIGINT AS image_id, NULL::VARCHAR AS view, NULL::INTEGER AS class, NULL::INTEGER AS height, "
            "NULL::INTEGER AS width, NULL::FLOAT[] AS cam",
}


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def view_name(layer: str) -> str:
    return "embeddings_" + re.sub(r"[^0-9a-zA-Z]+", "_", layer).strip("_")


def _glob(run: RunDir, *parts: str) -> str | None:
    return _lit(join(run.p(*parts), "*.parquet")) if run.parquet_files(*parts) else None


def _deep_select(run: RunDir, layer: str) -> str:
    """One layer's knn_deep rows, each query down to its R (class size - 1, capped at the depth),
    with hit (the neighbour carries the query's label) and hits (the hits at this rank or
    nearer), as the analyze stage stores them; files written before it stored them list every
    query to the same depth, and this view computes what they lack and cuts each query at its R."""
    g = _glob(run, "knn_deep", layer_dir(layer))
    have = set(read_schema(sorted(run.parquet_files("knn_deep", layer_dir(layer)))[0]).names)
    if "hits" in have:
        return f"SELECT layer, query_id, rank, neighbor_id, distance, hit, hits FROM read_parquet({g})"
    hit = "d.hit" if "hit" in have else "nb.label = q.label"
    neighbour = "" if "hit" in have else "JOIN images nb ON nb.image_id = d.neighbor_id "
    return (f"SELECT d.layer, d.query_id, d.rank, d.neighbor_id, d.distance, {hit} AS hit, "
            f"(sum(({hit})::INTEGER) OVER (PARTITION BY d.query_id ORDER BY d.rank))::INTEGER AS hits "
            f"FROM read_parquet({g}) d JOIN images q ON q.image_id = d.query_id {neighbour}"
            f"JOIN (SELECT i.label, count(*) AS size FROM predictions p JOIN images i USING (image_id) "
            f"WHERE p.view = 'orig' GROUP BY i.label) cs ON cs.label = q.label "
            f"WHERE d.rank < cs.size")


def knn_labels_sources(run: RunDir, layer: str) -> dict:
    """What one layer's knn_labels/ file was made from: the (name, size, mtime) of the knn files,
    the images files and the predictions' files (the first layer with features, as the
    `predictions` view reads). The analyze stage stores it beside the file; the catalog uses the
    file only while this is unchanged."""
    meta = run.read_meta()
    first = next((l["name"] for l in meta.get("layers", []) if run.parquet_files("features", layer_dir(l["name"]))), None)
    parts = {"knn": ("knn", layer_dir(layer)), "images": ("images",),
             "predictions": ("features", layer_dir(first)) if first else None}
    return {what: [[f.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1], *file_stamp(f)] for f in sorted(run.parquet_files(*where))]
            if where else [] for what, where in parts.items()}


def knn_labels_marker(run: RunDir, layer: str) -> str:
    return run.p("knn_labels", layer_dir(layer) + ".json")


def _labels_select(run: RunDir, layer: str) -> str:
    """One layer's knn edges with the query's label and prediction and the neighbour's label: the
    analyze stage's knn_labels/ file while it matches the knn, images and predictions files it was
    made from, else the same join here (runs from before the file, or a knn stage run again)."""
    stored = _glob(run, "knn_labels", layer_dir(layer))
    if stored and read_json(knn_labels_marker(run, layer)) == knn_labels_sources(run, layer):
        return f"SELECT layer, query_id, rank, distance, label, pred, neighbor_label FROM read_parquet({stored})"
    return (f"SELECT e.layer, e.query_id, e.rank, e.distance, q.label, p.pred, nb.label AS neighbor_label "
            f"FROM read_parquet({_glob(run, 'knn', layer_dir(layer))}) e "
            f"JOIN images q ON q.image_id = e.query_id "
            f"LEFT JOIN predictions p ON p.image_id = e.query_id AND p.view = 'orig' "
            f"JOIN images nb ON nb.image_id = e.neighbor_id")


def catalog_sql(run: RunDir) -> str:
    meta = run.read_meta()
    layers = meta.get("layers", [])
    out = [f"-- featscope catalog for {run.root}", "-- open with: duckdb -init " + run.p("catalog.sql"), ""]
    if not run.local:  # the plain DuckDB CLI reads object storage through its httpfs extension
        out[2:2] = ["-- (a run on object storage: in the DuckDB CLI first `INSTALL httpfs; LOAD httpfs;` and a",
                    "-- `CREATE SECRET` for the bucket; featscope's own commands need neither)"]

    def view(name: str, body: str | None) -> None:
        out.append(f"CREATE OR REPLACE VIEW {name} AS {body if body else _EMPTY[name] + ' WHERE false'};")

    g = _glob(run, "images")
    view("images", g and f"SELECT image_id, uri, label, label_name, split, width, height FROM read_parquet({g})")
    if layers:
        rows = ", ".join(f"({_lit(l['name'])}, {_lit(l['alias'])}, {_lit(l['node'])}, {l['dim']}, {_lit(l['pooling'])})"
                         for l in layers)
        out.append(f"CREATE OR REPLACE VIEW layers AS SELECT * FROM (VALUES {rows}) t(layer, alias, node, dim, pooling);")
    else:
        out.append("CREATE OR REPLACE VIEW layers AS SELECT NULL::VARCHAR AS layer, NULL::VARCHAR AS alias, "
                   "NULL::VARCHAR AS node, NULL::INTEGER AS dim, NULL::VARCHAR AS pooling WHERE false;")
    present = [(l, _glob(run, "features", layer_dir(l["name"]))) for l in layers]
    present = [(l, g) for l, g in present if g]
    for l, g in present:
        out.append(f"CREATE OR REPLACE VIEW {view_name(l['name'])} AS SELECT {_lit(l['name'])} AS layer, image_id, view, "
                   f"vec::FLOAT[{l['dim']}] AS vec FROM read_parquet({g});")
    view("embeddings", " UNION ALL ".join(
        f"SELECT {_lit(l['name'])} AS layer, image_id, view, vec::FLOAT[] AS vec FROM read_parquet({g})"
        for l, g in present) or None)
    view("predictions", present and f"SELECT image_id, view, pred, prob FROM read_parquet({present[0][1]})")
    # explanation maps, one folder per method (stages/explain/); `cams` is the CAM's, as it always was
    methods = [m for m in explanation_methods(run) if run.parquet_files("maps", m)]
    # (stored divided by their peak |value| as float16: multiplied back here, stages/extract.py)
    unscaled = ("list_transform(map::FLOAT[], lambda x: x * scale) AS map, "
                "list_transform(ref::FLOAT[], lambda x: x * ref_scale) AS ref")
    view("explanations", " UNION ALL ".join(
        f"SELECT {_lit(m)} AS method, image_id, view, class, height, width, {unscaled} "
        f"FROM read_parquet({_glob(run, 'maps', m)})" for m in methods) or None)
    g = _glob(run, "maps", "cam")
    if g:
        g = (f"SELECT image_id, view, class, height, width, list_transform(map::FLOAT[], lambda x: x * scale) AS cam "
             f"FROM read_parquet({g})")
    elif run.parquet_files("maps", "conv") and "cam" in read_schema(sorted(run.parquet_files("maps", "conv"))[0]).names:
        # a run extracted before the explanation methods kept its CAMs (float32) in maps/conv/
        g = f"SELECT image_id, view, class, height, width, cam::FLOAT[] AS cam FROM read_parquet({_glob(run, 'maps', 'conv')})"
    view("cams", g)
    # the analyze stage's per-(image, view) comparisons of each method's maps (stages/explain_pairs.py)
    paired = [m for m in methods if run.parquet_files("explain_pairs", m)]
    view("explanation_pairs", " UNION ALL ".join(
        f"SELECT * FROM read_parquet({_glob(run, 'explain_pairs', m)})" for m in paired) or None)
    g = _glob(run, "views")  # one row per (image, perturbed view): ||x - x'||_2 in the model's input space
    if g:  # (views files written before the relative stabilities, or by hand, lack their two columns)
        have = set(read_schema(sorted(run.parquet_files("views"))[0]).names)
        extra = ", ".join(c if c in have else f"NULL::FLOAT AS {c}" for c in ("input_rel_dist", "logit_dist"))
        g = f"SELECT image_id, view, input_dist, {extra} FROM read_parquet({g})"
    view("perturbations", g)
    knn_layers = [k["name"] for k in meta.get("index_layers", []) if run.parquet_files("knn", layer_dir(k["name"]))]
    view("knn", " UNION ALL ".join(
        f"SELECT layer, query_id, rank, neighbor_id, distance FROM read_parquet({_glob(run, 'knn', layer_dir(k))})"
        for k in knn_layers) or None)
    # the labels of every knn edge's two ends (knn_agreement.sql's edges), stored by the analyze stage
    view("knn_labels", " UNION ALL ".join(_labels_select(run, k) for k in knn_layers) or None)
    # the deep search of the analyze stage (precision@1, R-precision, MAP@R need R = class size - 1 neighbours)
    deep_layers = [k["name"] for k in meta.get("index_layers", []) if run.parquet_files("knn_deep", layer_dir(k["name"]))]
    view("knn_deep", " UNION ALL ".join(_deep_select(run, k) for k in deep_layers) or None)
    # index layers: one vector set x one metric, the `layer` value of knn and of every measure
    dims = {l["name"]: (l["pooling"], l["dim"]) for l in layers}
    rows = ", ".join(f"({_lit(k['name'])}, {_lit(k['features'])}, {_lit(k['metric'])}, "
                     f"{_lit(dims.get(k['features'], ('', 0))[0])}, {dims.get(k['features'], ('', 0))[1]})"
                     for k in meta.get("index_layers", []))
    view("index_layers", rows and f"SELECT * FROM (VALUES {rows}) t(layer, features, metric, pooling, dim)")
    twin_layers = [k["name"] for k in meta.get("index_layers", []) if run.parquet_files("twins", layer_dir(k["name"]))]
    view("twins", " UNION ALL ".join(
        f"SELECT layer, image_id, view, feature_dist, twin_rank, nearest_other_dist "
        f"FROM read_parquet({_glob(run, 'twins', layer_dir(k))})" for k in twin_layers) or None)
    g = _glob(run, "errors")
    view("errors", g and f"SELECT uri, stage, error, message FROM read_parquet({g})")
    # figures that queries/*.sql kept in this session are of the views read before: forget them
    # (in the CLI a user may read another run's catalog.sql into the same session)
    out += ["SET VARIABLE knn_agreement_params = NULL;", "SET VARIABLE class_distances_params = NULL;",
            "SET VARIABLE continuity_params = NULL;", "SET VARIABLE explanation_continuity_params = NULL;"]
    return "\n".join(out) + "\n"


def explanation_methods(run: RunDir) -> list[str]:
    """The run's explanation methods (run.json), in the order they were asked for."""
    from featscope.core.config import EXPLAIN_METHODS

    listed = run.read_meta().get("explain")
    return [m for m in (listed if listed is not None else EXPLAIN_METHODS) if m in EXPLAIN_METHODS]


def write_catalog(run: RunDir) -> str:
    from .rundir import write_file_atomic

    text = catalog_sql(run)
    path = run.p("catalog.sql")

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    write_file_atomic(path, write)
    return path


def connect(run_path: str, locked: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views; `locked`: confined to the run, read-only."""
    run = RunDir(run_path)
    if not run.exists():
        raise UserError(f"not a featscope run (no run.json): {run_path}")
    con = duckdb.connect(":memory:")
    if not run.local:  # DuckDB reads the run's URIs through pyarrow's client, wrapped as fsspec
        from .storage import fsspec_for_duckdb

        con.register_filesystem(fsspec_for_duckdb(run.source))
    con.execute(catalog_sql(run))
    if locked:
        roots = [run.root + os.sep] if run.local else \
            list(dict.fromkeys([run.root + "/", unquote(run.root) + "/"]))  # DuckDB asks for s3://b/my run/...
        con.execute(f"SET allowed_directories=[{', '.join(_lit(r) for r in roots)}]")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
    return con


_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


def read_only_query(con: duckdb.DuckDBPyConnection, sql: str):
    """Run one user query; anything but SELECT/EXPLAIN (COPY, ATTACH, INSTALL, SET, ...) is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise UserError("no SQL statement given")
    bad = [s for s in statements if s.type not in _ALLOWED]
    if bad:
        raise UserError(f"featscope sql runs queries only; refused a {bad[0].type.name} statement")
    try:
        for s in statements[:-1]:
            con.execute(s.query)
        return con.sql(statements[-1].query)
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None
