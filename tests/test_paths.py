"""SRC and RUN as file:// URIs give the same run as plain paths; SRC on S3 (a local moto server)
gives the same images and embeddings as the same folder on disk; what cannot be read stops with
one line."""
from __future__ import annotations

import json
import os
import warnings

import pytest

from featscope.core.catalog import connect
from featscope.cli import main
from featscope.core.config import build_config
from featscope.pipeline.runner import run_pipeline

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


def test_data_through_an_fsspec_only_scheme(ray_session, folder, tmp_path):
    """http:// has no pyarrow filesystem: fsspec's (directory index pages as listings) is wrapped
    for pyarrow; a plain `python -m http.server` of the folder gives the same run as the folder."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        plain = _run(str(folder), str(tmp_path / "plain"))
        run = _run(f"http://127.0.0.1:{server.server_address[1]}/two%20classes", str(tmp_path / "over http"))
        assert len(_table(run)) == 24 and _table(run) == _table(plain)
        uri = connect(run).execute("SELECT min(uri) FROM images").fetchone()[0]
        assert uri == f"http://127.0.0.1:{server.server_address[1]}/two%20classes/cat/0.png"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def s3(folder, hf_file):
    """A moto S3 server on loopback holding the folder under `two classes/` and a Parquet file;
    yields the URI query that points pyarrow's S3 client at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server._server.server_address[1]
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="featscope-test")
    for path in sorted(folder.rglob("*.png")):
        client.upload_file(str(path), "featscope-test", "two classes/" + path.relative_to(folder).as_posix())
    client.upload_file(str(hf_file), "featscope-test", "hf/train-00000.parquet")
    yield f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    server.stop()


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("hf") / "train-00000.parquet"
    blobs = [encode(rgb(i * 37), "PNG") for i in range(9)]
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": [["ant", "bee", "cow"][i % 3] for i in range(9)]}),
                   str(path), row_group_size=4)
    return path


