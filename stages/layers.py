"""Layer resolution and the feature extractor.

The model is traced once with torchvision's `NodePathTracer` (node names such as
`layer4.1.relu_1`, the names `get_graph_node_names` shows). We build the extractor
ourselves rather than with `create_feature_extractor`, because that one silently drops a
return node whose output name repeats and keeps in-place ops that overwrite a returned
tensor; here every requested node is returned once, under its own name, and an in-place op
that would overwrite a returned tensor is made out-of-place (`_keep_returned_tensors`).

Aliases:
- `penultimate`: the input of the final `nn.Linear` (the classifier's input);
- `conv`: the map that feeds the global pooling in front of the head: walking back from
  the classifier through head ops (linear, dropout, activations, norms, flatten, pooling, and
  convs on the pooled 1x1 map), the input of the pooling op nearest the body. For timm models
  this is the output of `forward_features`, and `penultimate` is `forward_head(pre_logits=True)`.
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

from featscope.core.config import POOLINGS, UserError

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


def _tracer_class():
    from torchvision.models.feature_extraction import NodePathTracer

    class Tracer(NodePathTracer):
        """torchvision's tracer (its node names), with every nn.Linear subclass kept whole (timm's
        Linear is one: traced into, the classifier would be an F.linear call), and the path of the
        module being traced kept when tracing fails, so the error can say where."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inside: list[str] = []

        def is_leaf_module(self, m, module_qualname):
            return isinstance(m, nn.Linear) or super().is_leaf_module(m, module_qualname)

        def call_module(self, m, forward, args, kwargs):
            self.inside.append(self.path_of_module(m))
            out = super().call_module(m, forward, args, kwargs)
            self.inside.pop()  # not on an exception: then the innermost module stays named
            return out

    return Tracer


def _tracer_kwargs() -> dict:
    try:
        from torchvision.models.feature_extraction import _set_default_tracer_kwargs

        kwargs = _set_default_tracer_kwargs(None)
    except ImportError:  # private helper: fall back to plain tracing
        kwargs = {}
    import sys

    if "timm" in sys.modules:  # a timm model (or timm layers in the user's): timm's own no-trace lists
        from timm.layers import get_notrace_functions, get_notrace_modules

        kwargs["leaf_modules"] = list(set(kwargs.get("leaf_modules", [])) | set(get_notrace_modules()))
        kwargs["autowrap_functions"] = list(set(kwargs.get("autowrap_functions", [])) | set(get_notrace_functions()))
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _user_line(exc: BaseException) -> str:
    """` at file.py:LINE`: the innermost frame of the traceback outside torch (the model's own code)."""
    import os
    import traceback

    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)
              and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    return f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""


def _size_error(model: nn.Module, image_size: int, where: str, exc: BaseException) -> UserError:
    return UserError(f"{type(model).__name__} does not run on 3x{image_size}x{image_size} inputs (at {where}): "
                     f"{_first_line(exc)}; set image_size to the input size it was built for")


def trace(model: nn.Module, image_size: int):
    """A Traced graph of the model; a Hooked stand-in when torch.fx cannot trace it."""
    try:
        return Traced(model, image_size)
    except fx.proxy.TraceError as exc:
        return Hooked(model, image_size, exc.args[0])


