"""The report's static pictures: matplotlib figures as PNG data: URIs (inlined in the page).

Each function takes plain arrays the data module read and returns one data URI. Strings from the
data (class names) reach matplotlib as plain text: math parsing is off, so a `$` in a class name
is drawn as a `$`.
"""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

plt.rcParams.update({"text.parse_math": False, "figure.dpi": 80, "savefig.dpi": 80, "font.size": 9,
                     "axes.spines.top": False, "axes.spines.right": False})
SAME, DIFF = "#1f77b4", "#d62728"
MAX_BARS = 40  # classes shown in a bar chart; a larger run shows its least agreeing classes
MAX_TICKS = 30  # confusion matrices name their classes up to this many


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _short(name: str, n: int = 18) -> str:
    name = str(name)
    return name if len(name) <= n else name[: n - 1] + "…"


def class_colors(n: int) -> np.ndarray:
    """n distinguishable RGBA colours: tab10 / tab20 for few classes, a turbo sweep for many."""
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(n))
    if n <= 20:
        return plt.get_cmap("tab20")(np.arange(n))
    return plt.get_cmap("turbo")(np.linspace(0.05, 0.95, n))


def distance_histograms(hist: dict, title: str) -> str:
    """hist: scope -> table(bin_lo, bin_hi, same_n, diff_n). One panel per scope, each group's
    histogram as a share of its own pairs (same-class pairs are few among global pairs)."""
    scopes = [s for s in ("knn", "global") if s in hist]
    fig, axes = plt.subplots(1, len(scopes), figsize=(4.6 * len(scopes), 2.8), squeeze=False)
    for ax, scope in zip(axes[0], scopes):
        t = hist[scope]
        lo, hi = t.column("bin_lo").to_numpy(), t.column("bin_hi").to_numpy()
        for col, color, label in (("same_n", SAME, "same class"), ("diff_n", DIFF, "different class")):
            n = t.column(col).to_numpy().astype(float)
            total = n.sum()
            if total:
                ax.stairs(n / total, np.append(lo, hi[-1:]), color=color, fill=True, alpha=0.45,
                          label=f"{label} ({int(total):,})")
        ax.set_title(f"{'kNN pairs' if scope == 'knn' else 'global pairs (sampled)'}")
        ax.set_xlabel("distance")
        ax.set_ylabel("share of the group's pairs")
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.04)
    return png(fig)


def _roc(hist: dict, scope: str):
    """(different-class share, same-class share) within each bin's upper edge, from 0; None when
    the scope has no pairs of one kind."""
    if scope not in hist:
        return None
    t = hist[scope]
    same, diff = t.column("same_n").to_numpy().astype(float), t.column("diff_n").to_numpy().astype(float)
    if same.sum() == 0 or diff.sum() == 0:
        return None
    return np.concatenate([[0], np.cumsum(diff) / diff.sum()]), np.concatenate([[0], np.cumsum(same) / same.sum()])


