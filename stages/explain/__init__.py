"""Explanation maps, computed in the extract replica beside the features (one forward pass).

One method per module, each a small function the replica calls (`cam`, `gradcam`, `saliency`,
`lrp`); this file decides which methods a model supports (`resolve`, before any work) and runs
them on a batch (`Explainer`). Every map explains the *original's* predicted class, for the
original and for each of its views: the same target for both inputs, as Montavon et al.'s
continuity asks.

  cam       conv map size   GAP + linear heads only
  gradcam   conv map size   any network with a `conv` map (the map the head pools)
  saliency  explain_size    any network (an input gradient)
  lrp       explain_size    networks zennit has a canonizer for (smallcnn, torchvision resnet*, vgg*)

gradcam and saliency share the features' forward pass and one backward pass (gradcam alone
backpropagates through the head only); lrp runs its own forward and backward through zennit's
modified network.
"""
from __future__ import annotations

from featscope.core.config import EXPLAIN_METHODS as METHODS, UserError

PIXEL_METHODS = ("saliency", "lrp")  # stored at explain_size; the others at the conv map's size


def default_methods(traced) -> list[str]:
    if traced.cam_ok:
        return ["cam"]
    return ["gradcam"] if traced.conv is not None else []


def resolve(requested: list[str] | None, traced, model, model_name: str) -> list[str]:
    """The methods to compute, or one UserError line naming what works instead."""
    if requested is None:
        return default_methods(traced)
    methods = list(dict.fromkeys(m.strip().lower() for m in requested if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown explanation method '{unknown[0]}' (methods: {', '.join(METHODS)})")
    works = supported(traced, model)
    for m in methods:
        if m not in works:
            why = {"cam": "a head that is global-average-pool + linear",
                   "gradcam": "a conv map that the head pools (the `conv` alias)",
                   "lrp": f"a network zennit has a canonizer for ({type(model).__name__} is not: "
                          f"smallcnn, torchvision resnet* and vgg* are)"}[m]
            raise UserError(f"--explain {m} needs {why}; {model_name} supports: {', '.join(works)}")
    return methods


def supported(traced, model) -> list[str]:
    from .lrp import canonizers_for

    out = []
    if traced.cam_ok:
        out.append("cam")
    if traced.conv is not None:
        out.append("gradcam")
    out.append("saliency")
    if canonizers_for(model) is not None:
        out.append("lrp")
    return out


class Explainer:
    """Runs the features' forward pass and the requested explanations of one batch."""

    def __init__(self, methods: list[str], extractor, model, conv_node: str | None, size: int,
                 chunk: int | None = None):
        import torch

        self.torch = torch
        self.chunk = max(1, int(chunk or 1 << 30))
        self.methods = methods
        self.extractor, self.model, self.conv_node, self.size = extractor, model, conv_node, size
        self.needs_grad = bool({"gradcam", "saliency"} & set(methods))
        for p in extractor.parameters():  # gradients to maps and inputs only, never to the weights
            p.requires_grad_(False)
        if "gradcam" in methods and "saliency" not in methods:
            from .gradcam import cut_graph_at

            cut_graph_at(extractor, conv_node)

    def forward(self, x, classes=None):
        """-> (outputs of every node, float logits, explained classes, {method: (N, h, w) map}).

        Gradient methods keep every activation for the backward pass (training-sized memory): they
        run on slices of `chunk` images, each slice's features, logits and maps joined after."""
        torch = self.torch
        if not self.needs_grad and "lrp" not in self.methods:
            return self._forward(x, classes)
        parts = [self._forward(x[lo:lo + self.chunk], None if classes is None else classes[lo:lo + self.chunk])
                 for lo in range(0, len(x), self.chunk)]
        if len(parts) == 1:
            return parts[0]
        outs = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        maps = {k: torch.cat([p[3][k] for p in parts]) for k in parts[0][3]}
        return outs, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]), maps

    def _forward(self, x, classes=None):
        torch = self.torch
        logits_name = self.extractor.logits_name
        if not self.needs_grad:
            with torch.inference_mode():
                outs = self.extractor(x)
                logits = outs[logits_name].float()
            classes = logits.argmax(1) if classes is None else classes.to(logits.device)
            maps = {}
        else:
            with torch.enable_grad():
                xin = x.detach().requires_grad_("saliency" in self.methods)
                outs = self.extractor(xin)
                logits = outs[logits_name].float()
                # (a clone: the original's classes were made in inference mode, which autograd refuses)
                classes = logits.argmax(1).detach() if classes is None else classes.to(logits.device).clone()
                wanted = ([outs[self.conv_node]] if "gradcam" in self.methods else []) + \
                         ([xin] if "saliency" in self.methods else [])
                grads = list(torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), wanted))
            outs = {k: v.detach() for k, v in outs.items()}
            logits = logits.detach()
            maps = {}
            with torch.no_grad():
                if "gradcam" in self.methods:
                    from .gradcam import gradcam

                    maps["gradcam"] = gradcam(outs[self.conv_node].float(), grads.pop(0).float())
                if "saliency" in self.methods:
                    from .saliency import saliency

                    maps["saliency"] = saliency(grads.pop(0).float(), self.size)
        if "lrp" in self.methods:
            from .lrp import lrp

            maps["lrp"] = lrp(self.model, x, classes, self.size).detach()
        return outs, logits, classes, maps
