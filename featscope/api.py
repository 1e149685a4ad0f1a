"""The Python API: the same pipeline, run directory and read-only queries as the command line.

    run = featscope.run(data="builtin:digits", out="runs/digits")      # -> Run
    run = featscope.open("runs/digits")
    run.sql("SELECT * FROM knn LIMIT 3")      # pyarrow Table (run.df(...) for pandas)
    run.measure("knn_agreement", k=5)         # as `featscope query RUN knn_agreement --param k=5`
    ids, vecs = run.embeddings("penultimate")        # int64 (N,), float32 (N, dim), straight from Parquet
    run.neighbors(image="some.png", layer="penultimate", k=5)
    featscope.compare(run_a, run_b)

Every error is a `featscope.UserError` with the one line the CLI prints; a run that fails its
checks leaves nothing behind, as on the command line. docs/python.md has the whole tour.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np
import pyarrow as pa

from .core.config import UserError, build_config

__all__ = ["Run", "run", "compare", "train"]  # and open, left out of * so it does not shadow the builtin


def _model_arg(model) -> tuple[str | None, Any]:
    """`model=` -> (config name, nn.Module object or None).

    A name stays a name. A function that can be imported by its qualified name becomes
    `module:qualname` (rebuilt on every Ray worker, recorded in run.json); any other callable (a
    lambda, a function of a notebook, a partial, a bound method) is called once here, under the
    fixed seed every model without weights is built with, and treated as the object it returns.
    """
    if model is None or isinstance(model, str):
        return model, None
    import torch

    if isinstance(model, torch.nn.Module):
        return f"object:{type(model).__name__}", model
    if not callable(model):
        raise UserError(f"model must be a name, an nn.Module or a callable returning one, not {type(model).__name__}")
    if _importable(model):
        return f"{model.__module__}:{model.__qualname__}", None
    what = getattr(model, "__qualname__", None) or type(model).__name__
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same network every time the same notebook cell runs
        try:
            obj = model()
        except Exception as exc:  # noqa: BLE001 - the user's code
            text = str(exc).strip().splitlines()
            raise UserError(f"model factory {what} raised {type(exc).__name__}"
                            f"{': ' + text[0] if text else ''}") from None
    if not isinstance(obj, torch.nn.Module):
        raise UserError(f"model factory {what} returned {type(obj).__name__}, not a torch nn.Module")
    return f"object:{type(obj).__name__}", obj


def _importable(fn) -> bool:
    """Whether `module:qualname` names this very function (what a Ray worker would import)."""
    import sys

    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not mod or not qual or mod == "__main__" or "<" in qual or mod not in sys.modules:
        return False
    obj = sys.modules[mod]
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj is fn  # a bound method or a partial names something else: called here instead


def _config(config_file, named: dict, keys: dict):
    # Python values take the path of command-line flags: the same coercion, checks and messages
    return build_config(config_file, {**keys, **{k: v for k, v in named.items() if v is not None}})


def run(data: str | None = None, model=None, layers=None, out: str | None = None, *, weights: str | None = None,
        config: str | None = None, quiet: bool = False, **keys) -> "Run":
    """Run the pipeline (as `featscope run`): every stage not finished yet; returns the Run.

    data, layers, out, weights and any config key (`k=5`, `perturb=["noise=0.05"]`, `stages=[...]`,
    `overwrite=True`, ...) as on the command line; `config`: a YAML file read first. `model`: a
    name (`resnet18`, `timm:resnet18`, `mypkg.nets:make`), an nn.Module, or a callable returning one.
    """
    from .pipeline.runner import run_pipeline

    name, module = _model_arg(model)
    if isinstance(layers, (list, tuple)):
        layers = ",".join(layers)
    cfg = _config(config, {"data": data, "model": name, "layers": layers, "out": out, "weights": weights}, keys)
    summary = run_pipeline(cfg, quiet=quiet, module=module)
    return Run(summary["run"], model=module)


def open(path: str, model=None) -> "Run":  # noqa: A001 - featscope.open(RUN) reads as intended
    """A finished (or partly finished) run. `model`: the nn.Module a run made from an object was
    made with (or a callable returning it), needed only to embed new images (`neighbors(image=...)`)."""
    _, module = _model_arg(model) if model is not None and not isinstance(model, str) else (None, None)
    if isinstance(model, str):
        raise UserError("featscope.open(model=...) takes the nn.Module a run was made from; a named model "
                        "is rebuilt from run.json")
    return Run(path, model=module)


def compare(*runs, measure: str = "layer_comparison", html: str | None = None, **params) -> pa.Table:
    """One measure of several runs side by side, with deltas against the first (`featscope compare`);
    `html`: also write the runs' reports side by side to that file (`--html`)."""
    from .queries.compare import compare as _compare

    paths = [r.path if isinstance(r, Run) else str(r) for r in runs]
    columns, rows = _compare(paths, measure, _params(params))
    if html:
        from .stages.report.compare import write_compare

        write_compare(paths, html)
    return pa.Table.from_pylist([dict(zip(columns, r)) for r in rows]) if rows else \
        pa.table({c: pa.array([], pa.null()) for c in columns})


