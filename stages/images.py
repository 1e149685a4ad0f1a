"""Image bytes in, usable RGB out.

`validate` runs at ingest (PIL only, no torch: ingest workers start fast). It fully decodes
each image once, turns every convertible image (grayscale, RGBA, CMYK, 16-bit, palette,
BMP/TIFF/WebP) into 8-bit RGB, and raises `BadImage` for the rest. The bytes it returns are
what `decode_batch` reads at extract time on the fast path (torchvision's native decoder).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Formats torchvision.io.decode_image reads natively in 8-bit RGB/L: kept byte for byte.
_FAST_FORMATS = {"PNG", "JPEG"}
_FAST_MODES = {"RGB", "L"}

ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(Exception):
    def __init__(self, error: str, message: str):
        super().__init__(message)
        self.error = error
        self.message = message


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data are scaled down, not clipped; 32-bit int/float are scaled to their range
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" or (mode == "I" and arr.max(initial=0) > 65535):
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        else:
            arr = arr / hi * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # transparent pixels carry arbitrary colour: composite on white, as viewers do
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def validate(data: bytes, max_pixels: int, min_side: int) -> tuple[bytes, int, int]:
    """Return (bytes readable by the fast decoder, width, height) or raise BadImage."""
    if not data:
        raise BadImage("empty_file", "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise BadImage("too_large", f"{width}x{height} = {width * height} pixels exceeds "
                               f"max_image_pixels={max_pixels} (decompression-bomb guard)")
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("too_large", str(exc).splitlines()[0]) from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image", "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImage("corrupt_image", f"cannot decode: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if min(width, height) < min_side:
        raise BadImage("too_small", f"{width}x{height} is below min_image_side={min_side}")
    if img.format in _FAST_FORMATS and img.mode in _FAST_MODES and not _is_16bit_png(data):
        return data, width, height
    try:
        rgb = _to_rgb(img)
    except (OSError, ValueError) as exc:
        raise BadImage("unconvertible", f"cannot convert mode {img.mode} to RGB: {exc}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), width, height


def _is_16bit_png(data: bytes) -> bool:
    # IHDR bit depth sits at byte 24 of a PNG file; PIL reports 16-bit RGB as plain "RGB"
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16


def decode_rgb(data: bytes):
    """bytes -> uint8 CHW torch tensor (fast native decoder, PIL as the fallback)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if t.dtype == torch.uint8:
            return t
    except (RuntimeError, ValueError):
        pass
    img = _to_rgb(Image.open(io.BytesIO(data)))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
