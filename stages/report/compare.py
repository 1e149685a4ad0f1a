"""`featscope compare RUN_A RUN_B ... --html FILE`: the runs' reports side by side, with deltas
against the first run: summaries, the layer comparison and continuity tables of
queries/compare.py (the same rows `featscope compare` prints), ROC curves overlaid and
distance histograms and maps per run, for every layer the runs share."""
from __future__ import annotations

import os
import time

import numpy as np

from featscope.core.rundir import write_file_atomic

from . import HIGHER, LOWER, figures, page
from .data import RunData


def _delta_cells(columns, row) -> str:
    """A compare row as cells; a delta is green where it is better, red where worse."""
    fig = row[columns.index("figure")]
    out = []
    for c, v in zip(columns, row):
        if c.startswith("delta_") and isinstance(v, (int, float)) and v and fig in HIGHER | LOWER:
            better = (v > 0) == (fig in HIGHER)
            style = "background:#e6f4ea" if better else "background:#fde7e7"
            out.append(page.cell(v).replace("<td ", f'<td style="{style}" ', 1))
        else:
            out.append(page.cell(v))
    return "<tr>" + "".join(out) + "</tr>"


def _compare_table(columns, rows, table_id: str) -> str:
    head = "".join(f"<th>{page.esc(c)}</th>" for c in columns)
    body = "".join(_delta_cells(columns, r) for r in rows)
    return f'<div class="scroll"><table id="{page.esc(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def write_compare(paths: list[str], out_file: str) -> str:
    from featscope.queries.compare import compare, run_labels

    runs = [RunData(p) for p in paths]
    labels = run_labels(paths)
    sections = []

    # 1. summaries side by side
    summaries = [dict(r.summary()) for r in runs]
    fields = list(dict.fromkeys(k for s in summaries for k in s))
    body = "<table id=\"summary-table\"><thead><tr><th></th>" + "".join(f"<th>{page.esc(l)}</th>" for l in labels) + \
        "</tr></thead><tbody>" + "".join(
            f"<tr><th>{page.esc(f)}</th>" + "".join(page.cell(s.get(f)) for s in summaries) + "</tr>" for f in fields) + \
        "</tbody></table>"
    sections.append(("summary", "1. Summary", body))

    # 2. the layer comparison, with deltas (queries/compare.py)
    if all(r.done("analyze") for r in runs):
        columns, rows = compare(paths, "layer_comparison")
        body = ('<p class="note">Each figure of each layer in every run, then each run minus the first (green: '
                'better, red: worse, where the figure has a direction). <code>featscope compare</code> prints '
                'the same rows.</p>' + _compare_table(columns, rows, "compare-layers"))
    else:
        body = page.missing("The layer comparison", "analyze")
    sections.append(("layers", "2. Layers, poolings and metrics", body))

    # 3. distances: ROC overlaid, histograms per run, for the layers every run has
    shared = [l for l in runs[0].index_layers() if all(l in r.index_layers() for r in runs[1:])]
    parts = []
    if all(r.done("analyze") for r in runs):
        for layer in shared:
            curves, hists = [], []
            for label, r in zip(labels, runs):
                hist = r.histogram(layer)
                cd = r.result("class_distances")
                aucs = {x["scope"]: x["auc"] for x in cd.to_pylist() if x["layer"] == layer} if cd is not None else {}
                curves.append((label, hist, aucs))
                if hist:
                    hists.append(page.image(figures.distance_histograms(hist, f"{label}: {layer}"),
                                            f"distance histograms of {layer} in {label}"))
            parts.append(f"<h3>{page.esc(layer)}</h3><div class=\"figs\"><div>" +
                         page.image(figures.roc_overlay(curves, f"{layer}: ROC per run"), f"ROC of {layer}") +
                         "</div>" + "".join(f"<div>{h}</div>" for h in hists) + "</div>")
        if not shared:
            parts.append("<p>The runs share no index layer.</p>")
    else:
        parts.append(page.missing("The distance pictures", "analyze"))
    sections.append(("distances", "3. Distances per layer", "".join(parts)))

    # 4. maps: a PCA map of each run, per shared layer
    from . import maps

    parts = []
    for layer in shared:
        figs = []
        for label, r in zip(labels, runs):
            if not r.done("extract"):
                figs.append(page.missing(f"The map of {label}", "extract"))
                continue
            ids_all = r.image_ids()
            ids = r.sample(ids_all, min(r.points, 20_000), salt=1)
            if not len(ids):
                figs.append(f"<p>{page.esc(label)}: no points (report_points = 0, or no vectors).</p>")
                continue
            entry = r.layer_entry(layer)
            xy = maps.project(r.vectors(entry["features"], ids), "pca", entry["metric"], r.seed)
            lab = r.image_rows_light(ids)
            labels_arr = np.array([lab[int(i)][0] for i in ids])
            disagree = np.zeros(len(ids), bool)
            if r.result_exists("image_agreement"):
                t = r.rows_for("image_agreement", ids, layer, columns=["image_id", "agreement"])
                got = dict(zip(t.column("image_id").to_pylist(), t.column("agreement").to_pylist()))
                disagree = np.array([got.get(int(i), 1.0) < 0.5 for i in ids])
            note = f" (sample of {len(ids):,} of {len(ids_all):,})" if len(ids) < len(ids_all) else ""
            figs.append(page.image(figures.scatter_map(xy, labels_arr, disagree, r.classes(),
                                                       f"{label}: {layer} PCA{note}"), f"map of {layer} in {label}"))
        parts.append(f"<h3>{page.esc(layer)}</h3><div class=\"figs\">" + "".join(f"<div>{f}</div>" for f in figs) + "</div>")
    sections.append(("maps", "4. Maps", "".join(parts) or "<p>The runs share no index layer.</p>"))

    # 5. continuity, with deltas
    if all(r.result_exists("continuity") for r in runs):
        columns, rows = compare(paths, "continuity")
        rows = [r for r in rows if r[columns.index("scope")] == "all"]
        body = _compare_table(columns, rows, "compare-continuity") if rows else \
            "<p>The runs made no perturbed views.</p>"
    else:
        body = page.missing("Continuity", "analyze")
    sections.append(("continuity", "5. Continuity", body))

    # 6. errors
    counts = [(label, r.errors(limit=0)[0]) for label, r in zip(labels, runs)]
    sections.append(("errors", "6. Errors", page.table(["run", "errors"], counts)))

    html_text = page.document("featscope compare: " + " vs ".join(labels), sections,
                              subtitle="runs: " + ", ".join(paths) + f"; made {time.strftime('%Y-%m-%d %H:%M')}")
    out_file = os.path.abspath(out_file) if "://" not in out_file else out_file
    if "://" not in out_file:
        os.makedirs(os.path.dirname(out_file), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(html_text)

    write_file_atomic(out_file, write)
    return out_file
