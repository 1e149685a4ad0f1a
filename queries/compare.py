"""`featscope compare RUN_A RUN_B ...`: one measure of several runs side by side, with deltas.

Rows are matched on the measure's key (layer; layer and scope; layer and class), one output
row per key and figure: the figure in each run, then each later run minus the first. A run's
stored `results/<measure>.parquet` is used when no --param is given; otherwise (or when the
analyze stage has not run) the measure is computed, read-only.
"""
from __future__ import annotations

import math
import os


from featscope.core.config import UserError
from featscope.core.rundir import RunDir, exists, read_table

from . import MEASURES, run_measure

KEYS = {"knn_agreement": ("layer", "scope"), "class_distances": ("layer", "scope"),
        "per_class": ("layer", "class"), "continuity": ("layer", "view", "scope"), "layer_comparison": ("layer",),
        "explanation_continuity": ("method", "view")}
NOT_FIGURES = {"dim", "topk"}  # numeric columns that describe the row rather than measure it


def run_labels(paths: list[str]) -> list[str]:
    """Short unique names for the runs: the folder name, or more of the path where those repeat."""
    paths = [p.split("?", 1)[0] if "://" in p else p for p in paths]  # a URI's query holds options, not names
    labels = [p.rstrip("/").rsplit("/", 1)[-1] if "://" in p else os.path.basename(os.path.abspath(p).rstrip(os.sep))
              for p in paths]
    if len(set(labels)) < len(labels):
        labels = [p if "://" in p else os.path.relpath(os.path.abspath(p)) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{l}#{i + 1}" for i, l in enumerate(labels)]
    return labels


def _table(path: str, measure: str, given: dict):
    from featscope.core.catalog import connect

    run = RunDir(path)
    if not run.exists():
        raise UserError(f"not a featscope run (no run.json): {path}")
    stored = run.p("results", measure + ".parquet")
    if not given and exists(stored):
        return read_table(stored).to_pylist()
    return run_measure(connect(path, locked=True), measure, given, run.read_meta()).to_pylist()


def compare(paths: list[str], measure: str = "layer_comparison", given: dict | None = None):
    """(columns, rows) of the side-by-side table."""
    if measure not in MEASURES:
        raise UserError(f"unknown measure '{measure}' (measures: {', '.join(MEASURES)})")
    if measure not in KEYS:
        raise UserError(f"{measure} lists images, not figures: compare runs with "
                        f"{', '.join(KEYS)}; look at it with `featscope query RUN {measure}`")
    if len(paths) < 2:
        raise UserError("compare needs at least two runs")
    keys, labels = KEYS[measure], run_labels(paths)
    tables = [{tuple(r[k] for k in keys): r for r in _table(p, measure, given or {})} for p in paths]
    order = list(dict.fromkeys(k for t in tables for k in t))
    sample = next(r for t in tables for r in t.values()) if order else {}
    figures = [c for c, v in sample.items() if c not in keys and c not in NOT_FIGURES
               and (isinstance(v, (int, float)) and not isinstance(v, bool) or v is None)]
    columns = list(keys) + ["figure"] + labels + [f"delta_{l}" for l in labels[1:]]
    rows = []
    for key in order:
        for fig in figures:
            values = [t.get(key, {}).get(fig) for t in tables]
            if all(v is None for v in values):
                continue  # a figure this row has in no run (layer_comparison's explanation rows: no kNN figures)
            deltas = [_delta(v, values[0]) for v in values[1:]]
            rows.append(key + (fig,) + tuple(values) + tuple(deltas))
    return columns, rows


def _delta(v, base):
    if v is None or base is None or (isinstance(v, float) and math.isnan(v)) or \
            (isinstance(base, float) and math.isnan(base)):
        return None
    return v - base
