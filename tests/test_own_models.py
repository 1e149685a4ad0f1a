"""The researcher's own networks: `package.module:factory`, an nn.Module object, timm models, and a
network torch.fx cannot trace. Features are checked against a plain forward pass written here."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import featscope
from featscope.cli import main
from featscope.core.config import UserError
from tests.custom_nets import TinyNet, make_net

DATA = "builtin:shapes?n=48&size=32"
SMALL = {"image_size": 32, "shard_size": 24, "batch_size": 16, "perturb": [], "quiet": True}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def plain_inputs(run: featscope.Run, ids) -> torch.Tensor:
    """The stored 32 px images normalised by hand (ImageNet statistics, no resize at this size)."""
    arr = np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in run.images(ids)])
    return torch.from_numpy(((arr - MEAN) / STD).transpose(0, 3, 1, 2)).float()


def seeded(factory):
    torch.manual_seed(0)  # what featscope does for a model without weights
    return factory().eval()


def cam_pooled(net: TinyNet, x: torch.Tensor) -> torch.Tensor:
    ref = net.reference(x)
    cls = ref["logits"].argmax(1)
    cam = torch.einsum("nk,nkhw->nhw", net.head.weight[cls], ref["map"]).clamp(min=0)
    w = cam / cam.sum(dim=(1, 2), keepdim=True)
    return torch.einsum("nkhw,nhw->nk", ref["map"], w)


@pytest.fixture(scope="module")
def factory_run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "factory"
    return featscope.run(DATA, "tests.custom_nets:make_net", ["conv", "conv:cam", "penultimate"], str(out), **SMALL)


def test_factory_model_end_to_end_equals_a_plain_forward(factory_run):
    ids, conv = factory_run.embeddings("conv")
    assert len(ids) == 48 and conv.dtype == np.float32
    net = seeded(make_net)
    with torch.no_grad():
        x = plain_inputs(factory_run, ids)
        ref = net.reference(x)
        cam = cam_pooled(net, x)
    np.testing.assert_allclose(conv, ref["conv"].numpy(), atol=1e-5)
    np.testing.assert_allclose(factory_run.embeddings("penultimate")[1], ref["penultimate"].numpy(), atol=1e-5)
    np.testing.assert_allclose(factory_run.embeddings("conv:cam")[1], cam.numpy(), atol=1e-5)
    preds = factory_run.sql("SELECT image_id, pred FROM predictions WHERE view = 'orig' ORDER BY image_id")
    assert preds.column("pred").to_pylist() == ref["logits"].argmax(1).tolist()
    # every measure ran for these layers
    layers = set(factory_run.measure("knn_agreement").column("layer").to_pylist())
    assert {"conv", "conv:cam", "penultimate"} <= layers
    assert factory_run.meta["model"]["kind"] == "factory" and factory_run.meta["model"]["sha256"]


def test_factory_run_neighbors_by_image_rebuilds_the_seeded_model(factory_run, tmp_path, capsys):
    ids, _ = factory_run.embeddings("conv")
    query = tmp_path / "query.png"
    factory_run.images([ids[5]])[0].save(query)
    assert main(["neighbors", factory_run.path, "--image", str(query), "--layer", "conv", "--k", "2"]) == 0
    assert str(ids[5]) in capsys.readouterr().out.splitlines()[2]
    table = factory_run.neighbors(image=np.asarray(factory_run.images([ids[5]])[0]), layer="penultimate", k=3)
    assert table.column("image_id")[0].as_py() == ids[5] and table.column("distance")[0].as_py() < 1e-4


def test_module_object_goes_through_the_object_store(factory_run, tmp_path):
    net = seeded(make_net)
    with torch.no_grad():
        net.head.weight.mul_(-1.0)  # unlike anything a seeded rebuild could give
        net.body[0].weight.add_(0.1)
    run = featscope.run(DATA, net, ["conv", "penultimate"], str(tmp_path / "object"),
                        stages=["ingest", "extract", "index"], **SMALL)
    ids, conv = run.embeddings("conv")
    with torch.no_grad():
        ref = net.reference(plain_inputs(run, ids))
    np.testing.assert_allclose(conv, ref["conv"].numpy(), atol=1e-5)
    assert not np.allclose(conv, factory_run.embeddings("conv")[1], atol=1e-3)
    assert run.meta["config"]["model"] == "object:TinyNet"
    assert run.neighbors(image=run.images([ids[3]])[0], layer="conv", k=1).column("image_id")[0].as_py() == ids[3]
    # a later session has no object: it says how to give it, and a different network is refused
    with pytest.raises(UserError, match="model=net"):
        featscope.open(run.path).neighbors(image=run.images([ids[3]])[0], layer="conv")
    with pytest.raises(UserError, match="not the one the run was made with"):
        featscope.open(run.path, model=make_net()).neighbors(image=run.images([ids[3]])[0], layer="conv")


def test_untraceable_network_works_through_hooks_where_it_can(ray_session, tmp_path):
    from tests.custom_nets import make_branchy

    with pytest.raises(UserError, match=r"layer 'conv' is unavailable: torch.fx cannot trace Branchy.*"
                                        r"explicit module names and penultimate still work"):
        featscope.run(DATA, "tests.custom_nets:make_branchy", ["conv"], str(tmp_path / "no"), **SMALL)
    assert not (tmp_path / "no").exists()
    run = featscope.run(DATA, "tests.custom_nets:make_branchy", ["penultimate", "body"], str(tmp_path / "hooks"),
                        stages=["ingest", "extract"], **SMALL)
    ids, pen = run.embeddings("penultimate")
    net = seeded(make_branchy)
    with torch.no_grad():
        ref = net.reference(plain_inputs(run, ids))
    np.testing.assert_allclose(pen, ref["penultimate"].numpy(), atol=1e-5)
    np.testing.assert_allclose(run.embeddings("body")[1], ref["conv"].numpy(), atol=1e-5)  # a map, GAP-pooled
    assert {l["node"] for l in run.meta["layers"]} == {"head:input", "body"}


def test_hooks_copy_outputs_and_refuse_modules_that_run_twice():
    from featscope.stages.layers import extractor_for, pool, resolve_layers, trace
    from tests.custom_nets import make_shared_act

    net = seeded(make_shared_act)
    traced = trace(net, 32)
    assert traced.trace_error
    with pytest.raises(UserError, match="module 'act' runs 2 times per forward"):
        resolve_layers(traced, ["act"])
    layers = resolve_layers(traced, ["proj", "penultimate"])
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outs = extractor_for(traced, [l.node for l in layers])(x)
        ref = net.reference(x)
    got = {l.name: pool(outs[l.node], l.pooling) for l in layers}
    assert (got["proj"] < 0).any()  # not overwritten by the in-place ReLU after it
    torch.testing.assert_close(got["proj"], ref["proj"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["penultimate"], ref["penultimate"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model, message", [
    ("no_such_package.nets:make", "cannot import no_such_package.nets: ModuleNotFoundError"),
    ("tests.custom_nets:make_broken", "the factory raised RuntimeError: out of coffee"),
    ("tests.custom_nets:make_nothing", "the factory returned str, not a torch nn.Module"),
    ("tests.custom_nets:missing", "tests.custom_nets has no attribute 'missing'"),
    ("tests.custom_nets:make_branchy", "layer 'conv' is unavailable"),
    ("tests.custom_nets:make_random", "the factory builds a different network on each call"),
    ("timm:no_such_net", "unknown timm model 'no_such_net'"),
    ("not a model", "unknown model 'not a model'"),
])
def test_bad_models_are_one_line_exit_2_and_leave_nothing(model, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--data", DATA, "--model", model, "--layers", "conv", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_timm_model_without_timm_installed_is_one_line(tmp_path):
    code = ("import sys; sys.modules['timm'] = None\n"  # what an environment without timm looks like
            "from featscope.cli import main\n"
            f"sys.exit(main(['run', '--data', '{DATA}', '--model', 'timm:resnet18', '--out', r'{tmp_path / 'r'}']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == \
        "featscope: error: timm: models need timm installed: pip install timm (the featscope[timm] extra)"
    assert not (tmp_path / "r").exists()


# ---- timm: conv and penultimate are timm's own forward_features (pooled) and pre-logits ----------
TIMM = {"resnet18": True, "convnext_atto": True, "efficientnet_b0": True, "mobilenetv3_small_050": True,
        "regnetx_002": True, "vit_tiny_patch16_224": False}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_layers_equal_forward_features_and_pre_logits(name):
    timm = pytest.importorskip("timm")
    from featscope.stages.layers import extractor_for, pool, resolve_layers, trace
    from featscope.stages.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = build_model(f"timm:{name}", None, 5)
    size = 224 if name.startswith("vit") else 64
    traced = trace(model, size)
    specs = ["conv", "penultimate"] if TIMM[name] else ["penultimate"]
    layers = resolve_layers(traced, specs)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outs = extractor_for(traced, [l.node for l in layers])(x)
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
    got = {l.alias: pool(outs[l.node], l.pooling) for l in layers}
    torch.testing.assert_close(got["penultimate"], pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[traced.names[traced.linear]], logits, atol=1e-5, rtol=1e-5)
    if TIMM[name]:
        torch.testing.assert_close(got["conv"], feats.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(UserError, match="layer 'conv' is unavailable: no .N, C, H, W. map"):
            resolve_layers(traced, ["conv"])
    assert info.image_size == timm.models.get_pretrained_cfg(name).input_size[-1]


def test_timm_model_runs_through_the_stages(ray_session, tmp_path, capsys):
    pytest.importorskip("timm")
    run = featscope.run(DATA, "timm:resnet18", ["conv", "penultimate"], str(tmp_path / "timm"), **SMALL)
    assert run.meta["cam"] is True
    assert set(run.measure("knn_agreement").column("layer").to_pylist()) >= {"conv", "penultimate"}
    ids, _ = run.embeddings("conv")
    assert run.neighbors(image=run.images([ids[0]])[0], layer="conv", k=1).column("image_id")[0].as_py() == ids[0]


def test_torchvision_seeded_model_neighbors_by_image(ray_session, tmp_path, capsys):
    """A randomly initialised torchvision model is rebuilt from its seed for a query image."""
    run = featscope.run(DATA, "resnet18", ["conv"], str(tmp_path / "tv"), stages=["ingest", "extract", "index"],
                        **SMALL)
    ids, _ = run.embeddings("conv")
    query = tmp_path / "q.png"
    run.images([ids[7]])[0].save(query)
    assert main(["neighbors", run.path, "--image", str(query), "--k", "1", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split(",")[1] == str(ids[7])


def test_model_argument_forms():
    """A name stays a name; an importable function becomes module:qualname (rebuilt on each worker);
    a lambda or a notebook function is called once and shipped as the object it returns."""
    from featscope.api import _model_arg

    assert _model_arg("timm:resnet18") == ("timm:resnet18", None)
    assert _model_arg(make_net) == ("tests.custom_nets:make_net", None)
    name, obj = _model_arg(lambda: TinyNet(3))
    assert name == "object:TinyNet" and isinstance(obj, TinyNet) and obj.head.out_features == 3
    # called under the fixed seed: the same network each time (a rerun of the notebook cell resumes)
    assert torch.equal(_model_arg(lambda: TinyNet(3))[1].head.weight, obj.head.weight)
    import functools

    assert _model_arg(functools.partial(TinyNet, 4))[0] == "object:TinyNet"  # not "functools:"
    net = TinyNet()
    assert _model_arg(net) == ("object:TinyNet", net)
    with pytest.raises(UserError, match="returned int, not a torch nn.Module"):
        _model_arg(lambda: 3)
    with pytest.raises(UserError, match="model must be a name, an nn.Module or a callable"):
        _model_arg(3.5)
