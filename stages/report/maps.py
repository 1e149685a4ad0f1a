"""2-D maps of a layer's vectors: PCA always, UMAP when umap-learn is installed; one interactive
Bokeh map (pan, zoom, lasso, hover with the image) whose JS is inlined, so the page works offline.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def project(vectors: np.ndarray, method: str, metric: str, seed: int) -> np.ndarray:
    """(N, d) -> (N, 2). Cosine layers are L2-normalised first (their distance is the angle's)."""
    x = vectors.astype(np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA

        solver = "randomized" if min(x.shape) > 200 else "full"
        return PCA(n_components=2, svd_solver=solver, random_state=seed).fit_transform(x).astype(np.float32)
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap's n_jobs / numba notes: nothing a reader can act on
        reducer = umap.UMAP(n_components=2, random_state=seed, metric="cosine" if metric == "cosine" else "euclidean",
                            n_neighbors=min(15, len(x) - 1), n_epochs=200)  # UMAP's own choice above 10k points
        return reducer.fit_transform(x).astype(np.float32)


class _Worker:
    """One `python -c ...serve()` process kept for the life of this one, projecting in turn what
    `submit` hands it (pickled over its stdin / stdout). A plain subprocess, not multiprocessing:
    spawn would re-run the caller's script (its `__main__`) in the child, and a script that calls
    featscope.run unguarded would run the pipeline again there."""

    def __init__(self):
        import queue
        import subprocess
        import sys
        import threading

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", "from featscope.stages.report.maps import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def submit(self, *args):
        from concurrent.futures import Future

        future = Future()
        self.jobs.put((future, args))
        return future

    def _loop(self) -> None:
        while True:
            future, args = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                _send(self.proc.stdin, args)
                ok, value = _receive(self.proc.stdout)
            except Exception as exc:  # noqa: BLE001 - the worker died: this job and the next fail
                self.proc.kill()
                future.set_exception(RuntimeError(f"the UMAP worker process ended ({type(exc).__name__})"))
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(RuntimeError(value))


def _send(fh, obj) -> None:
    import pickle
    import struct

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    fh.write(struct.pack("<Q", len(data)) + data)
    fh.flush()


def _receive(fh):
    import pickle
    import struct

    def read(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = fh.read(n - len(buf))
            if not chunk:
                raise EOFError("the other side closed the pipe")
            buf += chunk
        return buf

    return pickle.loads(read(struct.unpack("<Q", read(8))[0]))


def serve() -> None:
    """The worker's loop: (vectors, method, metric, seed) in, (ok, xy or the error's line) out;
    it ends when its parent closes the pipe (the parent ended)."""
    import sys

    proto_in, proto_out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the protocol
    while True:
        try:
            args = _receive(proto_in)
        except EOFError:
            return
        try:
            reply = (True, project(*args))
        except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
            reply = (False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        _send(proto_out, reply)


_WORKER: _Worker | None = None


def project_in_worker(vectors: np.ndarray, method: str, metric: str, seed: int):
    """`project` in the worker process (a Future): UMAP's numba code compiles there once (~45 s on
    2 cores; not cached on disk) while the report's other sections are made here, and later reports
    in the same process (a notebook, a test session) reuse it."""
    global _WORKER
    if _WORKER is None or not _WORKER.alive():
        _WORKER = _Worker()
    return _WORKER.submit(vectors, method, metric, seed)


def bokeh_resources() -> str:
    """BokehJS inlined (no CDN): the <script> tags the page's head carries."""
    from bokeh.resources import Resources

    # the core library only: widgets, tables, WebGL and MathJax (2.6 MB more) are not used
    return Resources(mode="inline", components=["bokeh"]).render_js()


def interactive_map(xy: np.ndarray, ids: np.ndarray, labels: np.ndarray, names: dict, preds: np.ndarray,
                    pred_names: dict, agreement: np.ndarray, thumbs: dict, title: str) -> tuple[str, str]:
    """A Bokeh scatter: colour = label, black ring = neighbours disagree (agreement < 0.5); hover
    shows label, prediction, agreement and, for the points given a thumbnail, the image.
    Returns (script, div) for the page (components(); the library itself: bokeh_resources())."""
    from bokeh.embed import components
    from bokeh.models import ColumnDataSource, HoverTool
    from bokeh.plotting import figure

    from .figures import class_colors

    classes = sorted(set(labels.tolist()))
    rgba = class_colors(len(classes))
    hexes = ["#%02x%02x%02x" % tuple(int(255 * c) for c in col[:3]) for col in rgba]
    color_of = {c: hexes[i] for i, c in enumerate(classes)}

    def column(mask):
        return {
            "x": xy[mask, 0].astype(np.float32), "y": xy[mask, 1].astype(np.float32),
            "image_id": [str(i) for i in ids[mask]],  # as text: int64 ids do not survive JS numbers
            "label": [str(names.get(int(l), l)) for l in labels[mask]],
            "pred": [str(pred_names.get(int(p), p)) if p >= 0 else "" for p in preds[mask]],
            "agreement": agreement[mask].astype(np.float32),
            "color": [color_of[int(l)] for l in labels[mask]],
        }

    has_thumb = np.array([int(i) in thumbs and thumbs[int(i)] is not None for i in ids], dtype=bool)
    p = figure(title=title, width=760, height=560, tools="pan,wheel_zoom,box_zoom,lasso_select,reset,save",
               active_scroll="wheel_zoom", output_backend="canvas")
    p.xaxis.visible = p.yaxis.visible = False
    p.grid.visible = False
    size = 4 if len(xy) > 10000 else 6
    text_tips = [("image", "@image_id"), ("label", "@label"), ("prediction", "@pred"), ("agreement", "@agreement{0.00}")]
    plain = ColumnDataSource(column(~has_thumb))
    r_plain = p.scatter("x", "y", source=plain, color="color", size=size, alpha=0.7, line_color=None)
    p.add_tools(HoverTool(renderers=[r_plain], tooltips=text_tips))
    if has_thumb.any():
        data = column(has_thumb)
        data["thumb"] = [thumbs[int(i)] for i in ids[has_thumb]]
        rich = ColumnDataSource(data)
        r_rich = p.scatter("x", "y", source=rich, color="color", size=size, alpha=0.7, line_color=None)
        # the tooltip's template is Bokeh's own: BokehJS >= 3.8 HTML-escapes @column fields in it
        # (pyproject asks for bokeh >= 3.9, the version the browser test ran); only the thumbnail,
        # a data: URI we made, goes into the src attribute
        p.add_tools(HoverTool(renderers=[r_rich], tooltips="""
            <div><img src="@thumb" width="64" style="image-rendering: pixelated; border: 1px solid #888"></div>
            <div>image @image_id</div><div>label <b>@label</b></div>
            <div>prediction @pred</div><div>agreement @agreement{0.00}</div>"""))
    off = agreement < 0.5
    if off.any():
        ring = ColumnDataSource({"x": xy[off, 0].astype(np.float32), "y": xy[off, 1].astype(np.float32)})
        p.scatter("x", "y", source=ring, size=size + 4, fill_color=None, line_color="black", line_width=1,
                  legend_label=f"neighbours disagree ({int(off.sum())})")
        p.legend.location = "top_left"
        p.legend.background_fill_alpha = 0.6
    script, div = components(p)
    return script, div
