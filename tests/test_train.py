"""The metric term of training (stages/train_terms.py, stages/train.py): the terms against hand
computations and pytorch-metric-learning, the CAM mask, P x K batches, lambda = 0, the checks made
before training, collapse, the command line, Ray Train, and the term's effect on the measures."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import featscope
from featscope.cli import main
from featscope.core.config import UserError, build_config
from featscope.stages.models import SmallCNN, Preprocess
from featscope.stages.train_terms import MetricTerm, cam_mask, embed

# ---- the terms on a hand-written batch -----------------------------------------------------------
# four unit vectors in the plane, two classes
ANGLES = torch.tensor([0.0, 0.5, 2.0, 2.4], dtype=torch.float64)
EMB = torch.stack([ANGLES.cos(), ANGLES.sin()], dim=1)
LABELS = torch.tensor([0, 0, 1, 1])


def dist(i, j) -> float:
    return float((EMB[i] - EMB[j]).norm())


def hand_batch_hard(margin: float, smooth: bool = False) -> float:
    losses = []
    for a in range(4):
        pos = max(dist(a, p) for p in range(4) if p != a and LABELS[p] == LABELS[a])
        neg = min(dist(a, n) for n in range(4) if LABELS[n] != LABELS[a])
        v = pos - neg + margin
        losses.append(math.log1p(math.exp(v)) if smooth else max(0.0, v))
    nonzero = [l for l in losses if l > 0]
    return sum(nonzero) / len(nonzero) if nonzero else 0.0  # PML averages the non-zero losses


def hand_supcon(t: float) -> float:
    sim = EMB @ EMB.T
    out = []
    for i in range(4):
        others = [a for a in range(4) if a != i]
        log_den = math.log(sum(math.exp(float(sim[i, a]) / t) for a in others))
        pos = [p for p in others if LABELS[p] == LABELS[i]]
        out.append(-sum(float(sim[i, p]) / t - log_den for p in pos) / len(pos))
    return sum(out) / len(out)


@pytest.mark.parametrize("name, margin", [("triplet", 0.2), ("triplet", 1.5), ("softmargin", 0.0)])
def test_triplet_terms_equal_hand_computation_and_pml(name, margin):
    from pytorch_metric_learning import losses, miners

    value, stats = MetricTerm(name, margin)(EMB, LABELS)
    want = hand_batch_hard(margin, smooth=name == "softmargin")
    assert float(value) == pytest.approx(want, abs=1e-9)
    pml = losses.TripletMarginLoss(margin=margin, smooth_loss=name == "softmargin")
    assert float(value) == pytest.approx(float(pml(EMB, LABELS, miners.BatchHardMiner()(EMB, LABELS))), abs=1e-12)
    # pooled over ordered pairs: (0,1), (1,0), (2,3), (3,2) same; 8 different
    assert stats.same_n == 4 and stats.same_sum == pytest.approx(2 * (dist(0, 1) + dist(2, 3)))
    assert stats.diff_n == 8 and stats.diff_sum == pytest.approx(2 * sum(dist(i, j) for i in (0, 1) for j in (2, 3)))
    triplets = [(a, p, n) for a in range(4) for p in range(4) for n in range(4)
                if p != a and LABELS[p] == LABELS[a] and LABELS[n] != LABELS[a]]
    eff = 0.0 if name == "softmargin" else margin
    assert stats.active == pytest.approx(np.mean([dist(a, p) - dist(a, n) + eff > 0 for a, p, n in triplets]))


def test_supcon_equals_hand_computation():
    value, _ = MetricTerm("supcon", 0.0)(EMB, LABELS)
    assert float(value) == pytest.approx(hand_supcon(0.1), abs=1e-9)


def test_semihard_miner_picks_only_semihard_triplets():
    term = MetricTerm("semihard", 1.5)
    a, p, n = term.miner(EMB, LABELS)
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        assert dist(i, j) < dist(i, k) < dist(i, j) + 1.5


# ---- where it applies ---------------------------------------------------------------------------
def test_cam_mask_of_ones_gives_conv_and_no_gradient_reaches_the_head():
    torch.manual_seed(0)
    fmap = torch.randn(6, 8, 5, 5)
    torch.testing.assert_close(embed("conv:cam", fmap, None, torch.ones(6, 5, 5)), embed("conv", fmap, None))
    # the term alone, on conv:cam: the head gets no gradient through the mask
    model = SmallCNN(3).train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    fmap = model.features(x)
    mask = cam_mask(fmap, model.fc.weight, y)
    assert mask.min() >= 0 and torch.allclose(mask.flatten(1).amax(1), torch.ones(6))
    value, _ = MetricTerm("triplet", 0.5)(embed("conv:cam", fmap, None, mask), y)
    value.backward()
    assert model.fc.weight.grad is None and model.features[0].weight.grad.abs().sum() > 0


def test_pk_batches_hold_k_images_of_p_classes():
    from featscope.stages.train import _batches

    y = torch.tensor(np.repeat(np.arange(6), [9, 7, 12, 5, 8, 10]))
    idx = torch.arange(len(y))
    batches = list(_batches(idx, y, (3, 4), 12, torch.Generator().manual_seed(0), 4))
    assert len(batches) == 4
    for b in batches:
        counts = np.bincount(y[b].numpy(), minlength=6)
        assert sorted(counts[counts > 0].tolist()) == [4, 4, 4]


# ---- fit ---------------------------------------------------------------------------------------
def digits(n: int = 240):
    from featscope.stages.builtin_data import digits_records
    from featscope.stages.train import _as_uint8, held_out_mask

    recs = list(digits_records(0, n, {}))
    pre = Preprocess(32, 32, (0.5,) * 3, (0.5,) * 3)
    x = _as_uint8(pre, [r["bytes"] for r in recs])
    y = torch.tensor([int(r["label_name"]) for r in recs])
    return pre, x, y, held_out_mask(np.arange(n), [None] * n, 0)


def trained(sets: list[str], n: int = 240, factory=None):
    from featscope.stages.train import fit

    pre, x, y, mask = digits(n)
    cfg = build_config(None, None, ["train_epochs=2", "train_batch_size=40", "train_warmup_epochs=1", *sets])
    torch.manual_seed(0)
    model = factory() if factory else SmallCNN(10)
    return model, fit(model, pre, x, y, mask, cfg)


def test_lambda_zero_is_bit_identical_to_cross_entropy():
    """The term's path (extractor forward, term computed, added with weight 0) changes no bit."""
    plain, _ = trained(["train_pk=5,8"])
    zero, metrics = trained(["train_pk=5,8", "train_term=triplet", "train_lambda=0", "train_positive_views=[]"])
    assert metrics["history"][-1]["term"] > 0  # computed, logged, and weighted by zero
    for (k, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), k
    other, _ = trained(["train_pk=5,8", "train_term=triplet", "train_lambda=1", "train_warmup_epochs=0"])
    assert not torch.equal(other.fc.weight, plain.fc.weight)  # and a non-zero lambda does change them


