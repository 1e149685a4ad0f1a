"""Extract: stored vectors and CAMs match a direct forward of the model; resume; overwrite."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from featscope.core.catalog import connect
from featscope.core.config import build_config
from featscope.pipeline.runner import run_pipeline
from featscope.stages.images import decode_rgb
from featscope.stages.models import build_model, preprocess_for


def _direct_forward(run_path, ids):
    """Recompute logits and the penultimate vector with plain PyTorch (forward hook), no featscope extractor."""
    meta = json.load(open(os.path.join(run_path, "run.json")))
    cfg = build_config(None, {k: v for k, v in meta["config"].items() if v is not None})
    model, info = build_model("smallcnn", os.path.join(run_path, "model", "smallcnn.pt"))
    pre = preprocess_for(cfg, info)
    table = pq.read_table(os.path.join(run_path, "images")).to_pandas().set_index("image_id")
    x = pre([decode_rgb(table.loc[i, "bytes"]) for i in ids])
    grabbed = {}
    model.fc.register_forward_hook(lambda m, inp, out: grabbed.update(pen=inp[0]))
    with torch.no_grad():
        logits = model(x)
    return model, logits, grabbed["pen"]


def test_embedded_default_trains_to_95_percent(digits_run):
    train = json.load(open(os.path.join(digits_run, "model", "train.json")))
    assert train["held_out_accuracy"] >= 0.95 and train["held_out_images"] >= 300


def test_vectors_predictions_and_cams_match_the_model(digits_run):
    con = connect(digits_run)
    got = con.execute("""SELECT p.image_id, p.pred, p.prob, e.vec, c.cam, c.class, c.height, c.width
                     FROM predictions p JOIN embeddings_penultimate e USING (image_id, view)
                     JOIN cams c USING (image_id, view) WHERE view = 'orig' ORDER BY image_id LIMIT 40""").fetchall()
    ids = [r[0] for r in got]
    model, logits, pen = _direct_forward(digits_run, ids)
    pred = logits.argmax(1)
    assert [r[1] for r in got] == pred.tolist()
    np.testing.assert_allclose([r[2] for r in got], torch.softmax(logits, 1).max(1).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array([r[3] for r in got]), pen.numpy(), atol=1e-4)
    # CAM correctness: spatial mean of the stored CAM + the head's bias = the logit, to the float16
    # rounding of the stored cells (half an ulp: 2^-11 of the largest cell) plus 1e-4
    cam_mean = np.array([np.mean(r[4]) for r in got])
    bias = model.fc.bias.detach().numpy()[[r[5] for r in got]]
    rounding = np.array([np.max(np.abs(r[4])) for r in got]) * 2.0 ** -11
    err = np.abs(cam_mean + bias - logits.gather(1, pred[:, None])[:, 0].numpy())
    assert (err <= rounding + 1e-4).all(), err.max()
    assert all(len(r[4]) == r[6] * r[7] for r in got)


def test_views_cover_every_image_once(digits_run):
    con = connect(digits_run)
    n = con.execute("SELECT count(*) FROM images").fetchone()[0]
    for layer in ("conv:cam", "penultimate"):
        assert con.execute(f"SELECT count(*), count(DISTINCT image_id) FROM embeddings WHERE layer = '{layer}'"
                           " AND view = 'orig'").fetchone() == (n, n)
        # and each perturbed view once per image
        assert con.execute(f"SELECT count(DISTINCT view), count(*) FROM embeddings WHERE layer = '{layer}'"
                           ).fetchone() == (6, 6 * n)
    assert con.execute("SELECT count(*) FROM predictions WHERE view = 'orig'").fetchone()[0] == n
    assert con.execute("SELECT count(*) FROM layers").fetchone()[0] == 2
    # the typed per-layer view works with DuckDB's array functions
    d = con.execute("SELECT array_distance(a.vec, b.vec) FROM embeddings_conv_cam a, embeddings_conv_cam b "
                "WHERE a.image_id = b.image_id AND a.view = b.view LIMIT 1").fetchone()[0]
    assert d == 0


def _mtimes(path):
    out = {}
    for folder, _, files in os.walk(path):
        for f in files:
            if f.endswith((".parquet", ".json")) and f != "run.json":
                p = os.path.join(folder, f)
                out[p] = os.stat(p).st_mtime_ns
    return out


def _shapes_cfg(out, **extra):
    sets = ["shard_size=40", "train_epochs=0", "batch_size=16", "perturb=[]"] + [f"{k}={v}" for k, v in extra.items()]
    return build_config(None, {"data": "builtin:shapes?n=100", "out": str(out),
                               "stages": ["ingest", "extract"]}, sets)


def test_resume_skips_finished_shards_and_redoes_missing_ones(ray_session, tmp_path):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = run_pipeline(_shapes_cfg(out), quiet=True)
        assert first["extract"]["shards"] == 3 and first["extract"]["redone"] == 3
        before = _mtimes(out)
        second = run_pipeline(_shapes_cfg(out), quiet=True)
        assert second["extract"]["redone"] == 0 and second["ingest"]["redone"] == 0
        assert _mtimes(out) == before  # nothing rewritten
        # a shard whose marker is gone (a crash before the stats file) is redone, and only it
        os.remove(out / "stats" / "extract" / "part-00001.json")
        third = run_pipeline(_shapes_cfg(out), quiet=True)
        assert third["extract"]["redone"] == 1
        changed = {p for p, t in _mtimes(out).items() if before.get(p) != t}
        assert changed and all("part-00001" in p for p in changed)
        con = connect(str(out))
        assert con.execute("SELECT count(*), count(DISTINCT image_id) FROM embeddings_conv_cam").fetchone() == (100, 100)
        # --overwrite redoes everything
        again = run_pipeline(_shapes_cfg(out, overwrite=True), quiet=True)
        assert again["extract"]["redone"] == 3


def test_changed_config_refuses_to_mix_runs(ray_session, tmp_path):
    from featscope.core.config import UserError

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(_shapes_cfg(out), quiet=True)
        with pytest.raises(UserError, match="another config"):
            run_pipeline(_shapes_cfg(out, image_size=48), quiet=True)


def test_where_the_replica_runs(monkeypatch):
    """auto: in the driver's process only for one CPU replica on the embedded Ray's one node (the
    actor pool's equality with it, bit for bit, is tests/test_cluster.py's killed-replica test)."""
    from featscope.stages.extract import in_driver

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert in_driver("auto", gpus=0, nodes=1, replicas=1)
    assert not in_driver("auto", gpus=1, nodes=1, replicas=1)
    assert not in_driver("auto", gpus=0, nodes=2, replicas=1)
    assert not in_driver("auto", gpus=0, nodes=1, replicas=2)
    assert not in_driver("ray", gpus=0, nodes=1, replicas=1)
    assert in_driver("driver", gpus=0, nodes=2, replicas=2)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster, or a job: the driver may be anywhere
    assert not in_driver("auto", gpus=0, nodes=1, replicas=1)


def test_extract_in_is_checked():
    from featscope.core.config import UserError

    with pytest.raises(UserError, match="extract_in must be auto, driver or ray, not 'gpu'"):
        build_config(None, {"data": "builtin:digits"}, ["extract_in=gpu"])