def train(data: str, model: str, out: str, *, quiet: bool = False, **keys) -> dict:
    """Train a model with cross-entropy and save a checkpoint (`featscope train`): its metrics."""
    from .core.progress import set_quiet
    from .pipeline.runner import train_checkpoint

    name, module = _model_arg(model)
    if module is not None:
        raise UserError("featscope.train takes a model name or package.module:factory, not an object")
    set_quiet(quiet)
    return train_checkpoint(_config(None, {"data": data, "model": name}, keys), out)


def _params(params: dict) -> dict:
    return {k: (str(v) if v is not None else None) for k, v in params.items()}


def measure_table(path: str, name: str, params: dict | None = None, rows: bool = False):
    """One measure over a run, read-only (the connection is confined to the run): `featscope query`.
    A pyarrow Table, or with rows=True (columns, rows of Python values) as the CLI prints them."""
    import duckdb

    from . import queries
    from .core.catalog import connect
    from .core.rundir import RunDir

    queries.sql_path(name)  # an unknown measure fails before the run is opened
    con = connect(path, locked=True)
    try:
        rel = queries.relation(con, name, params or {}, RunDir(path).read_meta())
        return (rel.columns, rel.fetchall()) if rows else rel.fetch_arrow_table()
    except duckdb.Error as exc:
        raise UserError(f"{name}: SQL error: {str(exc).splitlines()[0]}") from None


def sql_table(path: str, query: str) -> pa.Table | None:
    """A read-only query over the run's catalog (`featscope sql`); None for a statement with no rows."""
    from .core.catalog import connect, read_only_query

    rel = read_only_query(connect(path), query)
    if rel is None:
        return None
    try:
        return rel.fetch_arrow_table()
    except Exception as exc:  # noqa: BLE001 - errors raised while fetching
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None


