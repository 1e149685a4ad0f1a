"""Datasets that need no download: `builtin:digits` and `builtin:shapes`.

- digits: scikit-learn's 1,797 real handwritten 8x8 digits (shipped with the package),
  upscaled to 32x32 grayscale PNGs. A fixed seeded 80/20 train/test split.
- shapes: procedurally generated 64x64 RGB images of 12 shape classes. Colour, size,
  position, rotation and the background (gradient, stripes, noise, checker) are all random,
  so that two images of the same class differ in nearly every pixel. Each image is a pure
  function of (seed, index), so any slice can be generated anywhere (in parallel, on any
  node) and `render_shape(params, background=...)` can redraw the same object on another
  background.

Options: `builtin:shapes?n=5000&size=64&seed=0`, `builtin:digits?size=32`.
"""
from __future__ import annotations

import io
import math
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon",
                 "diamond", "pentagon", "crescent", "arrow", "lshape")
BACKGROUNDS = ("gradient", "stripes", "noise", "checker", "flat")
BUILTINS = ("digits", "shapes")


def parse_builtin(src: str) -> tuple[str, dict]:
    name, _, query = src.split(":", 1)[1].partition("?")
    opts = {k: int(v) for k, v in parse_qsl(query)}
    return name, opts


def builtin_size(name: str, opts: dict) -> int:
    if name == "digits":
        return 1797
    return int(opts.get("n", 2400))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---- digits --------------------------------------------------------------------------------
_DIGITS = None


def _digits():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS = (d.images, d.target)
    return _DIGITS


def digits_split(n: int = 1797, seed: int = 0) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    split = np.empty(n, dtype=object)
    split[order[: int(0.8 * n)]] = "train"
    split[order[int(0.8 * n):]] = "test"
    return split


def digits_records(start: int, stop: int, opts: dict):
    images, target = _digits()
    size = int(opts.get("size", 32))
    split = digits_split(len(target))
    for i in range(start, min(stop, len(target))):
        arr = (images[i] / 16.0 * 255.0).astype(np.uint8)
        img = Image.fromarray(arr, "L").resize((size, size), Image.BILINEAR)
        yield {"key": f"builtin:digits/{i:05d}", "uri": f"builtin:digits/{i:05d}",
               "label_name": str(int(target[i])), "split": split[i], "bytes": _png(img)}


# ---- shapes --------------------------------------------------------------------------------
def shape_params(index: int, seed: int = 0) -> dict:
    """Everything that defines image `index`: a pure function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    cls = int(index % len(SHAPE_CLASSES))
    return {
        "cls": cls,
        "scale": float(rng.uniform(0.22, 0.42)),  # radius as a share of the image side
        "cx": float(rng.uniform(0.3, 0.7)),
        "cy": float(rng.uniform(0.3, 0.7)),
        "angle": float(rng.uniform(0, 2 * math.pi)),
        "color": tuple(int(c) for c in rng.integers(0, 256, 3)),
        "background": str(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]),
        "bg_seed": int(rng.integers(2**31)),
    }


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    steps = n * 2 if inner else n
    for k in range(steps):
        rad = (inner if inner and k % 2 else r)
        a = angle + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _rotated(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _background(kind: str, size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / max(np.ptp(t), 1e-9)
    elif kind == "stripes":
        a, f = rng.uniform(0, math.pi), rng.uniform(3, 8)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * f * (np.cos(a) * xx + np.sin(a) * yy))
    elif kind == "noise":
        t = rng.random((size, size))
    elif kind == "checker":
        cells = int(rng.integers(3, 9))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(float)
    else:
        t = np.zeros((size, size))
    arr = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def render_shape(params: dict, size: int = 64, background: str | None = None, bg_seed: int | None = None) -> Image.Image:
    img = _background(background or params["background"], size,
                      params["bg_seed"] if bg_seed is None else bg_seed)
    draw = ImageDraw.Draw(img)
    cx, cy, r, a = params["cx"] * size, params["cy"] * size, params["scale"] * size, params["angle"]
    color = params["color"]
    name = SHAPE_CLASSES[params["cls"]]
    outline = tuple(255 - c for c in color)  # keeps the object visible on a same-colour background
    w = max(1, size // 32)
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=outline, width=w)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r * 0.35)))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, a), fill=color, outline=outline)
    elif name == "diamond":
        pts = [(cx, cy - r), (cx + 0.55 * r, cy), (cx, cy + r), (cx - 0.55 * r, cy)]
        draw.polygon(_rotated(pts, cx, cy, a), fill=color, outline=outline)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, a), fill=color, outline=outline)
    elif name == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, a), fill=color, outline=outline)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, a), fill=color, outline=outline)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, a, inner=r * 0.42), fill=color, outline=outline)
    elif name == "cross":
        t = r * 0.32
        pts = [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
               (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
               (cx - r, cy - t), (cx - t, cy - t)]
        draw.polygon(_rotated(pts, cx, cy, a), fill=color, outline=outline)
    elif name == "crescent":
        mask = Image.new("L", (size, size), 0)
        md = ImageDraw.Draw(mask)
        md.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a)
        md.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
        img.paste(Image.new("RGB", (size, size), color), (0, 0), mask)
    elif name == "arrow":
        t = r * 0.25
        pts = [(cx - r, cy - t), (cx + 0.1 * r, cy - t), (cx + 0.1 * r, cy - 2.2 * t), (cx + r, cy),
               (cx + 0.1 * r, cy + 2.2 * t), (cx + 0.1 * r, cy + t), (cx - r, cy + t)]
        draw.polygon(_rotated(pts, cx, cy, a), fill=color, outline=outline)
    elif name == "lshape":
        t = r * 0.45
        pts = [(cx - r, cy - r), (cx - r + t, cy - r), (cx - r + t, cy + r - t), (cx + r, cy + r - t),
               (cx + r, cy + r), (cx - r, cy + r)]
        draw.polygon(_rotated(pts, cx, cy, a), fill=color, outline=outline)
    return img


def shapes_records(start: int, stop: int, opts: dict):
    n, size, seed = builtin_size("shapes", opts), int(opts.get("size", 64)), int(opts.get("seed", 0))
    for i in range(start, min(stop, n)):
        params = shape_params(i, seed)
        split = "test" if (i // len(SHAPE_CLASSES)) % 5 == 4 else "train"
        yield {"key": f"builtin:shapes/{i:06d}", "uri": f"builtin:shapes/{i:06d}",
               "label_name": SHAPE_CLASSES[params["cls"]], "split": split,
               "bytes": _png(render_shape(params, size))}


def builtin_classes(name: str) -> list[str]:
    return [str(d) for d in range(10)] if name == "digits" else list(SHAPE_CLASSES)


def builtin_records(name: str, opts: dict, start: int, stop: int):
    return digits_records(start, stop, opts) if name == "digits" else shapes_records(start, stop, opts)
