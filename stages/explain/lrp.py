"""LRP (Bach et al. 2015; Montavon et al. 2018, sec. 5) by zennit: its EpsilonPlusFlat composite
(Flat for the first layer, z+ for convolutions, epsilon for dense layers) with the canonizer of
the architecture (BatchNorm merged into the convolution before it; ResNet's skip sums made
explicit). The relevance of the class logit (a one-hot output relevance, as zennit's examples
start) is summed over the colour channels and pooled to the stored size.
"""
from __future__ import annotations

import torch

from .saliency import to_size


def canonizers_for(model: torch.nn.Module) -> list | None:
    """zennit's canonizers for this network; None when zennit has none for its architecture."""
    from torchvision.models import ResNet, VGG
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    from featscope.stages.models import SmallCNN

    if isinstance(model, ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, (VGG, SmallCNN)):  # Sequential conv -> BatchNorm pairs
        return [VGGCanonizer()]
    return None


def lrp(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, S, S) model input -> (N, size, size) relevance of each image's class `classes`."""
    from zennit.composites import EpsilonPlusFlat

    composite = EpsilonPlusFlat(canonizers=canonizers_for(model))
    with torch.enable_grad(), composite.context(model) as modified:
        xin = x.detach().requires_grad_(True)
        out = modified(xin)
        target = torch.zeros_like(out).scatter_(1, classes[:, None].to(out.device), 1.0)
        relevance, = torch.autograd.grad(out, xin, grad_outputs=target)
    return to_size(relevance.sum(dim=1), size)
