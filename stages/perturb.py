"""Perturbed views: nearly equivalent inputs, made during extraction.

A view is `<name>:<strength>` (`noise:0.05`, `shift:2`). Perturbations act on the image at the
model's input size, in [0, 1] pixel units, before normalisation; the input distance
||x - x'||_2 is then measured in the model's input space (after normalisation), where the
local Lipschitz ratio ||f(x) - f(x')|| / ||x - x'|| is taken.

Every random choice is seeded by (run seed, image_id, view), so a view is reproducible
whatever the batch or shard it lands in, on any machine.

  noise       gaussian noise, sigma in [0, 1] pixel units
  brightness  add `strength` to every pixel (clamped)
  contrast    scale contrast around the image mean by (1 + strength)
  shift       translate by `strength` pixels in a seeded direction (edges replicated)
  rotate      rotate by `strength` degrees (edges filled with the mean colour)
  blur        gaussian blur with sigma = strength pixels
  jpeg        re-encode as JPEG with quality = strength
  background  builtin:shapes only: the same object redrawn on another background
"""
from __future__ import annotations

import hashlib
import math

import torch

from featscope.core.config import UserError

PERTURBATIONS = ("noise", "brightness", "contrast", "shift", "rotate", "blur", "jpeg", "background")


def parse_view(spec: str) -> tuple[str, float]:
    name, sep, strength = spec.replace("=", ":").partition(":")
    if name not in PERTURBATIONS or not sep:
        raise UserError(f"unknown perturbation '{spec}' (NAME=STRENGTH with NAME one of {', '.join(PERTURBATIONS)})")
    try:
        value = float(strength)
    except ValueError:
        raise UserError(f"perturbation '{spec}': strength must be a number") from None
    if name == "jpeg" and not 1 <= value <= 100:
        raise UserError(f"perturbation '{spec}': jpeg quality must be in [1, 100]")
    if name in ("noise", "blur") and value < 0:
        raise UserError(f"perturbation '{spec}': strength must be >= 0")
    return name, value


def view_name(spec: str) -> str:
    name, value = parse_view(spec)
    return f"{name}:{value:g}"


def _seed(seed: int, image_id: int, view: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{image_id}/{view}".encode(), digest_size=8).digest(), "big") >> 1


def apply(x: torch.Tensor, ids: list[int], view: str, seed: int) -> torch.Tensor:
    """x: (N, 3, H, W) float pixel values in [0, 255] -> the perturbed batch, same shape and range.

    Strengths are in [0, 1] pixel units (x 255 here); working on 0..255 values keeps a view of
    strength 0 bit-identical to the original.
    """
    from torchvision.transforms.v2 import functional as F

    name, s = parse_view(view)
    if name == "noise":
        # one generator per image: the same noise whatever batch the image lands in (on a given
        # device type: CPU and CUDA generators draw different streams from the same seed)
        noise = torch.stack([torch.randn(x.shape[1:], device=x.device,
                                         generator=torch.Generator(x.device).manual_seed(_seed(seed, i, view)))
                             for i in ids])
        return (x + (s * 255) * noise).clamp(0, 255)
    if name == "brightness":
        return (x + s * 255).clamp(0, 255)
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * (1 + s) + mean).clamp(0, 255)
    if name == "shift":
        dx, dy = shift_offsets(ids, view, seed, x.device)
        return _translate(x, dx, dy)
    if name == "rotate":
        if s == 0:
            return x.clone()
        fill = x.mean(dim=(2, 3))
        return torch.stack([F.rotate(x[j], s, interpolation=F.InterpolationMode.BILINEAR, fill=fill[j].tolist())
                            for j in range(len(ids))])
    if name == "blur":
        if s == 0:
            return x.clone()
        k = 2 * math.ceil(3 * s) + 1
        return F.gaussian_blur(x, [k, k], [s, s])
    if name == "jpeg":
        from torchvision.io import decode_jpeg, encode_jpeg

        u8 = x.round().clamp(0, 255).to(torch.uint8).cpu()
        return torch.stack([decode_jpeg(encode_jpeg(im, quality=int(s))) for im in u8]).float().to(x.device)
    raise UserError(f"perturbation '{name}' is made from the source image, not from pixels")