def test_training_graph_keeps_train_mode_code():
    """F.dropout(x, p, self.training) is baked into a traced graph: the term's extractor is traced in
    train mode, so training with the term keeps the dropout cross-entropy alone has."""
    from featscope.stages.train import _Term
    from tests.custom_nets import Dropping

    model = Dropping().train()
    cfg = build_config(None, None, ["train_term=triplet", "train_on=penultimate"])
    term = _Term(model, cfg, 32)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    a, b = (term.extractor(x)[term.pen] for _ in range(2))
    assert not torch.equal(a, b)  # dropout active (an eval-mode graph would give equal outputs)


def test_numpy_global_state_is_left_alone():
    np.random.seed(123)
    want = np.random.RandomState(123).rand(3)
    trained(["train_pk=5,8"])
    np.random.seed(123)
    assert np.array_equal(np.random.rand(3), want)
    state = np.random.get_state()
    trained(["train_pk=5,8"])
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_history_logs_the_term_and_collapse_stops_with_one_line():
    _, metrics = trained(["train_term=triplet", "train_positive_views=[noise=0.05,shift=2]"])
    row = metrics["history"][-1]
    assert set(row) >= {"ce", "term", "active", "same_dist", "diff_dist", "lambda"} and 0 <= row["active"] <= 1
    from tests.custom_nets import Constant

    with pytest.raises(UserError, match="training collapsed at epoch 1: every embedding on penultimate is the same"):
        trained(["train_term=triplet", "train_on=penultimate", "train_warmup_epochs=0"], factory=lambda: Constant(10))


