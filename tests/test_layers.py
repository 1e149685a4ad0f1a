"""Layer aliases for each torchvision family (random weights), CAM exactness, node de-duplication."""
from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torchvision

from featscope.core.config import UserError
from featscope.stages.layers import (FeatureExtractor, Traced, class_activation_map, default_layers, head_weights,
                                     resolve_layers, same_vectors)
from featscope.stages.models import SmallCNN

# family -> (conv node, penultimate node, CAM exact?)
FAMILIES = {
    "resnet18": ("layer4.1.relu_1", "flatten", True),
    "resnet50": ("layer4.2.relu_2", "flatten", True),
    "vgg16": ("features.30", "classifier.5", False),
    "densenet121": ("relu", "flatten", True),
    "efficientnet_b0": ("features.8", "classifier.0", True),
    "convnext_tiny": ("features.7.2.add", "classifier.1", False),
    "mobilenet_v3_small": ("features.12", "classifier.2", False),
}


def _model(name):
    torch.manual_seed(0)
    if name == "smallcnn":
        return SmallCNN(5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, num_classes=5).eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_aliases_resolve_for_each_family(name):
    conv_node, pen_node, cam_exact = FAMILIES[name]
    model = _model(name)
    traced = Traced(model, 64)
    layers = {l.name: l for l in resolve_layers(traced, ["conv", "penultimate", "conv:flat"])}
    assert layers["conv"].node == conv_node and layers["penultimate"].node == pen_node
    assert traced.cam_ok is cam_exact
    ex = FeatureExtractor(traced, [conv_node, pen_node])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, logits = ex(x), model(x)
    # the extractor's own logits are the model's: one forward gives every layer and the prediction
    torch.testing.assert_close(out[ex.logits_name], logits, rtol=1e-4, atol=1e-4)
    fmap, pen = out[conv_node], out[pen_node]
    assert fmap.dim() == 4 and layers["conv"].dim == fmap.shape[1]
    assert layers["conv:flat"].dim == fmap[0].numel() and layers["penultimate"].dim == pen.shape[1]
    # the penultimate vector feeds the head: applying the final linear to it gives the logits
    lin = traced.gm.get_submodule(traced.linear.target)
    torch.testing.assert_close(lin(pen), logits, rtol=1e-4, atol=1e-4)
    if cam_exact:  # for GAP + linear heads the penultimate vector is the GAP of the conv map
        torch.testing.assert_close(fmap.mean(dim=(2, 3)), pen, rtol=1e-4, atol=1e-5)
    elif fmap.shape[1] == pen.shape[1]:
        assert not torch.allclose(fmap.mean(dim=(2, 3)), pen, atol=1e-3)
    # so the default is two sets that differ, and asking for conv beside penultimate says it is one set
    assert default_layers(traced) == (["conv:cam", "penultimate"] if cam_exact else ["conv", "penultimate"])
    assert [p[:2] for p in same_vectors(traced, list(layers.values()))] == (
        [("conv", "penultimate")] if cam_exact else [])
    assert same_vectors(traced, resolve_layers(traced, default_layers(traced))) == []


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "densenet121", "efficientnet_b0"])
def test_cam_mean_plus_bias_is_the_logit(name):
    model = _model(name)
    traced = Traced(model, 64)
    ex = FeatureExtractor(traced, [traced.names[traced.conv]])
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = ex(x)
        logits = model(x)
    w, b = head_weights(traced)
    for c in range(5):  # every class, not only the predicted one
        cls = torch.full((3,), c)
        cam = class_activation_map(out[traced.names[traced.conv]], w, cls)
        torch.testing.assert_close(cam.mean(dim=(1, 2)) + b[c], logits[:, c], rtol=0, atol=1e-4)


def test_cam_pooling_refused_without_gap_linear_head():
    traced = Traced(_model("vgg16"), 64)
    with pytest.raises(UserError, match="cam pooling"):
        resolve_layers(traced, ["conv:cam"])


def test_duplicate_nodes_are_returned_once_under_every_alias():
    traced = Traced(_model("resnet18"), 64)
    layers = resolve_layers(traced, ["conv", "layer4", "layer4:flat", "penultimate"])
    assert [l.name for l in layers] == ["conv", "layer4", "layer4:flat", "penultimate"]
    assert layers[0].node == layers[1].node == "layer4.1.relu_1"
    ex = FeatureExtractor(traced, [l.node for l in layers])
    with torch.no_grad():
        out = ex(torch.randn(1, 3, 64, 64))
    assert set(out) == {"layer4.1.relu_1", "flatten", "fc"}


