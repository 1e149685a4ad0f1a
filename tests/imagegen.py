"""Small image files for tests: good ones in every format, and every kind of bad input."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def rgb(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def convertible_images(seed: int = 0) -> dict[str, bytes]:
    """Images that are usable after conversion to 8-bit RGB."""
    base = rgb(seed)
    gray16 = Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16))
    return {
        "gray.png": encode(base.convert("L"), "PNG"),
        "rgba.png": encode(base.convert("RGBA"), "PNG"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(gray16, "PNG"),
        "palette.png": encode(base.convert("P", palette=Image.ADAPTIVE, colors=16), "PNG"),
        "palette_transparent.png": encode(base.convert("P"), "PNG", transparency=0),
        "pic.bmp": encode(base, "BMP"),
        "pic.webp": encode(base, "WEBP", lossless=True),
        "pic.tif": encode(base, "TIFF"),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected error code)."""
    png = encode(rgb(1, 64), "PNG")
    jpg = encode(rgb(2, 64), "JPEG", quality=90)
    # a 10000 x 10000 PNG: 100 M pixels > PIL's 89.5 M bomb limit, yet tiny on disk
    bomb = encode(Image.new("1", (10000, 10000)), "PNG")
    return {
        "empty.png": (b"", "empty_file"),
        "truncated.png": (png[: len(png) // 2], "corrupt_image"),
        "truncated.jpg": (jpg[: len(jpg) // 3], "corrupt_image"),
        "noise.png": (np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes(), "not_an_image"),
        "text.jpg": (b"this is not a picture, just some text\n" * 10, "not_an_image"),
        "tiny.png": (encode(rgb(4, 1), "PNG"), "too_small"),
        "bomb.png": (bomb, "too_large"),
    }
