"""Saliency, i.e. sensitivity analysis (Simonyan et al. 2014; Montavon et al. 2018, sec. 4.1):
(d logit_c / d x)^2 summed over the colour channels, pooled to the stored size."""
from __future__ import annotations

import torch


def saliency(input_grad: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, S, S) input gradient -> (N, size, size) (cell = mean of the pixels it covers)."""
    return to_size(input_grad.pow(2).sum(dim=1), size)


def to_size(pixel_map: torch.Tensor, size: int) -> torch.Tensor:
    """(N, S, S) -> (N, size, size) by area averaging; a map already that small is kept as it is."""
    if pixel_map.shape[-1] <= size and pixel_map.shape[-2] <= size:
        return pixel_map
    return torch.nn.functional.adaptive_avg_pool2d(pixel_map[:, None], size)[:, 0]