class Traced:
    """One traced copy of a model, with node names, shapes at the given input size, and head info."""

    trace_error = None

    def __init__(self, model: nn.Module, image_size: int):
        model = model.eval()
        tracer = _tracer_class()(**_tracer_kwargs())
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, AttributeError, ...
            where = f"module '{tracer.inside[-1]}'" if tracer.inside and tracer.inside[-1] else "its forward"
            where += _user_line(exc)
            raise fx.proxy.TraceError(f"torch.fx cannot trace {type(model).__name__} (in {where}: "
                                      f"{_first_line(exc)})") from None
        self.gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        self.names = {n: tracer.node_to_qualname[n] for n in graph.nodes if n in tracer.node_to_qualname}
        self.by_name = {v: k for k, v in self.names.items()}
        from torch.fx.passes.shape_prop import ShapeProp

        class Shapes(ShapeProp):
            def run_node(self, n):
                self.current = n
                return super().run_node(n)

        shapes = Shapes(self.gm)
        try:
            with torch.no_grad():
                shapes.propagate(torch.zeros(1, 3, image_size, image_size))
        except Exception as exc:  # noqa: BLE001 - the model's own code failing on this input size
            node = getattr(shapes, "current", None)
            raise _size_error(model, image_size, f"node '{self.names.get(node, node)}'", exc.__cause__ or exc) from None
        self.linear = self._final_linear()
        self.conv = self._conv_node() if self.linear is not None else None
        self.cam_ok = self.conv is not None and self._gap_linear_head()

    @property
    def penultimate(self):
        return self.linear.args[0]

    def training_graph(self, model: nn.Module) -> "Traced":
        """The same model traced in train mode, for a training loop's extractor: code that reads
        `self.training` outside leaf modules (F.dropout(x, p, self.training), timm's DropPath) is
        baked into a graph when it is traced, so the eval-mode graph would train without it.
        Node names, head and conv map are this graph's (no shapes: resolution is done here)."""
        was = model.training
        tracer = _tracer_class()(**_tracer_kwargs())
        graph = tracer.trace(model.train())
        model.train(was)
        out = object.__new__(Traced)
        out.gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        out.names = {n: tracer.node_to_qualname[n] for n in graph.nodes if n in tracer.node_to_qualname}
        out.by_name = {v: k for k, v in out.names.items()}
        out.linear = out.by_name.get(self.names[self.linear]) if self.linear is not None else None
        out.conv = out.by_name.get(self.names[self.conv]) if self.conv is not None else None
        out.cam_ok = self.cam_ok
        return out

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
            elif not _is_head_op(self.gm, node) and not self._on_pooled_map(node):
                break
            node = node.args[0] if node.args else None
        if last_reduce is None:
            return None
        conv = last_reduce.args[0]
        # the image itself (a head that flattens its input) is no conv map
        return conv if isinstance(conv, fx.Node) and conv.op != "placeholder" and len(self.shape(conv)) == 4 else None

    def _on_pooled_map(self, node) -> bool:
        """A conv on the pooled 1x1 map, fed by the pooling through head ops only: part of the head
        (timm's mobilenetv3 and ghostnet: global_pool -> conv_head -> act -> flatten -> classifier)."""
        if self.shape(node)[2:] != (1, 1) or not node.args:
            return False
        prev = node.args[0]
        while isinstance(prev, fx.Node) and _is_head_op(self.gm, prev) and prev.args:
            prev = prev.args[0]
        return isinstance(prev, fx.Node) and _is_reduce(self.gm, prev)

    def _gap_linear_head(self) -> bool:
        node = self.linear.args[0]
        if self.shape(node)[-1:] != self.shape(self.conv)[1:2]:
            return False  # the classifier reads more than one value per channel (a flattened map): no GAP
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


class Hooked:
    """What is left of a model torch.fx cannot trace: its modules, run eagerly with hooks.

    Nodes are module names (a module's output) and, for `penultimate`, `<final linear>:input`
    (the classifier's input, from a pre-hook on the last nn.Linear the forward calls). `conv` and
    CAM need the graph between the conv map and the head, so they are refused, with the reason.
    """

    cam_ok = False
    conv = None

    def __init__(self, model: nn.Module, image_size: int, trace_error: str):
        self.model, self.trace_error = model.eval(), trace_error
        self.modules = dict(model.named_modules())
        order, shapes, calls = [], {}, {}

        def record(name):
            def hook(mod, args, out):
                calls[name] = calls.get(name, 0) + 1
                if isinstance(out, torch.Tensor):
                    shapes.setdefault(name, tuple(out.shape))
                    order.append(name)
                if isinstance(mod, nn.Linear) and args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(name + ":input", tuple(args[0].shape))
            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in self.modules.items() if n]
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, image_size, image_size))
        except Exception as exc:  # noqa: BLE001 - the model's own code failing on this input size
            raise _size_error(model, image_size, "its forward", exc) from None
        finally:
            for h in handles:
                h.remove()
        self._shapes, self.calls = shapes, calls
        self.names = {n: n for n in dict.fromkeys(order)} | {n: n for n in shapes if n.endswith(":input")}
        self.by_name = self.names
        linears = [n for n in order if isinstance(self.modules[n], nn.Linear)]
        self.linear = linears[-1] if linears else None
        self.final_linear_name = self.linear
        if self.linear is not None and calls[self.linear] > 1:
            self.linear = None  # its input is not one vector per image: no penultimate (resolve_layers says so)

    @property
    def penultimate(self) -> str:
        return self.linear + ":input"

    def shape(self, node: str) -> tuple:
        return self._shapes.get(node, ())

    def find(self, query: str) -> str:
        if query in self.names:
            runs = self.calls.get(query.partition(":")[0], 1)
            if runs > 1:  # a hook sees every call: which output is "the" layer is not defined
                raise UserError(f"layer '{query}': module '{query.partition(':')[0]}' runs {runs} times per "
                                f"forward ({self.trace_error}, so layers come from module hooks); name a module "
                                f"that runs once")
            return query
        sample = ", ".join([n for n in self.names if not n.endswith(":input")][-6:])
        raise UserError(f"unknown layer '{query}': {self.trace_error}, so layers are module names here "
                        f"(such as {sample}) or penultimate")


