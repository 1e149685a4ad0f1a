"""Layer aliases for each torchvision family (random weights), CAM exactness, node de-duplication."""
from __future__ import annotations

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


def test_unknown_layer_is_a_user_error():
    with pytest.raises(UserError, match="unknown layer 'layer9'"):
        resolve_layers(Traced(_model("resnet18"), 64), ["layer9"])
