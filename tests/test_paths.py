"""SRC and RUN as file:// URIs give the same run as plain paths; other schemes stop with one line."""
from __future__ import annotations

import os
import warnings

import pytest

from pipeline.catalog import connect
from pipeline.cli import main
from pipeline.config import build_config
from pipeline.runner import run_pipeline

from .imagegen import encode, rgb, write


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "two classes"  # a space: the URI form percent-encodes it
    for label in ("cat", "dog"):
        for i in range(6):
            write(str(root / label / f"{i}.png"), encode(rgb(hash((label, i)) % 1000), "PNG"))
    return root


def _run(data: str, out: str) -> str:
    cfg = build_config(None, {"data": data, "out": out, "stages": ["ingest", "extract"]},
                       ["train_epochs=0", "perturb=[]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(cfg, quiet=True)["run"]


def _table(run: str) -> list[tuple]:
    return connect(run).execute("SELECT image_id, label_name, layer, vec FROM images JOIN embeddings "
                                "USING (image_id) ORDER BY ALL").fetchall()


def test_file_uris_for_data_and_run(ray_session, folder, tmp_path):
    plain = _run(str(folder), str(tmp_path / "plain"))
    uri_out = tmp_path / "by uri"
    run = _run(folder.as_uri(), uri_out.as_uri())
    assert run == str(uri_out) and os.path.exists(uri_out / "run.json")
    assert len(_table(run)) == 24 and _table(run) == _table(plain)
    # the other commands take the URI too
    assert main(["status", uri_out.as_uri(), "--format", "json"]) == 0


@pytest.mark.parametrize("flag, value", [("--data", "s3://bucket/imagenet/train"), ("--out", "gs://bucket/runs/x"),
                                         ("--data", "file://otherhost/data")])
def test_other_schemes_stop_with_one_line(tmp_path, capsys, flag, value):
    args = ["run", "--data", "builtin:digits", "--out", str(tmp_path / "r"), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and value in err[0]
    assert not (tmp_path / "r").exists()