class HookedExtractor(nn.Module):
    """FeatureExtractor's counterpart for a Hooked model: {node: tensor} plus the logits, one forward."""

    logits_name = "logits"

    def __init__(self, hooked: Hooked, node_names: list[str]):
        super().__init__()
        self.model, self.names, self.outs = hooked.model, list(dict.fromkeys(node_names)), {}
        for name in self.names:
            module_name, _, part = name.partition(":")
            mod = hooked.modules[module_name]
            # copies: a later in-place op (ReLU(inplace=True), +=) would change the tensor the hook saw
            if part == "input":
                mod.register_forward_pre_hook(lambda m, args, name=name: self.outs.__setitem__(name, args[0].clone()))
            else:
                mod.register_forward_hook(lambda m, args, out, name=name: self.outs.__setitem__(name, out.clone()))

    def forward(self, x):
        self.outs = {}
        logits = self.model(x)
        return {**self.outs, "logits": logits}


def extractor_for(traced, node_names: list[str]) -> nn.Module:
    if isinstance(traced, Hooked):
        return HookedExtractor(traced, node_names)
    return FeatureExtractor(traced, node_names)


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


def default_layers(traced: Traced) -> list[str]:
    """Two vector sets that differ. For a global-average-pool + linear head (the built-in CNN,
    ResNet, DenseNet, ...) conv's GAP is exactly the penultimate vector, so conv comes CAM-pooled
    there (the map weighted by where the predicted class's evidence sits)."""
    out = []
    if traced.conv is not None and not traced.trace_error:
        out.append("conv:cam" if traced.cam_ok else "conv")
    if traced.linear is not None:
        out.append("penultimate")
    return out or ["conv"]  # neither: resolve_layers says why conv is unavailable


def same_vectors(traced: Traced, layers: list[Layer]) -> list[tuple[str, str, str]]:
    """(layer, layer, why) for requested layers that are the same vectors: the conv map's GAP and
    penultimate where the head is GAP + linear (the penultimate node is the pooled conv map
    itself), or two names of one node pooled the same way."""
    pairs, seen = [], {}
    for layer in layers:
        key = (layer.node, layer.pooling)
        if traced.cam_ok and layer.pooling == "gap" and layer.node == traced.names.get(traced.conv):
            key = (traced.names.get(traced.penultimate), "none")
        if key not in seen:
            seen[key] = layer
            continue
        first = seen[key]
        why = ("one node, pooled the same way" if (first.node, first.pooling) == (layer.node, layer.pooling) else
               "the head is global-average-pool + linear: the pooled conv map is the penultimate vector")
        pairs.append((first.name, layer.name, why))
    return pairs


def resolve_layers(traced: Traced, specs: list[str]) -> list[Layer]:
    layers: dict[str, Layer] = {}
    for spec in specs:
        spec, _ = split_metric(spec.strip())
        base, _, pooling = spec.partition(":")
        if pooling and pooling not in POOLINGS:
            raise UserError(f"unknown pooling '{pooling}' in layer '{spec}' (poolings: {', '.join(POOLINGS)})")
        if base == "penultimate":
            if traced.linear is None:
                raise UserError("layer 'penultimate': the model has no final nn.Linear classifier (its input is the "
                                "penultimate layer); name a node instead")
            node, alias = traced.penultimate, "penultimate"
        elif base == "conv":
            if traced.trace_error:
                raise UserError(f"layer 'conv' is unavailable: {traced.trace_error}, and finding the last conv map "
                                f"needs the graph; explicit module names and penultimate still work")
            if traced.conv is None:
                raise UserError("layer 'conv' is unavailable: no (N, C, H, W) map is pooled into the final "
                                "classifier (a model without a conv map in front of its head, such as a "
                                "transformer); use penultimate or name a node")
            node, alias = traced.conv, "conv"
        else:
            node, alias = traced.find(base), "node"
        shape = traced.shape(node)
        if len(shape) == 4:
            pooling = pooling or "gap"
            if pooling == "cam" and not (node is traced.conv and traced.cam_ok):
                raise UserError(f"layer '{spec}': cam pooling needs the last conv map of a global-average-pool + "
                                f"linear head, which this model does not have; use conv or conv:flat")
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