def shift_offsets(ids: list[int], view: str, seed: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The (dx, dy) pixels of a shift view for each image: `strength` pixels in a seeded direction."""
    s = parse_view(view)[1]
    angles = [(_seed(seed, i, view) % 3600) / 3600 * 2 * math.pi for i in ids]
    return (torch.tensor([round(s * math.cos(a)) for a in angles], device=device),
            torch.tensor([round(s * math.sin(a)) for a in angles], device=device))


def is_geometric(view: str) -> bool:
    """A view that moves the content (shift, rotate): an explanation should move with it."""
    name, s = parse_view(view)
    return name in ("shift", "rotate")


def warp_map(maps: torch.Tensor, ids: list[int], view: str, seed: int, input_size: int) -> torch.Tensor:
    """The original's explanation maps (N, h, w) carried by the view's own shift or rotation.

    The equivariance correction compares a view's map with this instead of the original's map
    as it was: an explanation that moves correctly with the object then counts as unchanged. A
    shift of d input pixels is d * h / input_size cells (edges replicated, as the image's are);
    a shift that is not a whole number of cells is interpolated bilinearly. A rotation turns the
    map about its centre by the same angle, filled with the map's mean (as the image is with
    its mean colour).
    """
    from torchvision.transforms.v2 import functional as F

    name, s = parse_view(view)
    m = maps.float()
    if name == "shift":
        dx, dy = shift_offsets(ids, view, seed, m.device)
        h, w = m.shape[1:]
        fx, fy = dx.double() * w / input_size, dy.double() * h / input_size
        if bool((fx == fx.round()).all() and (fy == fy.round()).all()):
            return _translate(m[:, None], fx.round().long(), fy.round().long())[:, 0]
        # fractional cells: sample at (x - fx, y - fy) with bilinear weights, clamped to the edge
        xs = (torch.arange(w, device=m.device, dtype=torch.float64)[None, :] - fx[:, None]).clamp(0, w - 1)
        ys = (torch.arange(h, device=m.device, dtype=torch.float64)[None, :] - fy[:, None]).clamp(0, h - 1)
        x0, y0 = xs.floor().long(), ys.floor().long()
        x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
        ax, ay = (xs - x0).float(), (ys - y0).float()
        n = len(m)
        rows = torch.arange(n, device=m.device)[:, None, None]

        def at(yi, xi):
            return m[rows, yi[:, :, None], xi[:, None, :]]

        top = at(y0, x0) * (1 - ax[:, None, :]) + at(y0, x1) * ax[:, None, :]
        bottom = at(y1, x0) * (1 - ax[:, None, :]) + at(y1, x1) * ax[:, None, :]
        return top * (1 - ay[:, :, None]) + bottom * ay[:, :, None]
    if name == "rotate":
        if s == 0:
            return m.clone()
        fill = m.mean(dim=(1, 2))
        return torch.stack([F.rotate(m[j][None], s, interpolation=F.InterpolationMode.BILINEAR,
                                     fill=[float(fill[j])])[0] for j in range(len(m))])
    return m


def _translate(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image n by (dx[n], dy[n]) pixels, replicating edge rows/columns into the gap.

    One gather for the whole batch (a loop of per-image indexing cost ~100x more on 2 busy cores).
    """
    n, c, h, w = x.shape
    xs = (torch.arange(w, device=x.device)[None, :] - dx[:, None]).clamp(0, w - 1)  # (N, W)
    ys = (torch.arange(h, device=x.device)[None, :] - dy[:, None]).clamp(0, h - 1)  # (N, H)
    flat = (ys[:, :, None] * w + xs[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, flat).reshape(n, c, h, w)


def needs_source(view: str) -> bool:
    return parse_view(view)[0] == "background"


def check_source(data: str, views: list[str]) -> None:
    if any(needs_source(v) for v in views) and not data.startswith("builtin:shapes"):
        raise UserError("the background perturbation needs --data builtin:shapes (the object is redrawn)")


def background_image(data: str, uri: str, view: str, seed: int, image_id: int):
    """builtin:shapes only: the same object redrawn on a background of another kind and colours."""
    from . import builtin_data

    _, opts = builtin_data.parse_builtin(data)
    params = builtin_data.shape_params(int(uri.rsplit("/", 1)[1]), int(opts.get("seed", 0)))
    rng_seed = _seed(seed, image_id, view)
    kinds = [k for k in builtin_data.BACKGROUNDS if k != params["background"]]
    return builtin_data.render_shape(params, int(opts.get("size", 64)), background=kinds[rng_seed % len(kinds)],
                                     bg_seed=rng_seed % (2**31))
