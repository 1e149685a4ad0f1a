"""CAM (Zhou et al. 2016): the class's head weights over the last conv map.

Exact only for a head that is global-average-pool + linear: the logit is then the mean of this
map plus the bias. The map is signed (not rectified), at the conv map's size.
"""
from __future__ import annotations

import torch


def cam(fmap: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM_c(h, w) = sum_k W[c, k] A_k(h, w), one class per image: (N, K, H, W) -> (N, H, W)."""
    return torch.einsum("nk,nkhw->nhw", weight[classes], fmap)