def test_inplace_ops_do_not_overwrite_returned_maps():
    # densenet applies F.relu(inplace=True) to features.norm5: asking for both must keep norm5's negatives
    traced = Traced(_model("densenet121"), 64)
    ex = FeatureExtractor(traced, ["features.norm5", "relu"])
    with torch.no_grad():
        out = ex(torch.randn(2, 3, 64, 64))
    assert (out["features.norm5"] < 0).any()
    torch.testing.assert_close(out["relu"], out["features.norm5"].clamp(min=0))


class _Snapshot(torch.fx.Interpreter):
    """torch.fx's own interpreter over an untouched trace (in-place ops as the model has them),
    keeping a copy of each wanted node's output the moment it is computed: what it was then."""

    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.kept = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.kept[self.wanted[n]] = out.clone()
        return out


def _as_computed(model, names, size=16):
    traced = Traced(model, size)
    snap = _Snapshot(traced.gm, {traced.find(name): name for name in names})
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        snap.run(x.clone())  # (a model may write into its input)
    return x, snap.kept


def _extracted(model, wanted, size=16):
    """The extractor's outputs on the input `_as_computed` drew, each checked equal to torch.fx's
    snapshot of it, and the input checked unchanged; with the model's own logits on a copy."""
    x, ref = _as_computed(model, wanted, size)
    ex = FeatureExtractor(Traced(model, size), wanted)
    x_before = x.clone()
    with torch.no_grad():
        out = ex(x)
        logits = model(x_before.clone())
    for name in wanted:
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=0)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # the caller's input is left as it was
    return ex, out, ref, logits


def _out_of_place_copies(ex) -> list[str]:
    return [name for name, _ in ex.gm.named_children() if name.endswith("_out_of_place")]


class _SharedReLU(torch.nn.Module):
    """One in-place ReLU called twice: on a view of `a` (which overwrites a) and on b's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.act = torch.nn.ReLU(inplace=True)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        v = self.act(h.view(h.shape))
        g = self.act(self.b(v))
        g += v
        return self.fc(torch.flatten(self.pool(g), 1))


@pytest.mark.parametrize("wanted, copies", [(["a"], ["act_out_of_place"]), (["b"], ["act_out_of_place"]),
                                            (["pool"], [])])
def test_only_the_in_place_ops_that_would_overwrite_a_returned_tensor_go_out_of_place(wanted, copies):
    torch.manual_seed(0)
    model = _SharedReLU().eval()
    x, ref = _as_computed(model, wanted)
    ex = FeatureExtractor(Traced(model, 16), wanted)
    with torch.no_grad():
        out = ex(x)
    for name in wanted:
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=0)
    if wanted == ["a"]:
        assert (out["a"] < 0).any()  # the premise: a's negatives, which the first ReLU call would zero
    # the first call writes into a (returned in case 1) and, through b's input v, is before b;
    # for b, the second call writes into b's output itself. `act` keeps its in-place calls elsewhere
    assert sorted(set(_out_of_place_copies(ex))) == copies
    assert ex.gm.get_submodule("act").inplace is True


class _DropoutThenReLU(torch.nn.Module):
    """Eval-mode Dropout hands back its input tensor itself: the in-place ReLU after it writes into fc."""

    def __init__(self):
        super().__init__()
        self.conv, self.pool = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1)
        self.fc, self.drop, self.act = torch.nn.Linear(4, 6), torch.nn.Dropout(0.5), torch.nn.ReLU(inplace=True)
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.act(self.drop(self.fc(torch.flatten(self.pool(self.conv(x)), 1)))))


def test_an_in_place_op_after_eval_dropout_does_not_overwrite_a_returned_tensor():
    torch.manual_seed(0)
    _, _, ref, _ = _extracted(_DropoutThenReLU().eval(), ["fc"])
    assert (ref["fc"] < 0).any()  # the premise: negatives the ReLU would zero


class _InPlaceStatements(torch.nn.Module):
    """In-place tensor methods and torch functions, some as statements whose result is unused:
    the model reads the tensor they wrote into (`h.relu_()`, then `h + t`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 2)

    def forward(self, x):
        x.mul_(2.0)  # on the input itself
        h = self.a(x)
        h.relu_()
        t = torch.relu_(self.b(h))
        y = h + t
        y.add_(1.0)
        y.clamp_(max=2.0)
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("wanted", [["a"], ["b"], ["add"], ["a", "b", "add"]])
def test_in_place_methods_and_functions_do_not_overwrite_returned_tensors(wanted):
    torch.manual_seed(0)
    # (the model doubles its own input: _extracted checks the extractor leaves the caller's as it was)
    ex, out, ref, logits = _extracted(_InPlaceStatements().eval(), wanted)
    for name in wanted:
        assert (ref[name] < 0).any() or name == "add"  # the premise: negatives a relu_ would zero
    torch.testing.assert_close(out[ex.logits_name], logits, rtol=1e-6, atol=1e-6)  # what the model computes


