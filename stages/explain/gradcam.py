"""Grad-CAM (Selvaraju et al. 2017): the conv map weighted by the class logit's mean gradient.

Any network with a `conv` map (the map the head's global pooling reads). Like captum's
`LayerGradCam` by default, the map is not rectified: for a GAP + linear head it is then exactly
CAM / (H * W), and the sign says where evidence is against the class. `greatest(0, x)` of it is
Selvaraju et al.'s ReLU'd map.
"""
from __future__ import annotations

import torch


def gradcam(fmap: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) conv map and d logit_c / d map -> (N, H, W)."""
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return (weights * fmap).sum(dim=1)


def grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """Placed after the conv node in the extractor's graph when no input gradient is wanted: the
    backward pass then runs through the head only (nothing before the map records a graph)."""
    return t.detach().requires_grad_(True) if torch.is_grad_enabled() else t


def cut_graph_at(extractor, node_name: str) -> None:
    """Insert `grad_leaf` after `node_name` in a FeatureExtractor's graph (stages/layers.py)."""
    graph = extractor.gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    node = out.args[0][extractor.names.index(node_name)]
    with graph.inserting_after(node):
        leaf = graph.call_function(grad_leaf, (node,))
    node.replace_all_uses_with(leaf, delete_user_cb=lambda user: user is not leaf)
    extractor.gm.recompile()