# ops whose output is a new tensor, never a view of an input: aliasing stops at them
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                  nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AvgPoolNd,
                  nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._MaxPoolNd)
_FRESH_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.cat,
                    F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.linear, F.conv2d}


_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                       operator.itruediv: operator.truediv}


def _in_place(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the op writes into its first input: an `inplace` module or keyword, `+=`, `*=`, a
    tensor method or torch function named with a trailing underscore (`x.relu_()`, `x.add_(y)`,
    `torch.relu_(x)`; not Python's `operator.and_`, which is `a & b`)."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if getattr(m, "inplace", None) is True:
            return True
        if isinstance(m, _FRESH_MODULES):  # timm's BatchNormAct2d: the norm reads the input, its act writes the norm's output
            return False
        # another leaf module with children: its first child reads the input (eval dropout and
        # Identity hand it on); an in-place one later writes what an earlier one made
        first = next((c for c in m.modules() if c is not m and not list(c.children())
                      and not isinstance(c, (nn.modules.dropout._DropoutNd, nn.Identity))), None)
        return getattr(first, "inplace", None) is True
    if n.op == "call_method":
        return _underscored(n.target)
    if n.op == "call_function":
        return (n.kwargs.get("inplace") is True or n.target in _IN_PLACE_OPERATORS
                or (getattr(n.target, "__module__", None) not in ("_operator", "operator")
                    and _underscored(getattr(n.target, "__name__", ""))))
    return False


def _underscored(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def _fresh(n: fx.Node, gm: fx.GraphModule) -> bool:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.modules.dropout._DropoutNd):  # in eval mode it returns its input itself
            return False
        return isinstance(m, _FRESH_MODULES) or (hasattr(m, "inplace") and m.inplace is False)
    if n.op == "call_function":
        if n.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
            return False
        return n.target in _FRESH_FUNCTIONS or n.kwargs.get("inplace") is False
    return n.op == "call_method" and n.target == "clone"


def _sharing(gm: fx.GraphModule) -> tuple[dict, dict]:
    """Graph position of each node, and which nodes may share storage with which (the links of
    every op not known to make a new tensor: views, in-place ops and whatever is unknown)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    links: dict = {n: set() for n in order}
    for n in order:
        if not _fresh(n, gm):
            for a in n.all_input_nodes:
                links[n].add(a)
                links[a].add(n)
    return order, links


def _group(start: fx.Node, links: dict, keep) -> set:
    seen, todo = {start}, [start]
    while todo:
        n = todo.pop()
        for b in links[n]:
            if b not in seen and keep(b):
                seen.add(b)
                todo.append(b)
    return seen


def _keep_returned_tensors(gm: fx.GraphModule) -> None:
    """Make out-of-place the in-place ops that would overwrite a tensor the extractor returns
    (densenet's F.relu(inplace=True) on features.norm5, a custom net's ReLU(inplace=True) after a
    hooked layer), and only those: switching every ReLU of resnet18 out of place cost ~10% of
    its forward on 2 cores (benchmarks/RESULTS.md, `## extract`).

    An in-place op at node m overwrites a returned tensor when its first input shares storage
    with a node the output reads, computed before m (checked for each op on the graph as the
    ops before it left it): storage is followed through every op not known to
    make a new tensor (views, in-place ops and whatever is unknown count as sharing). In-place
    means an `inplace=True` module or keyword, `+=`-style operators, and any tensor method or
    torch function whose name ends in one underscore (`relu_`, `add_`, `clamp_`).

    The model's input is never written: when an in-place op would write into it, the graph starts
    from a copy of it (the caller's tensor stays as it was, LRP reads it again, and autograd
    refuses an in-place write into a leaf that requires grad: saliency's input)."""
    order, links = _sharing(gm)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    writers, copy_inputs = [], set()
    for m in list(order):
        if not _in_place(m, gm) or not m.args or not isinstance(m.args[0], fx.Node):
            continue
        writers.append(m)
        copy_inputs |= _group(m.args[0], links, lambda b: order[b] < order[m]) & set(inputs)
    for x in copy_inputs:
        with gm.graph.inserting_after(x):
            own = gm.graph.call_method("clone", (x,))
        x.replace_all_uses_with(own, delete_user_cb=lambda user: user is not own)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    changed = bool(copy_inputs)
    for m in writers:  # in graph order, each on the graph as the ones before it left it
        if changed:
            order, links = _sharing(gm)
            changed = False
        seen = _group(m.args[0], links, lambda b: order[b] < order[m])  # the storage m writes to
        hit = seen & set(out.all_input_nodes)  # the returned tensors (or the copies kept of them)
        if not hit:
            continue
        read_later = any(u.op != "output" and order[u] > order[m]
                         for n in seen - {m.args[0]} for u in n.users if u is not m)
        if read_later:
            _keep_copies(gm, m, hit)
        else:
            _out_of_place(gm, m)
        changed = True


def _keep_copies(gm: fx.GraphModule, m: fx.Node, hit: set) -> None:
    """The model reads the written storage again through another node (`v = h.view(...)`,
    `v.relu_()`, then `h + 1`): m stays in place, so the model computes what it did, and the
    extractor returns copies of the returned tensors it would overwrite, taken when they were
    computed. (Such a copy is not on the path to the logits: Grad-CAM cannot differentiate
    through it; no such net is known.)"""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    for r in hit:
        with gm.graph.inserting_after(r):
            kept = gm.graph.call_method("clone", (r,))
        out.replace_input_with(r, kept)


def _out_of_place(gm: fx.GraphModule, m: fx.Node) -> fx.Node | None:
    """Make the in-place op at m write a new tensor, and hand that tensor to the later nodes that
    read the one m wrote into (`x.relu_()` as a statement, then `x + 1`), so the model computes
    what it did; the output keeps the tensor as it was when computed. Returns the node that holds
    the new tensor."""
    import copy

    target = m.args[0]
    if m.op == "call_function" and m.target in _IN_PLACE_OPERATORS:
        m.target, holder = _IN_PLACE_OPERATORS[m.target], m
    elif m.op == "call_function" and m.kwargs.get("inplace") is True:
        m.kwargs, holder = {**m.kwargs, "inplace": False}, m
    elif m.op == "call_module" and getattr(gm.get_submodule(m.target), "inplace", None) is True:
        # this call only (a module may be called at several nodes): its own out-of-place copy
        own = copy.copy(gm.get_submodule(m.target))
        for attr, value in list(vars(own).items()):  # the same hooks, in dicts of its own
            if "hooks" in attr and isinstance(value, dict):
                setattr(own, attr, type(value)(value))
        own.inplace = False
        name = m.target.replace(".", "_") + "_out_of_place"
        gm.add_submodule(name, own)
        m.target, holder = name, m
    elif m.op == "call_module":  # in-place ops inside a leaf module: off for every call of it
        for sub in gm.get_submodule(m.target).modules():
            if getattr(sub, "inplace", None) is True:
                sub.inplace = False
        return None  # its output is not the tensor it wrote into: the later readers keep theirs
    else:  # a method or function that has no out-of-place switch (add_, clamp_): it writes a copy
        with gm.graph.inserting_before(m):
            holder = gm.graph.call_method("clone", (target,))
        m.args = (holder, *m.args[1:])
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for user in list(target.users):
        if user is not holder and user.op != "output" and position[user] > position[m]:
            user.replace_input_with(target, holder)
    return holder


def _drop_unused(gm: fx.GraphModule) -> None:
    """torch.fx's eliminate_dead_code, but an in-place op whose result nobody reads stays while
    a later node reads the storage it wrote (torch.fx counts tensor methods as pure, so
    `h.relu_()` written as a statement would vanish); one at the end of what is returned goes."""
    changed = True
    while changed:
        changed = False
        order, links = _sharing(gm)
        for n in reversed(list(gm.graph.nodes)):
            if n.users or n.is_impure():
                continue
            if _in_place(n, gm) and n.args and isinstance(n.args[0], fx.Node):
                group = _group(n.args[0], links, lambda b: b is not n)
                if any(order[u] > order[n] for g in group for u in g.users if u is not n):
                    continue
            gm.graph.erase_node(n)
            for other in links.pop(n, ()):
                links[other].discard(n)
            changed = True


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
        _keep_returned_tensors(gm)
        _drop_unused(gm)
        gm.recompile()
        self.gm, self.names = gm, wanted

    def forward(self, x):
        return dict(zip(self.names, self.gm(x)))


def head_weights(model_or_traced: Traced) -> tuple[torch.Tensor, torch.Tensor]:
    lin = model_or_traced.gm.get_submodule(model_or_traced.linear.target)
    bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
    return lin.weight.detach(), bias.detach()


def class_activation_map(fmap: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """CAM for one class per image (stages/explain/cam.py): (N, K, H, W) -> (N, H, W)."""
    from .explain.cam import cam

    return cam(fmap, weight, classes)


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