class Run:
    """A run directory: its tables, measures, vectors and lookups, read-only."""

    def __init__(self, path: str, model=None):
        from .core.rundir import RunDir

        self._dir = RunDir(str(path))
        if not self._dir.exists():
            raise UserError(f"not a featscope run (no run.json): {path}")
        self.path = self._dir.path
        self._model = model

    # ---- what it is ------------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """run.json: config, versions, fingerprints, per-stage status (read afresh)."""
        return self._dir.read_meta()

    @property
    def layers(self) -> list[str]:
        """The vector sets with an index and a kNN graph (`conv`, `penultimate:cosine`, ...)."""
        return [e["name"] for e in self.meta.get("index_layers", [])]

    def status(self) -> pa.Table:
        """Per stage: status, finished shards, shards the last invocation computed, rows, errors, seconds."""
        from .pipeline.status import COLUMNS, status_rows

        rows = status_rows(self.path)
        return pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)})

    # ---- SQL ----------------------------------------------------------------------------------
    def sql(self, query: str) -> pa.Table:
        """A read-only query over the catalog views (as `featscope sql`), as a pyarrow Table."""
        table = sql_table(self.path, query)
        return table if table is not None else pa.table({})

    def df(self, query: str):
        """The same as a pandas DataFrame (needs pandas)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise UserError("Run.df needs pandas: pip install pandas (or use Run.sql, a pyarrow Table)") from None
        return self.sql(query).to_pandas()

    def measure(self, name: str, **params) -> pa.Table:
        """One measure of queries/ (knn_agreement, class_distances, per_class, suspicious,
        continuity, explanation_continuity, layer_comparison, ...) with its parameters (layer=...,
        k=..., method=..., view=...)."""
        return measure_table(self.path, name, _params(params))

    # ---- the report ------------------------------------------------------------------------------
    def report(self, out: str | None = None, **settings) -> str:
        """Write the run's offline HTML report (as `featscope report`; default RUN/report/index.html)
        and return its path. settings: report_points, report_thumbnails, report_queries, report_umap_points,
        seed."""
        from .stages.report import report_settings, write_run_report

        given = report_settings([f"{k}={v}" for k, v in settings.items()])
        return write_run_report(self.path, out, given)["path"]

    # ---- vectors and images --------------------------------------------------------------------
    def embeddings(self, layer: str | None = None, view: str = "orig") -> tuple[np.ndarray, np.ndarray]:
        """(image ids int64 (N,), vectors float32 (N, dim)) of one layer (default: the run's first)
        and view, sorted by id, read from the Parquet shards as arrays (no Python rows)."""
        import pyarrow.compute as pc

        from .core.rundir import parquet_dataset
        from .stages.vectors import feature_files, vec_matrix

        entries = {e["name"]: e["features"] for e in self.meta.get("index_layers", [])}
        known = [l["name"] for l in self.meta.get("layers", [])]
        layer = layer or (known[0] if known else "conv")
        features = entries.get(layer, layer)
        if features not in known:
            raise UserError(f"unknown layer '{layer}' (this run has: {', '.join(known)})")
        t = parquet_dataset(feature_files(self._dir, features)).to_table(
            columns=["image_id", "vec"], filter=pc.field("view") == view)
        if t.num_rows == 0:
            views = ["orig"] + list(self.meta.get("views", []))
            raise UserError(f"no vectors for view '{view}' in layer '{features}' (views: {', '.join(views)})")
        vecs, ids = vec_matrix(t), t.column("image_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        return ids[order], np.ascontiguousarray(vecs[order], dtype=np.float32)

    def neighbors(self, image_id: int | None = None, image=None, layer: str | None = None, k: int = 10) -> pa.Table:
        """The k nearest images to a run's image (by id, itself excluded) or to a new image (a path,
        bytes, a PIL image or a uint8 array, embedded with the run's own model), in one layer."""
        from .stages.neighbors import COLUMNS, neighbors

        rows = neighbors(self.path, image_id=image_id, image_file=image, layer=layer, k=k, module=self._model)
        return pa.table({c: [r.get(c) for r in rows] for c in COLUMNS})

    def images(self, ids) -> list:
        """The stored images (PIL, RGB as the model saw them before resizing), in the order of `ids`."""
        import pyarrow.compute as pc

        from .core.rundir import parquet_dataset
        from .stages.images import decode_rgb

        ids = [int(i) for i in np.atleast_1d(np.asarray(ids))]
        files = self._dir.parquet_files("images")
        if not files:
            raise UserError(f"{self.path} has no images: run the ingest stage first")
        t = parquet_dataset(files).to_table(columns=["image_id", "bytes"],
                                            filter=pc.field("image_id").isin(pa.array(ids, pa.int64())))
        found = dict(zip(t.column("image_id").to_pylist(), t.column("bytes").to_pylist()))
        missing = [i for i in ids if i not in found]
        if missing:
            raise UserError(f"unknown image id {missing[0]} in {self.path}")
        from PIL import Image

        return [Image.fromarray(decode_rgb(found[i]).permute(1, 2, 0).numpy()) for i in ids]

    # ---- notebooks --------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"featscope.Run({self.path!r})"

    def _repr_html_(self) -> str:
        meta, e = self.meta, html.escape
        cfg, ds = meta.get("config", {}), meta.get("dataset", {})
        stages = meta.get("stages", {})
        done = [s for s, info in stages.items() if info.get("status") == "done"]
        kind = (meta.get("model") or {}).get("kind")
        weights = cfg.get("weights") or ("trained on the spot (model/)" if "train" in done else
                                         "the given nn.Module's" if kind == "object" else "none (seeded)")
        rows = [("run", self.path), ("model", cfg.get("model")), ("weights", weights),
                ("data", ds.get("source")), ("images", (stages.get("ingest") or {}).get("rows")),
                ("classes", len(ds.get("classes") or [])), ("layers", ", ".join(self.layers)),
                ("views", ", ".join(["orig"] + list(meta.get("views", [])))), ("stages done", ", ".join(done))]
        body = "".join(f"<tr><th style='text-align:left'>{e(str(k))}</th><td style='text-align:left'>{e(str(v))}</td></tr>"
                       for k, v in rows)
        return f"<table><caption>featscope run</caption>{body}</table>"