def roc_curves(hist: dict, aucs: dict, title: str) -> str:
    """ROC of distance as a same-class score, from the histogram's cumulative counts (bin upper
    edges as thresholds); the legend's AUC is the measure's own (class_distances)."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    for scope, style in (("knn", "-"), ("global", "--")):
        curve = _roc(hist, scope)
        if curve is None:
            continue
        fpr, tpr = curve
        auc = aucs.get(scope)
        ax.plot(fpr, tpr, style, label=f"{scope} (AUC {auc:.4f})" if auc is not None else scope)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set_xlabel("different-class pairs within d")
    ax.set_ylabel("same-class pairs within d")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    return png(fig)


def agreement_bars(names: list[str], values: list[float], title: str) -> tuple[str, str]:
    """Per-class kNN agreement; returns (uri, note) where note says when only some classes show."""
    order = np.argsort(values, kind="stable")
    note = ""
    if len(order) > MAX_BARS:
        order = order[:MAX_BARS]
        note = f"the {MAX_BARS} classes with the lowest agreement of {len(values)}"
    names = [names[i] for i in order][::-1]
    vals = [values[i] for i in order][::-1]
    fig, ax = plt.subplots(figsize=(4.6, 0.6 + 0.2 * len(vals)))
    ax.barh(range(len(vals)), vals, color=SAME)
    ax.set_yticks(range(len(vals)), [_short(n) for n in names], fontsize=7 if len(vals) > 20 else 8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("kNN agreement")
    ax.set_title(title, fontsize=10)
    return png(fig), note


def confusion(names: list[str], m: np.ndarray, title: str, xlabel: str) -> str:
    """Rows: labels; columns: the other assignment (the last column, when used: a class outside
    the dataset's, e.g. an ImageNet head on another dataset)."""
    n = len(names)
    extra = m[:, -1].sum() > 0
    m = m if extra else m[:, :-1]
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = min(7.0, 2.2 + 0.28 * n)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    if n <= MAX_TICKS:
        cols = [_short(x, 12) for x in names] + (["other"] if extra else [])
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(n), [_short(x, 12) for x in names], fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(m.shape[1]):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("label")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the label's images")
    return png(fig)


def scatter_map(xy: np.ndarray, labels: np.ndarray, disagree: np.ndarray, names: dict, title: str) -> str:
    """A static 2-D map: points coloured by label, images whose neighbours disagree with their label
    marked with a black ring."""
    classes = sorted(set(labels.tolist()))
    colors = class_colors(len(classes))
    index = {c: i for i, c in enumerate(classes)}
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    s = 6 if len(xy) > 5000 else 12
    ax.scatter(xy[:, 0], xy[:, 1], c=colors[[index[c] for c in labels]], s=s, lw=0, alpha=0.7, rasterized=True)
    if disagree.any():
        ax.scatter(xy[disagree, 0], xy[disagree, 1], s=s * 3, facecolors="none", edgecolors="black", lw=0.6,
                   label=f"neighbours disagree ({int(disagree.sum())})")
        ax.legend(frameon=False, fontsize=8, loc="best")
    if len(classes) <= 20:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", ls="", color=colors[i], label=_short(names.get(c, c), 14))
                   for i, c in enumerate(classes)]
        legend = ax.get_legend()
        ax.legend(handles=handles, frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        if legend is not None:
            ax.add_artist(legend)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return png(fig)


def continuity_curves(kind: str, rows: list[dict]) -> str:
    """Continuity accuracy, Lipschitz estimate and flip rate over the strengths of one
    perturbation, one line per layer."""
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 2.8))
    layers = sorted({r["layer"] for r in rows})
    for layer in layers:
        rs = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["strength"])
        x = [r["strength"] for r in rs]
        for ax, col in zip(axes, ("continuity_accuracy", "lipschitz_mean", "flip_rate")):
            ax.plot(x, [r[col] if r[col] is not None else np.nan for r in rs], "o-", label=layer, ms=3)
    for ax, col in zip(axes, ("continuity accuracy", "Lipschitz estimate (mean)", "flip rate")):
        ax.set_xlabel(f"{kind} strength")
        ax.set_title(col, fontsize=10)
    axes[0].legend(frameon=False, fontsize=8)
    return png(fig)


def cam_overlays(rows: list[tuple[str, list[tuple[str, np.ndarray, np.ndarray | None]]]], title: str) -> str:
    """rows: (row title, [(view, RGB uint8 HxWx3, CAM or None)]): each image and its perturbed views
    side by side, the CAM (of the original's predicted class) over each, on one colour scale per row."""
    ncol = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.7 * ncol, 1.85 * len(rows)), squeeze=False)
    for r, (name, cells) in enumerate(rows):
        cams = [c for _, _, c in cells if c is not None]
        vmax = max((float(c.max()) for c in cams), default=1.0) or 1.0
        vmin = min((float(c.min()) for c in cams), default=0.0)
        for j in range(ncol):
            ax = axes[r][j]
            ax.axis("off")
            if j >= len(cells):
                continue
            view, rgb, cam = cells[j]
            ax.imshow(rgb, interpolation="nearest")
            if cam is not None:
                h, w = rgb.shape[:2]
                ax.imshow(cam, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                          interpolation="bilinear")
            ax.set_title(view if j else f"{_short(name, 22)}\n{view}", fontsize=7)
    fig.suptitle(title, fontsize=10, y=1.02)
    return png(fig)


def roc_overlay(curves: list[tuple[str, dict, dict]], title: str) -> str:
    """One ROC panel per scope, one line per run: curves = [(run label, hist, aucs)]."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.2))
    for ax, scope in zip(axes, ("knn", "global")):
        for label, hist, aucs in curves:
            curve = _roc(hist, scope)
            if curve is None:
                continue
            auc = aucs.get(scope)
            ax.plot(*curve, label=f"{_short(label, 24)} (AUC {auc:.4f})" if auc is not None else _short(label, 24))
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_title(f"{scope} pairs", fontsize=9)
        ax.set_xlabel("different-class pairs within d")
        ax.set_ylabel("same-class pairs within d")
        ax.legend(frameon=False, fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10, y=1.04)
    return png(fig)
