"""The report stage: RUN/report/index.html, one self-contained page (no network at view time)
showing the images, neighbours, maps and curves behind a run's numbers.

    data.py     what the page shows, read from the run (results/*.parquet, bounded samples)
    figures.py  matplotlib figures as inlined PNGs
    maps.py     PCA / UMAP projections and the interactive Bokeh map (its JS inlined)
    views.py    an image and its perturbed views at the model's input, for the CAM overlays
    page.py     the HTML, every string from the data escaped
    compare.py  `featscope compare RUN_A RUN_B --html FILE`: the same side by side, with deltas

The stage runs last in `featscope run`; `featscope report RUN [--out DIR]` runs it alone on any
run, finished or not: a section whose stage has not run says which stage it needs.
"""
from __future__ import annotations

import os
import time

import numpy as np

from featscope.core.rundir import exists, read_json, write_file_atomic, write_json_atomic

from . import figures, page
from .data import NEEDS, RunData

HIGHER = {"agreement", "pred_agreement", "knn_accuracy", "precision_at_1", "r_precision", "map_at_r", "knn_auc",
          "global_auc", "continuity_accuracy"}
LOWER = {"knn_same_diff_ratio", "global_same_diff_ratio", "knn_triplet_violation_rate",
         "global_triplet_violation_rate", "twin_rank_mean"}
CONTINUITY_COLUMNS = ["layer", "view", "n", "continuity_accuracy", "lipschitz_mean", "lipschitz_p95", "twin_rank_mean",
                      "flip_rate", "cam_continuity_mean", "cam_continuity_max"]


def run(run_dir, cfg, progress) -> dict:
    """The pipeline's report stage: skipped when the page is there and made from the same inputs."""
    settings = {"seed": cfg.seed, "report_points": cfg.report_points, "report_thumbnails": cfg.report_thumbnails,
                "report_queries": cfg.report_queries, "report_umap_points": cfg.report_umap_points}
    out = run_dir.p("report")
    stamp_path = run_dir.p("report", "report.json")
    data = RunData(run_dir.path, settings)
    stamp = data.stamp()
    old = read_json(stamp_path) if exists(stamp_path) else None
    if old and old.get("stamp") == stamp and exists(run_dir.p("report", "index.html")):
        return {**{k: v for k, v in old.items() if k != "stamp"}, "skipped": 1}
    return write_report(data, out, progress)


REPORT_KEYS = ("report_points", "report_thumbnails", "report_queries", "report_umap_points", "seed")


def report_settings(sets: list[str] | None) -> dict:
    """`featscope report --set key=value`: the report's own keys (and the seed of its samples)."""
    from featscope.core.config import UserError

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise UserError(f"--set expects key=value, got {item!r}")
        if key not in REPORT_KEYS:
            raise UserError(f"unknown report key '{key}' (known: {', '.join(REPORT_KEYS)})")
        try:
            out[key] = int(value)
        except ValueError:
            raise UserError(f"{key} must be a whole number, not {value!r}") from None
        if out[key] < 0:
            raise UserError(f"{key} must be >= 0")
    return out


def write_run_report(path: str, out_dir: str | None = None, settings: dict | None = None, progress=None) -> dict:
    """`featscope report RUN [--out DIR]`: the page of a run, finished or not (default RUN/report)."""
    from featscope.core.progress import progress as default_progress

    data = RunData(path, settings)
    if not data.done("ingest"):
        from featscope.core.config import UserError

        raise UserError(f"{path} has no images yet: run at least the ingest stage first")
    return write_report(data, out_dir or data.run.p("report"), progress or default_progress)


