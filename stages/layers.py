"""Layer resolution and the feature extractor.

The model is traced once with torchvision's `NodePathTracer` (node names such as
`layer4.1.relu_1`, the names `get_graph_node_names` shows). We build the extractor
ourselves rather than with `create_feature_extractor`, because that one silently drops a
return node whose output name repeats and keeps in-place ops that overwrite a returned
tensor; here every requested node is returned once, under its own name, and every
`inplace` flag is switched off.

Aliases:
- `penultimate`: the input of the final `nn.Linear` (the classifier's input);
- `conv`: the map that feeds the global pooling in front of the head: walking back from
  the classifier through head ops (linear, dropout, activations, norms, flatten, pooling),
  the input of the pooling op nearest the body.
`conv` is pooled to a vector with `gap` (default), `flat` or `cam` (`conv:flat`,
`conv:cam`). CAM needs a GAP + linear head (checked on the graph); then the CAM of class c is
sum_k W[c,k] A_k(h,w), and its spatial mean plus the bias equals the logit.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipeline.config import POOLINGS, UserError

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish)
_HEAD_MODULES = _ACTIVATIONS + (nn.Linear, nn.Dropout, nn.Identity, nn.LayerNorm, nn.BatchNorm1d, nn.Flatten)
_HEAD_FUNCS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.dropout, F.layer_norm, torch.relu, torch.sigmoid,
               torch.tanh}
_HEAD_METHODS = {"permute", "contiguous"}  # LayerNorm2d (convnext) traces into permute, layer_norm, permute
_REDUCE_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_REDUCE_FUNCS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.mean, torch.amax}
_REDUCE_METHODS = {"flatten", "mean", "view", "reshape", "amax", "squeeze"}
# ops allowed between the conv map and the final linear for CAM to be exact (GAP + linear)
_CAM_MODULES = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_CAM_FUNCS = {F.adaptive_avg_pool2d, torch.flatten, torch.mean, F.dropout}
_CAM_METHODS = {"flatten", "mean", "view", "reshape", "squeeze"}


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_reduce(gm, node) -> bool:
    m = _module(gm, node)
    if m is not None:
        return isinstance(m, _REDUCE_MODULES) or type(m).__name__ == "Flatten"
    if node.op == "call_function":
        return node.target in _REDUCE_FUNCS
    return node.op == "call_method" and node.target in _REDUCE_METHODS


def _is_head_op(gm, node) -> bool:
    m = _module(gm, node)
    if m is not None:
        # LayerNorm2d (convnext) and similar norms sit between pooling and the linear
        return isinstance(m, _HEAD_MODULES) or type(m).__name__ in ("LayerNorm2d",)
    if node.op == "call_method":
        return node.target in _HEAD_METHODS
    return node.op == "call_function" and node.target in _HEAD_FUNCS


def _allowed_for_cam(gm, node) -> bool:
    m = _module(gm, node)
    if m is not None:
        return isinstance(m, _CAM_MODULES)
    if node.op == "call_function":
        return node.target in _CAM_FUNCS
    return node.op == "call_method" and node.target in _CAM_METHODS


@dataclass
class Layer:
    name: str  # the `layer` value everywhere: conv, conv:cam, penultimate, layer3:flat, ...
    alias: str  # conv | penultimate | node
    node: str  # traced node name
    pooling: str  # gap | flat | cam | none (already a vector)
    dim: int

    def to_dict(self):
        return asdict(self)


class Traced:
    """One traced copy of a model, with node names, shapes at the given input size, and head info."""

    def __init__(self, model: nn.Module, image_size: int):
        from torchvision.models.feature_extraction import NodePathTracer

        try:
            from torchvision.models.feature_extraction import _set_default_tracer_kwargs

            kwargs = _set_default_tracer_kwargs(None)
        except ImportError:  # private helper: fall back to plain tracing
            kwargs = {}
        model = model.eval()
        tracer = NodePathTracer(**kwargs)
        graph = tracer.trace(model)
        self.gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        self.names = {n: tracer.node_to_qualname[n] for n in graph.nodes if n in tracer.node_to_qualname}
        self.by_name = {v: k for k, v in self.names.items()}
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(self.gm).propagate(torch.zeros(1, 3, image_size, image_size))
        self.linear = self._final_linear()
        self.conv = self._conv_node() if self.linear is not None else None
        self.cam_ok = self.conv is not None and self._gap_linear_head()

    def shape(self, node: fx.Node) -> tuple:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()

    def _final_linear(self):
        linears = [n for n in self.gm.graph.nodes if isinstance(_module(self.gm, n), nn.Linear)]
        return linears[-1] if linears else None

    def _conv_node(self):
        node, last_reduce = self.linear.args[0], None
        while isinstance(node, fx.Node) and node.op != "placeholder":
            if _is_reduce(self.gm, node):
                last_reduce = node
            elif not _is_head_op(self.gm, node):
                break
            node = node.args[0] if node.args else None
        if last_reduce is None:
            return None
        conv = last_reduce.args[0]
        return conv if len(self.shape(conv)) == 4 else None

    def _gap_linear_head(self) -> bool:
        node = self.linear.args[0]
        while node is not self.conv:
            if not isinstance(node, fx.Node) or not _allowed_for_cam(self.gm, node):
                return False
            if len(self.shape(node)) == 4 and self.shape(node)[2:] != (1, 1):
                return False  # pooling to more than 1x1 (vgg's 7x7) is not a GAP
            node = node.args[0]
        return True

    @property
    def final_linear_name(self) -> str | None:
        return self.linear.target if self.linear is not None else None

    def find(self, query: str) -> fx.Node:
        if query in self.by_name:
            return self.by_name[query]
        # a module name (`layer3`) means the last node inside it, as torchvision does
        inside = [n for n, q in self.names.items() if q.startswith(query + ".")]
        if inside:
            return inside[-1]
        sample = ", ".join(list(self.by_name)[-6:])
        raise UserError(f"unknown layer '{query}' (aliases: conv, penultimate; or a node name such as {sample})")


def final_linear_name(model: nn.Module) -> str:
    # tracing needs an input size only for shapes; the head name does not depend on it
    traced = Traced(model, 224)
    if traced.final_linear_name is None:
        raise UserError(f"{type(model).__name__} has no final nn.Linear classifier")
    return traced.final_linear_name


def split_metric(spec: str) -> tuple[str, str | None]:
    """`penultimate:cosine` -> ('penultimate', 'cosine'); metrics are for index/kNN only."""
    base, _, last = spec.rpartition(":")
    if base and last in ("l2", "cosine"):
        return base, last
    return spec, None


def resolve_layers(traced: Traced, specs: list[str]) -> list[Layer]:
    layers: dict[str, Layer] = {}
    for spec in specs:
        spec, _ = split_metric(spec.strip())
        base, _, pooling = spec.partition(":")
        if pooling and pooling not in POOLINGS:
            raise UserError(f"unknown pooling '{pooling}' in layer '{spec}' (poolings: {', '.join(POOLINGS)})")
        if base == "penultimate":
            if traced.linear is None:
                raise UserError("layer 'penultimate': the model has no final nn.Linear; name a node instead")
            node, alias = traced.linear.args[0], "penultimate"
        elif base == "conv":
            if traced.conv is None:
                raise UserError("layer 'conv': cannot find the last conv map in front of the head; name a node instead")
            node, alias = traced.conv, "conv"
        else:
            node, alias = traced.find(base), "node"
        shape = traced.shape(node)
        if len(shape) == 4:
            pooling = pooling or "gap"
            if pooling == "cam" and not (node is traced.conv and traced.cam_ok):
                raise UserError(f"layer '{spec}': cam pooling needs the last conv map of a GAP + linear head")
            dim = shape[1] * shape[2] * shape[3] if pooling == "flat" else shape[1]
        elif len(shape) == 2:
            if pooling:
                raise UserError(f"layer '{spec}': {base} is already a vector; it takes no pooling")
            pooling, dim = "none", shape[1]
        else:
            raise UserError(f"layer '{spec}': node output has shape {shape}; need (N, C, H, W) or (N, D)")
        name = base if pooling in ("gap", "none") else f"{base}:{pooling}"
        layers.setdefault(name, Layer(name, alias, traced.names[node], pooling, int(dim)))
    return list(layers.values())


class FeatureExtractor(nn.Module):
    """Returns {node name: tensor} for the requested nodes plus the logits, in one forward."""

    def __init__(self, traced: Traced, node_names: list[str]):
        super().__init__()
        gm, graph = traced.gm, traced.gm.graph
        self.logits_name = traced.names.get(traced.linear) if traced.linear is not None else None
        wanted = list(dict.fromkeys(node_names + ([self.logits_name] if self.logits_name else [])))
        nodes = [traced.find(n) for n in wanted]
        for n in list(graph.nodes):
            if n.op == "output":
                graph.erase_node(n)
        with graph.inserting_after(list(graph.nodes)[-1]):
            graph.output(tuple(nodes))
        for n in graph.nodes:
            # an in-place op would overwrite a tensor we return (e.g. densenet's F.relu(inplace=True))
            if n.kwargs.get("inplace"):
                n.kwargs = {**n.kwargs, "inplace": False}
            if n.op == "call_function" and n.target in (operator.iadd, operator.imul):
                n.target = operator.add if n.target is operator.iadd else operator.mul
        for m in gm.modules():
            if isinstance(getattr(m, "inplace", None), bool):
                m.inplace = False
        graph.eliminate_dead_code()
        gm.recompile()
        self.gm, self.names = gm, wanted

    def forward(self, x):
        return dict(zip(self.names, self.gm(x)))


def head_weights(model_or_traced: Traced) -> tuple[torch.Tensor, torch.Tensor]:
    lin = model_or_traced.gm.get_submodule(model_or_traced.linear.target)
    bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
    return lin.weight.detach(), bias.detach()


def class_activation_map(fmap: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM_c(h, w) = sum_k W[c, k] A_k(h, w), for one class per image: (N, K, H, W) -> (N, H, W)."""
    return torch.einsum("nk,nkhw->nhw", weight[classes], fmap)


def pool(fmap: torch.Tensor, pooling: str, cam: torch.Tensor | None = None) -> torch.Tensor:
    if pooling == "none":
        return fmap.flatten(1)
    if pooling == "gap":
        return fmap.mean(dim=(2, 3))
    if pooling == "flat":
        return fmap.flatten(1)
    # cam: weight the map by where the predicted class's evidence sits (positive CAM), so only
    # that part of the map is compared; an image with no positive evidence falls back to GAP.
    w = cam.clamp(min=0)
    total = w.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(w, 1.0 / (w.shape[1] * w.shape[2]))
    w = torch.where(total > 0, w / total.clamp(min=1e-12), uniform)
    return torch.einsum("nkhw,nhw->nk", fmap, w)
