"""The metric term of training: `loss = cross-entropy + lambda * term(embedding, labels)`.

The terms are pytorch-metric-learning's, not ours:
  triplet     TripletMarginLoss(margin) with BatchHardMiner (Hermans et al. 2017: the hardest
              positive and negative of each anchor in the batch)
  semihard    TripletMarginLoss(margin) with TripletMarginMiner(type_of_triplets="semihard")
  softmargin  TripletMarginLoss(margin=0, smooth_loss=True) (softplus(d_ap - d_an)) with BatchHardMiner
  supcon      SupConLoss(temperature) (Khosla et al. 2020), every pair of the batch
`train_miner` replaces a triplet term's miner (batch-hard, semihard, all).

Where it applies (`train_on`), each embedding L2-normalised so that a margin means the same at
any scale:
  conv        GAP of the last conv map (default)
  conv:cam    the map pooled under the CAM of the true class: M = relu(CAM) / max, detached
              (the term must not train the head through the mask), pooled as GAP((1 + M) * A) so
              that an early, all-zero mask still gives the plain GAP
  conv:flat   the whole map, flattened
  penultimate the classifier's input
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featscope.core.config import UserError

TERMS = ("none", "triplet", "semihard", "softmargin", "supcon")
MINERS = ("auto", "batch-hard", "semihard", "all")
ON = ("conv", "conv:cam", "conv:flat", "penultimate")


@dataclass
class TermStats:
    """What one batch says about the embedding: logged per epoch, to see collapse or non-convergence."""

    term: float
    active: float  # share of the batch's triplets (a, p, n) within the margin: d(a,p) - d(a,n) + margin > 0
    same_sum: float  # sum and count of the distances between same-class embeddings of the batch
    same_n: int
    diff_sum: float  # ... and between different-class ones
    diff_n: int


class MetricTerm:
    def __init__(self, name: str, margin: float, miner: str = "auto", temperature: float = 0.1):
        from pytorch_metric_learning import losses, miners

        if name not in TERMS or name == "none":
            raise UserError(f"unknown train term '{name}' (terms: {', '.join(TERMS)})")
        if miner not in MINERS:
            raise UserError(f"unknown train miner '{miner}' (miners: {', '.join(MINERS)})")
        self.name, self.margin = name, float(margin)
        if name == "supcon":
            self.margin = 0.0  # its active share: triplets with d(a,p) >= d(a,n)
            self.loss, self.miner = losses.SupConLoss(temperature=temperature), None
            return
        if name == "softmargin" and miner == "semihard":
            raise UserError("train_term softmargin has no margin, so semi-hard mining would find no triplet: "
                            "use batch-hard or all")
        if name == "softmargin":
            self.margin = 0.0
            self.loss = losses.TripletMarginLoss(margin=0.0, smooth_loss=True)
        else:
            self.loss = losses.TripletMarginLoss(margin=self.margin)
        miner = miner if miner != "auto" else ("semihard" if name == "semihard" else "batch-hard")
        self.miner = {"batch-hard": lambda: miners.BatchHardMiner(),
                      "semihard": lambda: miners.TripletMarginMiner(margin=self.margin, type_of_triplets="semihard"),
                      "all": lambda: None}[miner]()

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, TermStats]:
        from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

        mined = self.miner(emb, labels) if self.miner is not None else None
        loss = self.loss(emb, labels, mined) if mined is not None else self.loss(emb, labels)
        with torch.no_grad():
            d = torch.cdist(emb, emb)
            same = labels[:, None] == labels[None, :]
            off = ~torch.eye(len(labels), dtype=torch.bool, device=emb.device)
            # over all the batch's triplets, whatever the miner picked (semi-hard ones are active by definition)
            a, p, n = lmu.convert_to_triplets(None, labels)
            viol = d[a, p] - d[a, n] + self.margin
            active = float((viol >= 0 if self.name == "supcon" else viol > 0).float().mean()) if len(a) else 0.0
            pos, neg = d[same & off], d[~same]
            stats = TermStats(loss.item(), active, float(pos.sum()), int(pos.numel()), float(neg.sum()),
                              int(neg.numel()))
        return loss, stats


def cam_mask(fmap: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """relu(CAM of the true class) / its max, per image, detached: (N, K, H, W) -> (N, H, W) in [0, 1]."""
    with torch.no_grad():
        cam = torch.einsum("nk,nkhw->nhw", weight.detach()[labels], fmap.detach()).clamp(min=0)
        peak = cam.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
        return cam / peak


def embed(on: str, fmap: torch.Tensor | None, pen: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The term's embedding (L2-normalised) from the conv map, the penultimate vector and the CAM mask."""
    if on == "penultimate":
        vec = pen.flatten(1)
    elif on == "conv":
        vec = fmap.mean(dim=(2, 3))
    elif on == "conv:flat":
        vec = fmap.flatten(1)
    elif on == "conv:cam":
        vec = ((1.0 + mask[:, None]) * fmap).mean(dim=(2, 3))
    else:
        raise UserError(f"unknown train_on '{on}' (one of {', '.join(ON)})")
    return F.normalize(vec, dim=1)
