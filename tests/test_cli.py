"""The command line: user errors stop before any work with one line and exit 2; `featscope sql` is confined."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision

from featscope.cli import main


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "data not found"),
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--layers", "conv,layer9"], "unknown layer 'layer9'"),
    (["--set", "batchsize=3"], "unknown config key 'batchsize'"),
    (["--weights", "/no/such/weights.pt"], "weights file not found"),
    (["--data", "builtin:imagenet"], "unknown builtin dataset"),
    (["--stages", "ingest,frobnicate"], "unknown stage 'frobnicate'"),
    (["--set", "k=ten"], "config key 'k'"),
])
def test_user_errors_exit_2_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("featscope: error:")
    assert not out.exists()  # nothing was started


def test_unknown_config_key_in_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: builtin:digits\nlayerz: [conv]\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'layerz'" in capsys.readouterr().err


def test_weights_state_dict_and_checkpoint(tmp_path):
    from featscope.stages.models import build_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.pt")
    x = torch.randn(1, 3, 64, 64)
    for f in ("sd.pt", "ckpt.pt"):
        loaded, info = build_model("resnet18", str(tmp_path / f))
        assert info.num_classes == 7  # read from the head's weight shape
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_weights_with_pickled_code_are_refused(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    assert main(["run", "--model", "resnet18", "--weights", str(tmp_path / "evil.pt"), "--out",
                 str(tmp_path / "r")]) == 2
    assert "weights_only=True" in capsys.readouterr().err


def test_sql_formats(digits_run, capsys):
    q = "SELECT label_name, count(*) AS n FROM images GROUP BY 1 ORDER BY 1 LIMIT 2"
    assert main(["sql", digits_run, q, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"label_name": "0", "n": 178}, {"label_name": "1", "n": 182}]
    assert main(["sql", digits_run, q, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["label_name,n", "0,178", "1,182"]
    assert main(["sql", digits_run, q]) == 0
    assert "label_name" in capsys.readouterr().out


@pytest.mark.parametrize("query,message", [
    ("COPY (SELECT 1) TO '/tmp/featscope-leak.csv'", "refused a COPY"),
    ("ATTACH '/tmp/other.db'", "refused a ATTACH"),
    ("INSTALL vss", "refused"),
    ("SET enable_external_access = true", "refused"),
    ("CREATE TABLE t AS SELECT 1", "refused"),
    ("SELECT 1; DROP VIEW images", "refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", "SQL error"),
    ("SELECT * FROM read_parquet('/tmp/../etc/*.parquet')", "SQL error"),
    ("SELEC 1", "SQL error"),
])
def test_sql_is_read_only_and_confined_to_the_run(digits_run, capsys, query, message):
    assert main(["sql", digits_run, query]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not os.path.exists("/tmp/featscope-leak.csv")


def test_sql_may_read_the_runs_own_files(digits_run, capsys):
    path = os.path.join(digits_run, "images", "*.parquet")
    assert main(["sql", digits_run, f"SELECT count(*) AS n FROM read_parquet('{path}')", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 1797}]


def test_status(digits_run, capsys):
    assert main(["status", digits_run, "--format", "json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ingest"]["rows"] == 1797 and rows["extract"]["status"] == "done"


def test_two_names_of_the_same_vectors_are_said_and_the_default_differs(tmp_path, capsys):
    """smallcnn's head is GAP + linear: conv (GAP) is the penultimate vector (tests/test_layers.py
    checks that numerically); the default takes conv:cam beside penultimate instead."""
    from featscope.core.config import build_config
    from featscope.core.progress import set_quiet
    from featscope.pipeline.runner import Prepared

    set_quiet(False)  # an earlier --format json call in this process left it quiet

    def prepared(**keys):
        cfg = build_config(None, {"data": "builtin:shapes?n=8", "out": str(tmp_path / "run"), **keys},
                           ["train_epochs=0"])
        return cfg, Prepared(cfg)

    cfg, prep = prepared(layers=["conv", "penultimate"])
    err = capsys.readouterr().err
    assert "note: layers conv and penultimate are the same vectors for this network" in err
    assert [p[:2] for p in prep.same_vectors] == [("conv", "penultimate")]
    assert "global-average-pool + linear" in prep.same_vectors[0][2]
    cfg, prep = prepared()
    assert cfg.layers == ["conv:cam", "penultimate"] and [l.name for l in prep.layers] == cfg.layers
    assert "same vectors" not in capsys.readouterr().err and prep.same_vectors == []
    _, prep = prepared(model="resnet18", layers=["conv", "layer4", "penultimate"], image_size=32)
    assert prep.same_vectors[0][:2] == ("conv", "layer4")  # conv is layer4's last node, GAP both
    assert "one node, pooled the same way" in prep.same_vectors[0][2] and len(prep.same_vectors) == 2
    assert not (tmp_path / "run").exists()