# ---- before training: one line, exit 2 -----------------------------------------------------------
def one_class_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "one" / "only-class"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
    return str(tmp_path / "one")


@pytest.mark.parametrize("argv, message", [
    (["--model", "tests.custom_nets:make_flat_head", "--term", "triplet", "--on", "conv:cam", "--image-size", "32"],
     "train_on conv:cam needs a global-average-pool + linear head"),
    (["--term", "triplet", "--pk", "20,4"], "P = 20 classes per batch, but the training images hold 10 classes"),
    (["--pk", "20,4"], "P = 20 classes per batch"),  # asked for without a term: checked all the same
    (["--term", "softmargin", "--miner", "semihard"], "semi-hard mining would find no triplet"),
    (["--term", "triplet", "--pk", "2,400"], "K = 400 images per class, but class"),
    (["--term", "quadruplet"], "unknown train term 'quadruplet'"),
    (["--term", "triplet", "--on", "conv:gap"], "unknown train_on 'conv:gap'"),
    (["--term", "triplet", "--lambda", "-1"], "train_lambda and train_margin must be >= 0"),
    (["--term", "triplet", "--epochs", "3"], "would never apply: train_warmup_epochs (4) >= train_epochs (3)"),
])
def test_bad_training_settings_are_one_line_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["train", "--data", "builtin:digits", "--model", "smallcnn", "--out", str(out), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_a_term_needs_two_classes(tmp_path, capsys):
    assert main(["train", "--data", one_class_folder(tmp_path), "--model", "smallcnn", "--out", str(tmp_path / "m.pt"),
                 "--term", "triplet"]) == 2
    assert "needs at least two classes in the training images (found 1)" in capsys.readouterr().err


# ---- the command line, the pipeline, Ray Train ---------------------------------------------------------
def test_train_command_with_term_and_its_checkpoint_runs(ray_session, tmp_path, capsys):
    ckpt = tmp_path / "term.pt"
    assert main(["train", "--data", "builtin:shapes?n=96&size=32", "--model", "smallcnn", "--out", str(ckpt),
                 "--epochs", "2", "--warmup-epochs", "1", "--term", "semihard", "--margin", "0.3",
                 "--positive-views", "shift=2",
                 "--format", "json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["term"] == "semihard" and len(metrics["history"]) == 2
    run = featscope.run("builtin:shapes?n=96&size=32", "smallcnn", ["conv"], str(tmp_path / "run"), weights=str(ckpt),
                        stages=["ingest", "extract"], perturb=[], quiet=True)
    assert run.embeddings("conv")[1].shape == (96, 128)


def test_ray_train_two_workers_trains_and_its_checkpoint_extracts(ray_session, tmp_path, capsys):
    ckpt = tmp_path / "ddp.pt"
    assert main(["train", "--data", "builtin:shapes?n=96&size=32", "--model", "smallcnn", "--out", str(ckpt),
                 "--epochs", "2", "--warmup-epochs", "0", "--term", "triplet", "--workers", "2", "--format",
                 "json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["workers"] == 2 and len(metrics["history"]) == 2 and metrics["held_out_accuracy"] is not None
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    from featscope.stages.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = build_model("smallcnn", None, 12)[0].state_dict()  # the seeded start of every worker
    assert any(not torch.equal(state[k], fresh[k]) for k in fresh)  # trained, not the initial weights
    run = featscope.run("builtin:shapes?n=96&size=32", "smallcnn", ["conv"], str(tmp_path / "run"), weights=str(ckpt),
                        stages=["ingest", "extract"], perturb=[], quiet=True)
    assert run.embeddings("conv")[1].shape == (96, 128)


def test_run_trains_the_builtin_cnn_with_the_term(ray_session, tmp_path):
    run = featscope.run("builtin:shapes?n=96&size=32", out=str(tmp_path / "run"), stages=["ingest", "train", "extract"],
                        perturb=[], train_epochs=2, train_warmup_epochs=1, train_term="triplet", train_on="conv:cam",
                        quiet=True)
    saved = json.loads((tmp_path / "run" / "model" / "train.json").read_text())
    assert saved["term"] == "triplet" and "term" in saved["history"][-1]
    assert run.meta["config"]["train_on"] == "conv:cam"


# ---- what the term does to the measures ---------------------------------------------------------------
def test_the_term_improves_the_conv_layers_separation_at_equal_accuracy(ray_session, tmp_path):
    """On a small builtin:shapes set, fixed seeds: cross-entropy alone against cross-entropy + a
    semi-hard triplet term on the GAP of the last conv map. The conv layer's global ROC-AUC rises
    and its triplet violation rate falls, as featscope's own class_distances measures them, while
    held-out accuracy stays within 2 points (benchmarks/train.py has the full picture: not every
    term helps)."""
    common = dict(data="builtin:shapes?n=2400&size=32", layers=["conv"], perturb=[], train_epochs=10, quiet=True,
                  train_warmup_epochs=1,
                  stages=["ingest", "train", "extract", "index", "knn"])
    figures = {}
    for name, term in (("ce", {}), ("term", {"train_term": "semihard", "train_margin": 0.3})):
        run = featscope.run(out=str(tmp_path / name), **common, **term)
        glob = next(r for r in run.measure("class_distances", layer="conv").to_pylist() if r["scope"] == "global")
        acc = json.loads((tmp_path / name / "model" / "train.json").read_text())["held_out_accuracy"]
        figures[name] = (glob["auc"], glob["triplet_violation_rate"], acc)
    (auc_ce, viol_ce, acc_ce), (auc_t, viol_t, acc_t) = figures["ce"], figures["term"]
    assert auc_t >= auc_ce + 0.01, figures
    assert viol_t <= viol_ce - 0.01, figures
    assert abs(acc_t - acc_ce) <= 0.02 or acc_t > acc_ce, figures


@pytest.mark.parametrize("model", ["tests.custom_nets:make_net", "timm:resnet18"])
def test_own_and_timm_models_train_fine_tune_and_extract(model, ray_session, tmp_path, capsys):
    if model.startswith("timm:"):
        pytest.importorskip("timm")
    data, first, second = "builtin:shapes?n=96&size=32", tmp_path / "a.pt", tmp_path / "b.pt"
    common = ["--data", data, "--model", model, "--image-size", "32", "--epochs", "2", "--warmup-epochs", "1",
              "--term", "triplet", "--format", "json"]
    assert main(["train", *common, "--out", str(first)]) == 0
    assert main(["train", *common, "--out", str(second), "--weights", str(first)]) == 0  # fine-tuning
    capsys.readouterr()
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (first, second))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    run = featscope.run(data, model, ["conv", "penultimate"], str(tmp_path / "run"), weights=str(second),
                        image_size=32, stages=["ingest", "extract"], perturb=[], quiet=True)
    assert run.meta["config"]["weights"] == str(second) and len(run.embeddings("conv")[0]) == 96