def write_report(data: RunData, out_dir: str, progress=None) -> dict:
    """Build the page of one run into out_dir/index.html (atomically); returns its recap."""
    t0 = time.perf_counter()
    builder = Builder(data, progress)
    html_text = builder.page()
    path = os.path.join(out_dir, "index.html") if "://" not in out_dir else out_dir.rstrip("/") + "/index.html"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(html_text)

    write_file_atomic(path, write)
    recap = {"path": path, "bytes": len(html_text.encode()), "sections": len(builder.sections),
             "figures": builder.figure_count, "map_points": builder.map_points,
             "map_sampled": int(builder.map_sampled), "seconds": round(time.perf_counter() - t0, 2)}
    stamp_file = path.rsplit("/", 1)[0] + "/report.json" if "://" in path else os.path.join(out_dir, "report.json")
    write_json_atomic(stamp_file, {**recap, "stamp": data.stamp()})
    return recap


class Builder:
    """The sections of one run's page, in order."""

    def __init__(self, data: RunData, progress=None):
        self.d = data
        self.progress = progress
        self.sections: list[tuple[str, str, str]] = []
        self.figure_count = 0
        self.map_points = 0
        self.map_sampled = False
        self.head = ""

    def fig(self, uri: str, alt: str) -> str:
        self.figure_count += 1
        return page.image(uri, alt)

    def page(self) -> str:
        steps = [("summary", "1. Summary", self.summary), ("layers", "2. Layers, poolings and metrics", self.layers),
                 ("distances", "3. Distances, agreement and confusion per layer", self.distances),
                 ("maps", "4. Maps", self.maps), ("neighbors", "5. Neighbours", self.neighbors),
                 ("continuity", "6. Continuity", self.continuity), ("errors", "7. Errors", self.errors)]
        if self.d.done("extract"):
            self.prepare_maps()  # UMAP starts in a worker now, while the sections are made
        pending = any(l["umap"] is not None for l in (getattr(self, "_maps", None) or {}).get("layers", []))
        steps = steps + ([("umap", "UMAP maps", None)] if pending else [])  # the bar waits for them too
        bar = self.progress(steps, desc="report", unit="section") if self.progress else steps
        try:
            for anchor, title, make in bar:
                if make is None:
                    self.finish_maps()
                    continue
                need = NEEDS[anchor]
                body = make() if self.d.done(need) else page.missing(title.split(". ", 1)[1], need)
                self.sections.append((anchor, title, body))
        except BaseException:  # the worker is shared: do not leave it projecting for a failed page
            for lay in (getattr(self, "_maps", None) or {}).get("layers", []):
                if lay["umap"] is not None:
                    lay["umap"].cancel()
            raise
        if not pending:
            self.finish_maps()  # (empties the slot)
        name = os.path.basename(self.d.run.root.rstrip("/")) or self.d.run.root
        return page.document(f"featscope report: {name}", self.sections, self.head,
                             subtitle=f"run {self.d.run.root}; made {time.strftime('%Y-%m-%d %H:%M')}")

    # ---- 1 ---------------------------------------------------------------------------------
    def summary(self) -> str:
        rows = self.d.summary()
        body = "<table id=\"summary-table\"><tbody>" + "".join(
            f"<tr><th>{page.esc(k)}</th>{page.cell(v)}</tr>" for k, v in rows) + "</tbody></table>"
        done = [s for s in ("ingest", "train", "extract", "index", "knn", "analyze")
                if (self.d.meta.get("stages") or {}).get(s, {}).get("status") == "done"]
        return body + f'<p class="note">stages finished: {page.esc(", ".join(done) or "none")}</p>'

    # ---- 2 ---------------------------------------------------------------------------------
    def layers(self) -> str:
        t = self.d.result("layer_comparison")
        if t is None:
            return page.missing("The layer comparison", "analyze")
        cols = t.column_names
        rows = [tuple(r[c] for c in cols) for r in t.to_pylist()]
        best = page.best_rows(cols, rows, HIGHER, LOWER)
        return ('<p class="note">One row per vector set (layer x pooling x metric), best first by MAP@R, then '
                'one row per explanation method (kind explanation: only its explanation_* columns are filled, '
                'best first by the equivariance-corrected rank correlation); '
                'the best value of each column is marked (higher is better for agreement, accuracy, precision, '
                'MAP@R, AUC and continuity accuracy; lower for the same/different ratio, violation rates and '
                'twin rank; distances of different metrics are not comparable). '
                '<code>featscope query RUN layer_comparison</code> gives the same table.</p>'
                f'<div class="scroll">{page.table(cols, rows, best, table_id="layer-comparison")}</div>')

    # ---- 3 ---------------------------------------------------------------------------------
    def distances(self) -> str:
        out = []
        cd = self.d.result("class_distances")
        per_class = self.d.result("per_class")
        names = self.d.classes()
        for layer in self.d.index_layers():
            parts = [f"<h3>{page.esc(layer)}</h3>"]
            hist = self.d.histogram(layer)
            aucs = {r["scope"]: r["auc"] for r in cd.to_pylist() if r["layer"] == layer} if cd is not None else {}
            figs = []
            if hist:
                figs.append(self.fig(figures.distance_histograms(hist, f"{layer}: same- vs different-class distances"),
                                     f"distance histograms of {layer}"))
                figs.append(self.fig(figures.roc_curves(hist, aucs, f"{layer}: ROC"), f"ROC of {layer}"))
            if per_class is not None:
                rows = [r for r in per_class.to_pylist() if r["layer"] == layer]
                if rows:
                    uri, note = figures.agreement_bars([r["class"] for r in rows], [r["agreement"] for r in rows],
                                                       f"{layer}: kNN agreement per class")
                    figs.append(self.fig(uri, f"agreement per class of {layer}") +
                                (f'<p class="note">{page.esc(note)}</p>' if note else ""))
            if self.d.result_exists("image_agreement"):
                classes, m = self.d.confusion("knn", layer)
                labels = [names[c] for c in classes]
                figs.append(self.fig(figures.confusion(labels, m, f"{layer}: labels vs kNN vote", "kNN vote"),
                                     f"confusion of labels and kNN vote in {layer}"))
            parts.append(f'<div class="figs">{"".join(f"<div>{f}</div>" for f in figs)}</div>')
            out.append("".join(parts))
        classes, m = self.d.confusion("pred")
        names_pred = [names[c] for c in classes]
        out.insert(0, '<div class="figs"><div>' + self.fig(
            figures.confusion(names_pred, m, "labels vs the model's predictions", "prediction"),
            "confusion of labels and predictions") + "</div></div>"
            '<p class="note">Histograms and ROC curves are of the pairs class_distances measured (kNN edges, and a '
            'seeded uniform sample of pairs), in 100 bins (<code>featscope query RUN distance_histogram</code>); '
            'the AUCs are the measure\'s own.</p>')
        return "".join(out)

    # ---- 4 ---------------------------------------------------------------------------------
    UMAP_SLOT = "<!--umap-figures-->"

    def prepare_maps(self) -> None:
        """Read the maps' points and vectors, and start the UMAP projections in a worker process
        (maps.project_in_worker) so that they run while the other sections are made."""
        from . import maps

        ids_all = self.d.image_ids()
        ids = self.d.sample(ids_all, self.d.points, salt=1)
        self.map_points, self.map_sampled = len(ids), len(ids) < len(ids_all)
        self._maps = {"ids": ids, "ids_all": ids_all, "layers": []}
        if not len(ids):
            return
        rows = self.d.image_rows_light(ids)
        self._maps["labels"] = np.array([rows[int(i)][0] for i in ids], np.int64)
        umap_on = maps.umap_available() and self.d.umap_points > 0
        umap_rows = np.arange(len(ids))
        if umap_on and len(ids) > self.d.umap_points:  # UMAP costs ~50x PCA: a seeded sample of the points
            umap_rows = np.sort(np.random.default_rng([self.d.seed, 4]).choice(len(ids), self.d.umap_points,
                                                                                replace=False))
        self._maps.update(umap_on=umap_on, umap_rows=umap_rows)
        layers = self.d.index_layers() if self.d.done("knn") else []
        for layer in layers or self.d.feature_layers():
            entry = self.d.layer_entry(layer) if layers else {"features": layer, "metric": "l2"}
            try:
                vec = self.d.vectors(entry["features"], ids)
            except ValueError as exc:  # a layer whose extraction is unfinished: a note, not a failed page
                self._maps.setdefault("skipped", []).append(f"{layer}: {exc}")
                continue
            agreement = np.ones(len(ids), np.float32)
            if layers and self.d.result_exists("image_agreement"):
                t = self.d.rows_for("image_agreement", ids, layer, columns=["image_id", "agreement"])
                got = dict(zip(t.column("image_id").to_pylist(), t.column("agreement").to_pylist()))
                agreement = np.array([got.get(int(i), 1.0) for i in ids], np.float32)
            umap = maps.project_in_worker(vec[umap_rows], "umap", entry["metric"], self.d.seed) if umap_on else None
            self._maps["layers"].append({"layer": layer, "metric": entry["metric"], "vec": vec,
                                         "agreement": agreement, "umap": umap})

    def maps(self) -> str:
        from . import maps

        m = getattr(self, "_maps", None) or {}
        ids, ids_all = m.get("ids", np.zeros(0)), m.get("ids_all", np.zeros(0))
        if not len(ids):
            return "<p>No points: report_points = 0.</p>" if len(ids_all) else "<p>No image has vectors.</p>"
        labels, names = m["labels"], self.d.classes()
        preds_map = self.d.predictions_of(ids)
        preds = np.array([preds_map.get(int(i), (-1, 0))[0] for i in ids], np.int64)
        pred_names = {c: names.get(c, str(c)) for c in set(preds.tolist())}
        notes = [f"{len(ids):,} points" + (f": a seeded sample (seed {self.d.seed}) of the {len(ids_all):,} images, "
                                            f"above the report_points budget of {self.d.points:,}"
                                            if self.map_sampled else " (every image)") + "."]
        if not m["umap_on"]:
            notes.append("UMAP maps need umap-learn: pip install 'featscope[umap]'." if self.d.umap_points else
                         "No UMAP maps (report_umap_points = 0).")
        elif len(m["umap_rows"]) < len(ids):
            notes.append(f"UMAP maps: a seeded sample of {len(m['umap_rows']):,} of those points (report_umap_points).")
        notes += [f"Left out: {s}." for s in m.get("skipped", [])]
        parts = [f'<p class="note">{page.esc(" ".join(notes))} Colour: label; black ring: fewer than half of the '
                 'image\'s k neighbours carry its label.</p>']
        static = []
        for n, lay in enumerate(m["layers"]):
            xy = maps.project(lay["vec"], "pca", lay["metric"], self.d.seed)
            title = f"{lay['layer']}: PCA"
            if n == 0:  # the first layer's PCA is the interactive map
                thumbs = self.d.thumbnails_of(self.d.sample(ids, self.d.thumbnails, salt=2))
                script, div = maps.interactive_map(xy, ids, labels, names, preds, pred_names, lay["agreement"], thumbs,
                                                   title)
                self.head = maps.bokeh_resources()
                parts.append(f'<h3>{page.esc(title)} (interactive: pan, zoom, lasso; hover for the image)</h3>'
                             f'<p class="note">{len(thumbs):,} points show their image on hover '
                             f'(report_thumbnails).</p><div id="interactive-map">{div}</div>{script}')
                continue
            static.append(self.fig(figures.scatter_map(xy, labels, lay["agreement"] < 0.5, names, title),
                                   f"pca map of {lay['layer']}"))
        parts.append('<div class="figs">' + "".join(f"<div>{s}</div>" for s in static) + self.UMAP_SLOT + "</div>")
        return "".join(parts)

    def finish_maps(self) -> None:
        """The UMAP figures, once their projections are back, into the maps section's slot."""
        m = getattr(self, "_maps", None) or {}
        figs = []
        for lay in m.get("layers", []):
            if lay["umap"] is None:
                continue
            rows = m["umap_rows"]
            try:
                xy = lay["umap"].result()
            except Exception as exc:  # noqa: BLE001 - a failed projection is a note, not a failed report
                figs.append(f'<p class="note">UMAP of {page.esc(lay["layer"])} failed: '
                            f'{page.esc(type(exc).__name__)}: {page.esc(str(exc).splitlines()[0] if str(exc) else "")}</p>')
                continue
            figs.append("<div>" + self.fig(figures.scatter_map(xy, m["labels"][rows], lay["agreement"][rows] < 0.5,
                                                               self.d.classes(), f"{lay['layer']}: UMAP"),
                                           f"umap map of {lay['layer']}") + "</div>")
        self.sections = [(a, t, b.replace(self.UMAP_SLOT, "".join(figs))) for a, t, b in self.sections]

    # ---- 5 ---------------------------------------------------------------------------------
    def neighbors(self) -> str:
        names = self.d.classes()
        susp = self.d.result("suspicious")
        ids_all = self.d.image_ids()
        out = [f'<p class="note">Each row: the query (blue), then its k nearest images in the layer, nearest first, '
               f'with label and distance; a red frame marks a neighbour of another class. Sample queries: '
               f'{min(self.d.queries, len(ids_all))} seeded (seed {self.d.seed}); suspicious: the top of '
               f'<code>featscope query RUN suspicious</code>.</p>']
        for layer in self.d.index_layers():
            sample = [int(i) for i in self.d.sample(ids_all, self.d.queries, salt=3)]
            top = []
            if susp is not None:
                top = [r["image_id"] for r in susp.to_pylist() if r["layer"] == layer][: self.d.queries]
            lists = self.d.neighbor_lists(layer, sample + top)
            wanted = set(sample + top) | {nb for v in lists.values() for _, nb, _ in v}
            rows = self.d.image_rows(wanted)
            thumbs = {i: self.d.thumb(r) for i, r in rows.items()}
            out.append(f"<h3>{page.esc(layer)}</h3>")
            for title, qs in (("sample queries", sample), ("most suspicious", top)):
                if not qs:
                    continue
                out.append(f"<h4>{page.esc(title)}</h4>")
                for q in qs:
                    out.append(self._grid(q, lists.get(q, []), rows, thumbs, names))
        return "".join(out)

    def _grid(self, q: int, nbrs, rows, thumbs, names) -> str:
        qrow = rows.get(q, {})
        cells = [page.thumb_cell(thumbs.get(q), [f"query {q}", qrow.get("label_name", "?")], "query",
                                 title=qrow.get("uri", ""))]
        for rank, nb, dist in nbrs:
            r = rows.get(nb, {})
            wrong = r.get("label") != qrow.get("label")
            cells.append(page.thumb_cell(thumbs.get(nb), [f"{rank}. {r.get('label_name', '?')}", f"d {dist:.4g}"],
                                         "wrong" if wrong else "", title=r.get("uri", "")))
        return f'<div class="grid">{"".join(cells)}</div>'

    # ---- 6 ---------------------------------------------------------------------------------
    def continuity(self) -> str:
        t = self.d.result("continuity")
        if t is None or not t.num_rows:
            return "<p>This run made no perturbed views (config perturb), so there is no continuity to show.</p>"
        rows = [r for r in t.to_pylist() if r["scope"] == "all"]
        out = ['<p class="note">Per layer and view: <code>featscope query RUN continuity</code> (scope all). '
               'Lipschitz estimate = d(f(x), f(x\')) / ||x - x\'||; CAM continuity = ||CAM(x) - CAM(x\')||_1 / '
               '||x - x\'||, both CAMs of the original\'s predicted class.</p>',
               page.table(CONTINUITY_COLUMNS, [tuple(r[c] for c in CONTINUITY_COLUMNS) for r in rows],
                          table_id="continuity-table")]
        kinds: dict[str, list] = {}
        for r in rows:
            name, _, strength = r["view"].partition(":")
            try:
                kinds.setdefault(name, []).append({**r, "strength": float(strength)})
            except ValueError:
                continue
        for kind, rs in kinds.items():
            if len({r["strength"] for r in rs}) >= 2:
                out.append(self.fig(figures.continuity_curves(kind, rs), f"continuity over {kind} strength"))
        out.append(self.explanations())
        out.append(self.cam_overlays())
        return "".join(out)

    def explanations(self) -> str:
        t = self.d.result("explanation_continuity")
        if t is None or not t.num_rows:
            return ""
        cols = ["method", "view", "n", "continuity_mean", "continuity_eq_mean", "pearson_eq_mean", "spearman_eq_mean",
                "topk_iou_eq_mean", "local_lipschitz", "max_sensitivity", "avg_sensitivity", "ris", "ros", "flip_rate"]
        rows = [tuple(r[c] for c in cols) for r in t.to_pylist()]
        return ('<h3>Explanations under perturbation</h3><p class="note">Per explanation method and view '
                '(<code>featscope query RUN explanation_continuity</code>): continuity = ||E(x) - E(x\')||_1 / '
                '||x - x\'||, _eq against the original\'s map moved by the view\'s own shift or rotation '
                '(equivariance-corrected); correlations and the top-k overlap do not depend on the method\'s '
                'scale, the continuity ratios do. Sensitivities and stabilities as Quantus defines them.</p>'
                f'<div class="scroll">{page.table(cols, rows, table_id="explanation-table")}</div>')

    def cam_overlays(self) -> str:
        from .views import view_images

        layers = self.d.index_layers()
        if not layers or not self.d.result_exists("continuity_images"):
            return ""
        views = self.d.meta.get("views") or []
        has_cam = bool(self.d.run.parquet_files("maps", "cam"))
        score = "cam_continuity" if has_cam else "lipschitz"
        path = self.d.run.p("results", "continuity_images.parquet")
        ranked = self.d.sql(f"SELECT image_id, avg({score}) AS s FROM read_parquet(?) WHERE layer = ? AND {score} "
                            f"IS NOT NULL GROUP BY image_id ORDER BY s, image_id", [path, layers[0]]).to_pylist()
        if not ranked:
            return ""
        n = min(3, len(ranked) // 2 or 1)
        groups = (("most continuous", ranked[:n]), ("least continuous", ranked[::-1][:n]))
        ids = [r["image_id"] for _, g in groups for r in g]
        pixels = view_images(self.d, ids, views)
        cams = self.d.cams(ids) if has_cam else {}
        what = "CAM continuity" if has_cam else f"Lipschitz estimate in {layers[0]} (no CAM: the head is not GAP + linear)"
        rows = self.d.image_rows(ids)
        out = [f"<h3>Images and their perturbed views{' with the CAM' if has_cam else ''}</h3>"
               f'<p class="note">Ranked by the mean {page.esc(what)} over the views.</p><div class="figs">']
        for title, g in groups:
            fig_rows = []
            for r in g:
                i = r["image_id"]
                cells = [(v, pixels[(i, v)], cams.get((i, v))) for v in ["orig"] + views if (i, v) in pixels]
                if cells:
                    fig_rows.append((f"{rows.get(i, {}).get('label_name', '?')} ({r['s']:.3g})", cells))
            if fig_rows:
                out.append("<div>" + self.fig(figures.cam_overlays(fig_rows, f"{title} ({what})"), title) + "</div>")
        return "".join(out) + "</div>"

    # ---- 7 ---------------------------------------------------------------------------------
    def errors(self) -> str:
        n, t = self.d.errors()
        if not n:
            return "<p>No errors: every input was used.</p>"
        cols = t.column_names
        shown = f" (the first {t.num_rows})" if t.num_rows < n else ""
        return (f"<p>{n:,} inputs could not be used{shown}: <code>featscope sql RUN \"SELECT * FROM errors\"</code> "
                f"lists them all.</p><div class=\"scroll\">"
                + page.table(cols, [tuple(r[c] for c in cols) for r in t.to_pylist()], table_id="errors-table")
                + "</div>")