def test_data_on_s3_equals_the_same_data_on_disk(ray_session, folder, hf_file, s3, tmp_path):
    plain = _run(str(folder), str(tmp_path / "plain"))
    run = _run(f"s3://featscope-test/two%20classes?{s3}", str(tmp_path / "from s3"))
    assert len(_table(run)) == 24 and _table(run) == _table(plain)  # same keys -> same ids, same pixels
    uris = [u for (u,) in connect(run).execute("SELECT uri FROM images ORDER BY uri").fetchall()]
    assert uris[0] == "s3://featscope-test/two%20classes/cat/0.png"  # the query (endpoint) is not kept
    # a Parquet file on S3: ingest reads its row groups by ranged reads
    cfg = build_config(None, {"data": f"s3://featscope-test/hf/train-00000.parquet?{s3}", "out": str(tmp_path / "hf"),
                              "stages": ["ingest"]}, ["train_epochs=0", "perturb=[]", "shard_size=4"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg, quiet=True)
    rows = connect(str(tmp_path / "hf")).execute("SELECT label_name, count(*), min(uri) FROM images GROUP BY 1 ORDER BY 1").fetchall()
    assert rows == [("ant", 3, "s3://featscope-test/hf/train-00000.parquet#0"),
                    ("bee", 3, "s3://featscope-test/hf/train-00000.parquet#1"),
                    ("cow", 3, "s3://featscope-test/hf/train-00000.parquet#2")]


def test_data_on_s3_that_is_missing_stops_with_one_line(s3, tmp_path, capsys):
    for data, words in ((f"s3://featscope-test/no-such-folder?{s3}", "data not found: s3://featscope-test/no-such-folder"),
                        (f"s3://featscope-test/x?{s3}&secret_key=abc", "environment"),
                        ("foo://bucket/x", "no pyarrow or fsspec filesystem for foo://"),
                        ("s3://featscope-test/x?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1",
                         "data s3://featscope-test/x: "),  # nothing listens on port 1
                        (f"s3://AKIAX:abc@featscope-test/x?{s3}", "credentials in the URI")):
        assert main(["run", "--data", data, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "abc" not in err[0], err
        assert not (tmp_path / "r").exists()
    # a run in a bucket that does not exist
    assert main(["run", "--data", "builtin:digits", "--out", f"s3://no-such-bucket/r?{s3}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'no-such-bucket' does not exist" in err[0], err


def test_remote_run_files_appear_whole_and_a_bad_run_json_stops(s3, tmp_path, capsys, monkeypatch):
    """An upload that fails midway leaves no file under the final name (only a hidden temporary,
    which the next run removes); a run.json that cannot be parsed is not taken for a new run;
    a percent-encoded run root passes DuckDB's allowed_directories."""
    import shutil

    import pyarrow as pa

    from featscope.core import rundir
    from featscope.core.rundir import RunDir, exists, listdir, remove_stale_temporaries, write_table_atomic

    run = RunDir(f"s3://featscope-test/my%20run?{s3}")
    run.write_meta({"fingerprint": "x"})
    table = pa.table({"image_id": pa.array(range(1000), pa.int64())})
    real_copy = shutil.copyfileobj

    def broken(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError("connection reset")

    monkeypatch.setattr(rundir.shutil, "copyfileobj", broken)
    with pytest.raises(Exception, match="connection reset"):
        write_table_atomic(run.p("images", "part-00000.parquet"), table)
    monkeypatch.setattr(rundir.shutil, "copyfileobj", real_copy)
    assert not exists(run.p("images", "part-00000.parquet"))
    assert [n for n in listdir(run.p("images")) if n.startswith(".")]  # the hidden temporary
    assert remove_stale_temporaries(run.root) == 1 and listdir(run.p("images")) == []
    write_table_atomic(run.p("images", "part-00000.parquet"), pa.table({
        "image_id": [1], "uri": ["u"], "label": [0], "label_name": ["a"], "split": [None], "width": [8], "height": [8]}))
    assert connect(run.path).execute("SELECT count(*) FROM images").fetchall() == [(1,)]  # locked, decoded root
    rundir.write_file_atomic(run.p("run.json"), lambda tmp: open(tmp, "w").write("{not json"))
    assert main(["status", run.path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read s3://featscope-test/my%20run/run.json" in err[0], err


def _default_run(out: str, stages=None) -> dict:
    cfg = build_config(None, {"data": "builtin:shapes?n=96", "out": out, **({"stages": stages} if stages else {})},
                       ["train_epochs=1", "perturb=[noise=0.05]", "deep_queries=50"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(cfg, quiet=True)


def _dump(run: str) -> dict:
    con = connect(run)
    return {q: con.execute(q).fetchall() for q in (
        "SELECT image_id, uri, label_name FROM images ORDER BY ALL",
        "SELECT layer, image_id, view, vec FROM embeddings ORDER BY layer, image_id, view",
        "SELECT layer, query_id, rank, neighbor_id FROM knn ORDER BY ALL")}


def test_run_on_s3_equals_the_same_run_on_disk(ray_session, s3, tmp_path, capsys):
    """Every stage (ingest, train, extract, index, knn, analyze) writes the run to S3 and reads it
    back from there; DuckDB reads it through pyarrow's client; a second run recomputes nothing."""
    import numpy as np

    _default_run(str(tmp_path / "local"))
    uri = f"s3://featscope-test/runs/a?{s3}"
    remote = _default_run(uri)
    assert remote["run"] == uri and not os.path.exists("s3:")
    a, b = _dump(str(tmp_path / "local")), _dump(uri)
    assert a.keys() == b.keys()
    for q in a:
        if "vec" in q:  # the checkpoint trained in each run: same seed, same data
            assert [r[:3] for r in a[q]] == [r[:3] for r in b[q]]
            np.testing.assert_allclose(np.array([r[3] for r in b[q]]), np.array([r[3] for r in a[q]]), atol=1e-4)
        else:
            assert a[q] == b[q], q
    # the measures, the SQL shell, neighbours and status all read the run on S3
    capsys.readouterr()
    assert main(["query", uri, "knn_agreement", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["scope"] for r in rows} >= {"all"} and all(r["n"] > 0 for r in rows)
    assert main(["sql", uri, "SELECT count(*) AS n FROM images", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 96}]
    some_id = b["SELECT image_id, uri, label_name FROM images ORDER BY ALL"][0][0]
    assert main(["neighbors", uri, "--id", str(some_id), "--k", "3", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    # resume: nothing is recomputed, and status says so
    _default_run(uri)
    assert main(["status", uri, "--format", "json"]) == 0
    status = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert status["extract"]["status"] == "done" and status["extract"]["redone"] == 0
    assert status["ingest"]["redone"] == 0 and status["ingest"]["rows"] == 96


@pytest.mark.parametrize("flag, value", [("--out", "foo://bucket/runs/x"), ("--data", "file://otherhost/data"),
                                         ("--out", "s3://bucket/runs/x?endpoint_override=127.0.0.1:1&scheme=http")])
def test_other_schemes_stop_with_one_line(tmp_path, capsys, flag, value):
    args = ["run", "--data", "builtin:digits", "--out", str(tmp_path / "r"), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and value.split("?")[0] in err[0]  # the query (endpoint, options) left out
    assert not (tmp_path / "r").exists()
