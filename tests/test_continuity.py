"""Continuity under perturbation: views, the twins table and queries/continuity.sql."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from featscope.core.catalog import connect, write_catalog
from featscope.core.config import UserError, build_config
from featscope.core.rundir import RunDir, write_table_atomic
from featscope.pipeline.runner import run_pipeline
from featscope.queries import run_measure
from featscope.stages import perturb
from featscope.stages.images import decode_rgb
from featscope.stages.models import build_model, preprocess_for
from featscope.stages.twins import write_twins

VIEWS = ["noise=0", "shift=2", "noise=0.1"]


def continuity(run_path, **params):
    con = connect(run_path)
    return run_measure(con, "continuity", params, RunDir(run_path).read_meta()).to_pylist()


@pytest.fixture(scope="module")
def shapes_run(ray_session, tmp_path_factory):
    """36 shapes, a random built-in CNN, three views: small enough to recompute everything by hand."""
    out = str(tmp_path_factory.mktemp("cont") / "run")
    cfg = build_config(None, {"data": "builtin:shapes?n=36", "out": out, "k": 3, "perturb": VIEWS,
                             "layers": ["conv", "penultimate"]},  # conv GAP: recomputed by hand below
                       ["train_epochs=0", "batch_size=8", "metrics=[l2,cosine]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg, quiet=True)
    return out


def _inputs(run_path):
    """The images at the model's input size, made from the stored bytes, and the run's preprocessing."""
    meta = json.load(open(os.path.join(run_path, "run.json")))
    cfg = build_config(None, {k: v for k, v in meta["config"].items() if v is not None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, info = build_model("smallcnn", None, 12)  # only for its preprocessing defaults
    table = pq.read_table(os.path.join(run_path, "images"), columns=["image_id", "bytes"]).to_pydict()
    pre = preprocess_for(cfg, info)
    x_u8 = pre.geometry([decode_rgb(b) for b in table["bytes"]])
    return table["image_id"], pre, x_u8, meta["config"]["seed"]


def test_strength_zero_is_a_fixed_point(shapes_run):
    rows = [r for r in continuity(shapes_run, view="noise:0") if r["scope"] == "all"]
    assert {r["layer"] for r in rows} == {"conv", "penultimate", "conv:cosine", "penultimate:cosine"}
    for r in rows:
        assert r["n"] == 36 and r["input_dist_mean"] == 0 and r["feature_dist_mean"] == 0
        assert r["lipschitz_mean"] == 0 and r["lipschitz_max"] == 0
        assert r["twin_rank_mean"] == 1 and r["flip_rate"] == 0 and r["continuity_accuracy"] == 1
        assert r["cam_continuity_max"] == 0


def test_per_class_rows_and_views(shapes_run):
    rows = continuity(shapes_run, layer="conv")
    views = {r["view"] for r in rows}
    assert views == {"noise:0", "shift:2", "noise:0.1"}
    per_class = [r for r in rows if r["view"] == "shift:2" and r["scope"] != "all"]
    assert len(per_class) == 12 and sum(r["n"] for r in per_class) == 36


def _explainer(x, e_orig, e_view):
    """An explanation function for captum: the stored explanation of x, or of its perturbed view.

    captum calls it with the original inputs as a tuple (and wants a tuple back), then with the
    perturbed batch our perturb_func returned; tell them apart by value.
    """
    def explain(inp):
        if isinstance(inp, tuple):
            return tuple(explain(t) for t in inp)
        return e_orig if torch.equal(inp, x) else e_view

    return explain


def test_input_distances_and_cam_continuity_match_numpy_and_captum(shapes_run):
    """||x - x'|| from the images by hand; ||CAM(x) - CAM(x')||_1 / ||x - x'||_2 through Captum.

    Captum's sensitivity_max(explanation_func, x, perturb_func, n_perturb_samples=1, norm_ord=p)
    returns ||e(x) - e(x')||_p / ||e(x)||_p for the one perturbed input the perturb_func gives.
    Mapping to our figure: cam_continuity = sensitivity_max(CAM, norm_ord=1) * ||CAM(x)||_1 / ||x - x'||_2,
    with e = the CAM of the original's predicted class (the stored `class`), as featscope uses.
    """
    from captum.metrics import sensitivity_max

    ids, pre, x_u8, seed = _inputs(shapes_run)
    con = connect(shapes_run)
    cams = {(i, v): (c, np.array(cam)) for i, v, c, cam in
            con.execute("SELECT image_id, view, class, cam FROM cams").fetchall()}
    stored = {(i, v): d for i, v, d in con.execute("SELECT image_id, view, input_dist FROM perturbations").fetchall()}
    x = pre.normalize(x_u8)
    for view in ("shift:2", "noise:0.1"):
        xv = pre.normalize(perturb.apply(x_u8.float(), ids, view, seed))
        dist = (x - xv).flatten(1).norm(dim=1).numpy()
        np.testing.assert_allclose([stored[(i, view)] for i in ids], dist, rtol=1e-5)
        if view != "shift:2":
            continue
        # the explanations: the stored CAMs (featscope's), as tensors for captum
        e_orig = torch.tensor(np.stack([cams[(i, "orig")][1] for i in ids]))
        e_view = torch.tensor(np.stack([cams[(i, view)][1] for i in ids]))
        sens = sensitivity_max(_explainer(x, e_orig, e_view), x,
                               perturb_func=lambda inp, perturb_radius=0.0: xv, n_perturb_samples=1, norm_ord=1)
        expected = sens.numpy() * e_orig.abs().sum(1).numpy() / dist
        # and the same directly in numpy
        direct = np.abs(e_orig.numpy() - e_view.numpy()).sum(1) / dist
        np.testing.assert_allclose(expected, direct, rtol=1e-5)
        row = next(r for r in continuity(shapes_run, layer="conv", view=view) if r["scope"] == "all")
        assert row["cam_continuity_mean"] == pytest.approx(direct.mean(), rel=1e-4)
        assert row["cam_continuity_max"] == pytest.approx(direct.max(), rel=1e-4)
        # both CAMs are of the original's predicted class
        assert all(cams[(i, view)][0] == cams[(i, "orig")][0] for i in ids)


def test_lipschitz_matches_captum_on_features(shapes_run):
    """Local Lipschitz of the penultimate vectors vs Captum's sensitivity_max (norm_ord='fro' = L2):
    lipschitz = sensitivity_max(f, norm_ord='fro') * ||f(x)||_2 / ||x - x'||_2."""
    from captum.metrics import sensitivity_max

    con = connect(shapes_run)
    rows = con.execute("""SELECT o.vec, v.vec, p.input_dist FROM embeddings_penultimate o
                          JOIN embeddings_penultimate v ON v.image_id = o.image_id AND v.view = 'noise:0.1'
                          JOIN perturbations p ON p.image_id = o.image_id AND p.view = 'noise:0.1'
                          WHERE o.view = 'orig'""").fetchall()
    f_orig = torch.tensor(np.array([r[0] for r in rows]))
    f_view = torch.tensor(np.array([r[1] for r in rows]))
    dist = np.array([r[2] for r in rows])
    marker = torch.zeros(len(rows), 1)
    perturbed = marker + 1
    sens = sensitivity_max(_explainer(marker, f_orig, f_view), marker,
                           perturb_func=lambda inp, perturb_radius=0.0: perturbed, n_perturb_samples=1)
    lip = sens.numpy() * f_orig.norm(dim=1).numpy() / dist
    row = next(r for r in continuity(shapes_run, layer="penultimate", view="noise:0.1") if r["scope"] == "all")
    assert row["lipschitz_mean"] == pytest.approx(lip.mean(), rel=1e-4)
    assert row["lipschitz_max"] == pytest.approx(lip.max(), rel=1e-4)


def _linear_run(tmp_path, d_in=6, d_out=4, n=20):
    """A synthetic run of a linear model f(x) = W x, views x' = x + eps v_j (v_j: W's right singular vectors)."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(d_out, d_in))
    _, sing, vt = np.linalg.svd(W)
    x = rng.normal(size=(n, d_in))
    run = RunDir(str(tmp_path / "linear"))
    ids = np.arange(1, n + 1)
    labels = ids % 2
    write_table_atomic(run.p("images", "part-00000.parquet"), pa.table({
        "image_id": ids, "uri": [f"x{i}" for i in ids], "label": labels.astype(np.int32),
        "label_name": [str(l) for l in labels], "split": [None] * n, "width": [1] * n, "height": [1] * n}))
    feats, views = [], []
    for j in range(2):
        eps = 0.01 * (j + 1)
        xv = x + eps * vt[j]
        feats.append((f"sv{j}:{eps:g}", xv @ W.T))
        views += [(int(i), f"sv{j}:{eps:g}", float(np.linalg.norm(eps * vt[j]))) for i in ids]
    rows = [("orig", x @ W.T)] + feats
    vec = np.concatenate([f for _, f in rows]).astype(np.float32)
    table = pa.table({"image_id": np.tile(ids, len(rows)), "view": [v for v, _ in rows for _ in ids],
                      "pred": np.zeros(len(vec), np.int32), "prob": np.ones(len(vec), np.float32),
                      "vec": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), d_out)})
    write_table_atomic(run.p("features", "lin", "part-00000.parquet"), table)
    write_table_atomic(run.p("views", "part-00000.parquet"), pa.table({
        "image_id": pa.array([v[0] for v in views], pa.int64()), "view": [v[1] for v in views],
        "input_dist": pa.array([v[2] for v in views], pa.float32())}))
    run.write_meta({"layers": [{"name": "lin", "alias": "node", "node": "lin", "pooling": "none", "dim": d_out}],
                    "index_layers": [{"name": "lin", "features": "lin", "metric": "l2"}],
                    "views": [f for f, _ in feats], "config": {"k": 3}})
    return run, sing


def test_lipschitz_of_a_linear_model_is_its_singular_value(tmp_path):
    run, sing = _linear_run(tmp_path)
    write_twins(run, run.read_meta(), 1000, 0)
    write_catalog(run)
    rows = {r["view"]: r for r in continuity(run.path, layer="lin") if r["scope"] == "all"}
    # ||W (eps v_j)|| / ||eps v_j|| = sigma_j, for every image
    for j, view in enumerate(sorted(rows)):
        assert rows[view]["lipschitz_mean"] == pytest.approx(sing[j], rel=1e-4)
        assert rows[view]["lipschitz_max"] == pytest.approx(sing[j], rel=1e-4)


def test_twin_rank_and_continuity_accuracy_by_brute_force(shapes_run):
    con = connect(shapes_run)
    base = {i: np.array(v) for i, v in con.execute(
        "SELECT image_id, vec FROM embeddings_conv WHERE view = 'orig'").fetchall()}
    view = {i: np.array(v) for i, v in con.execute(
        "SELECT image_id, vec FROM embeddings_conv WHERE view = 'noise:0.1'").fetchall()}
    label = dict(con.execute("SELECT image_id, label FROM images").fetchall())
    ranks, cont = [], []
    for i, f in base.items():
        d_twin = np.linalg.norm(f - view[i])
        others = {j: np.linalg.norm(f - g) for j, g in base.items() if j != i}
        ranks.append(1 + sum(d < d_twin for d in others.values()))
        cont.append(d_twin < min(d for j, d in others.items() if label[j] != label[i]))
    row = next(r for r in continuity(shapes_run, layer="conv", view="noise:0.1") if r["scope"] == "all")
    assert row["twin_rank_mean"] == pytest.approx(np.mean(ranks), abs=1e-9)
    assert row["continuity_accuracy"] == pytest.approx(np.mean(cont), abs=1e-9)


def test_views_are_reproducible():
    x = torch.rand(3, 3, 16, 16) * 255
    for view in ("noise:0.1", "shift:2", "rotate:10", "blur:1", "jpeg:40", "contrast:0.3", "brightness:-0.1"):
        a, b = perturb.apply(x, [1, 2, 3], view, 0), perturb.apply(x, [1, 2, 3], view, 0)
        assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
        assert a.min() >= 0 and a.max() <= 255
    # the same image gets the same noise whatever batch it is in
    single = perturb.apply(x[1:2], [2], "noise:0.1", 0)
    assert torch.equal(single[0], perturb.apply(x, [1, 2, 3], "noise:0.1", 0)[1])


def test_bad_perturbations_are_user_errors():
    for spec, msg in [("wobble=2", "unknown perturbation"), ("noise=abc", "must be a number"),
                      ("jpeg=0", "quality"), ("noise=-1", ">= 0")]:
        with pytest.raises(UserError, match=msg):
            perturb.parse_view(spec)
    with pytest.raises(UserError, match="builtin:shapes"):
        build_and_prepare = build_config(None, {"perturb": ["background=1"]})
        from featscope.pipeline.runner import Prepared

        Prepared(build_and_prepare)


def test_continuity_accuracy_falls_as_noise_grows(digits_run):
    rows = [r for r in continuity(digits_run, layer="penultimate") if r["scope"] == "all"
            and r["view"].startswith("noise:")]
    by_sigma = sorted(rows, key=lambda r: float(r["view"].split(":")[1]))
    acc = [r["continuity_accuracy"] for r in by_sigma]
    assert len(acc) >= 3 and all(a >= b for a, b in zip(acc, acc[1:]))
    assert acc[0] > acc[-1]  # and it does fall: the measure measures


def test_shift_moves_content_and_replicates_edges():
    x = torch.rand(4, 3, 9, 11) * 255
    ids = [11, 12, 13, 14]
    out = perturb.apply(x, ids, "shift:3", 0)
    for n in range(4):
        # find the (dx, dy) that was drawn, then compare with a padded-slice reference in numpy
        found = False
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                a = x[n].numpy()
                padded = np.pad(a, ((0, 0), (3, 3), (3, 3)), mode="edge")
                ref = padded[:, 3 - dy:3 - dy + 9, 3 - dx:3 - dx + 11]
                if (dx or dy) and np.array_equal(ref, out[n].numpy()):
                    found = abs(round((dx ** 2 + dy ** 2) ** 0.5) - 3) <= 1
        assert found


def test_layer_comparison_carries_continuity(shapes_run):
    con = connect(shapes_run)
    comparison = {r["layer"]: r for r in run_measure(con, "layer_comparison", {}, RunDir(shapes_run).read_meta())
                  .to_pylist() if r["kind"] == "features"}  # (then one row per explanation method: test_explain)
    for layer, row in comparison.items():
        per_view = [r for r in continuity(shapes_run, layer=layer) if r["scope"] == "all"]
        # every view has the same images, so the layer's figure is the mean of the views' figures
        assert row["continuity_accuracy"] == pytest.approx(np.mean([r["continuity_accuracy"] for r in per_view]))
        assert row["twin_rank_mean"] == pytest.approx(np.mean([r["twin_rank_mean"] for r in per_view]))