def test_saliency_through_an_in_place_op_on_the_input():
    # autograd refuses an in-place write into a leaf that requires grad: the extractor's input
    # gets a copy instead, and the gradient is the model's
    torch.manual_seed(0)
    model = _InPlaceStatements().eval()
    ex = FeatureExtractor(Traced(model, 16), ["a"])
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    grad, = torch.autograd.grad(ex(x)[ex.logits_name][:, 0].sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    ref, = torch.autograd.grad(model(x2.clone())[:, 0].sum(), x2)
    torch.testing.assert_close(grad, ref)


class _WriteThroughView(torch.nn.Module):
    """An in-place ReLU through a view of `a`, and the model then reads `a` itself: making that
    ReLU out of place would change what the model computes."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        v = h.view(h.shape)
        v.relu_()
        return self.fc(torch.flatten(self.pool(h + 1.0), 1))


def test_a_write_through_a_view_read_back_through_its_base_keeps_model_and_returned_tensor():
    torch.manual_seed(0)
    ex, out, ref, logits = _extracted(_WriteThroughView().eval(), ["a"])
    assert (ref["a"] < 0).any()
    torch.testing.assert_close(out[ex.logits_name], logits, rtol=1e-6, atol=1e-6)


class _NoHead(torch.nn.Module):
    """No linear head (as squeezenet): nothing is returned but the wanted nodes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.b(self.a(x))
        h.relu_()
        return h.mean((2, 3))


def test_an_in_place_statement_after_the_wanted_nodes_is_dropped_with_what_feeds_it():
    ex = FeatureExtractor(Traced(_NoHead().eval(), 16), ["a"])
    assert [n.target for n in ex.gm.graph.nodes if n.op == "call_module"] == ["a"]


def test_python_operators_named_with_an_underscore_are_not_in_place():
    from featscope.stages.layers import _in_place

    gm = torch.fx.symbolic_trace(lambda a, b: (a > 0) & (b > 0) | ~(a < b))
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.and_, operator.or_)]
    assert len(ops) == 2 and not any(_in_place(n, gm) for n in ops)


def test_timm_batchnormact_does_not_write_its_input():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    traced = Traced(model, 32)
    in_place = sum(getattr(m, "inplace", False) is True for m in traced.gm.modules())
    x, ref = _as_computed(model, ["conv_stem"], size=32)
    ex = FeatureExtractor(traced, ["conv_stem", "bn1"])  # conv_stem is what bn1 (a BatchNormAct2d) reads
    with torch.no_grad():
        out = ex(x)
    torch.testing.assert_close(out["conv_stem"], ref["conv_stem"], rtol=0, atol=0)
    assert sum(getattr(m, "inplace", False) is True for m in ex.gm.modules()) == in_place == 49


class _ReturnedThenWritten(torch.nn.Module):
    """An in-place ReLU on a returned conv map, its own output returned too, and written again."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(4, 2)

    def forward(self, x):
        r = torch.nn.functional.relu(self.a(x), inplace=True)
        r.add_(1.0)
        return self.fc(torch.flatten(self.pool(r), 1))


def test_an_op_made_out_of_place_is_protected_in_turn_when_returned():
    torch.manual_seed(0)
    ex, out, ref, logits = _extracted(_ReturnedThenWritten().eval(), ["a", "relu"])
    assert out["relu"].min() == 0  # not the later add_'s 1.0
    torch.testing.assert_close(out[ex.logits_name], logits, rtol=1e-6, atol=1e-6)


def test_resnet18_keeps_its_in_place_relus():
    """Switching every ReLU out of place cost resnet18 ~10% of its forward on 2 cores; none of its
    in-place ops writes into the conv map or the penultimate vector."""
    names = ["layer4.1.relu_1", "flatten"]
    model = _model("resnet18")
    x, ref = _as_computed(model, names, 64)
    ex = FeatureExtractor(Traced(model, 64), names)
    with torch.no_grad():
        out = ex(x)
    for name in names:
        torch.testing.assert_close(out[name], ref[name], rtol=0, atol=0)
    assert _out_of_place_copies(ex) == []
    in_place = sum(getattr(m, "inplace", False) is True for m in ex.gm.modules())
    assert in_place == sum(getattr(m, "inplace", False) is True for m in model.modules()) == 9  # as torchvision builds it


def test_unknown_layer_is_a_user_error():
    with pytest.raises(UserError, match="unknown layer 'layer9'"):
        resolve_layers(Traced(_model("resnet18"), 64), ["layer9"])
