"""The Python API against the command line on the embedded default: same tables, same rows,
same errors (featscope.UserError, one line), and the notebook summary."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import featscope
from featscope.cli import main
from tests.conftest import DIGITS

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ("images", "layers", "predictions", "embeddings", "cams", "explanations", "explanation_pairs", "perturbations",
         "knn", "knn_deep", "knn_labels", "twins", "index_layers", "errors")


def cli(*argv: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "featscope.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def same(a, b) -> bool:
    """Equal, NaN equal to NaN; floats to 1e-12 (DuckDB's parallel std/mean may differ in the last bit)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`featscope run` in its own process, with the settings of the session's API run."""
    out = tmp_path_factory.mktemp("cli") / "run"
    sets = [a for k, v in DIGITS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    cli("run", "--out", str(out), "--format", "json", *sets)
    return featscope.open(str(out))


def test_api_run_equals_the_cli_run(digits_run, cli_run):
    api = featscope.open(digits_run)
    for view in VIEWS:
        a, b = (r.sql(f"SELECT * FROM {view} ORDER BY ALL") for r in (api, cli_run))
        assert a.schema == b.schema and same(a.to_pylist(), b.to_pylist()), view
    results = sorted(p.name for p in Path(digits_run, "results").glob("*.parquet"))
    assert results == sorted(p.name for p in Path(cli_run.path, "results").glob("*.parquet")) and len(results) >= 6
    def by_key(rows):  # layer_comparison ranks by MAP@R: a last-bit difference may swap two equal layers
        return sorted(rows, key=lambda r: tuple(str(v) for v in r.values() if isinstance(v, str) or v is None))

    for name in results:
        a, b = (by_key(pq.read_table(Path(r, "results", name)).to_pylist()) for r in (digits_run, cli_run.path))
        assert same(a, b), name
    assert api.meta["fingerprint"] == cli_run.meta["fingerprint"]


@pytest.mark.parametrize("layer, view", [("conv:cam", "orig"), ("penultimate", "noise:0.05")])
def test_embeddings_equal_sql_rows(digits_run, layer, view):
    run = featscope.open(digits_run)
    ids, vecs = run.embeddings(layer, view=view)
    rows = json.loads(cli("sql", digits_run, f"SELECT image_id, vec FROM embeddings WHERE layer = '{layer}' "
                                             f"AND view = '{view}' ORDER BY image_id", "--format", "json"))
    assert ids.dtype == np.int64 and vecs.dtype == np.float32 and vecs.flags.c_contiguous
    assert ids.tolist() == [r["image_id"] for r in rows]
    np.testing.assert_array_equal(vecs, np.array([r["vec"] for r in rows], dtype=np.float32))


def test_sql_measure_status_compare_match_the_cli(digits_run):
    run = featscope.open(digits_run)
    table = run.sql("SELECT label_name, count(*) AS n FROM images GROUP BY 1 ORDER BY 1")
    assert isinstance(table, pa.Table) and table.column("n").to_pylist() == [r["n"] for r in json.loads(
        cli("sql", digits_run, "SELECT label_name, count(*) AS n FROM images GROUP BY 1 ORDER BY 1", "--format", "json"))]
    assert run.df("SELECT count(*) AS n FROM images")["n"][0] == 1797
    got = run.measure("knn_agreement", k=5).to_pylist()
    want = json.loads(cli("query", digits_run, "knn_agreement", "--param", "k=5", "--format", "json"))
    assert same([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in got], want)
    status = run.status().to_pylist()
    assert status == json.loads(cli("status", digits_run, "--format", "json"))
    assert {r["stage"]: r["status"] for r in status}["analyze"] == "done"
    cmp = featscope.compare(run, digits_run, measure="knn_agreement")
    assert cmp.num_rows > 0 and set(cmp.column(cmp.column_names[-1]).to_pylist()) <= {0, 0.0, None}


def test_neighbors_by_image_finds_the_image_itself(digits_run):
    run = featscope.open(digits_run)
    ids, _ = run.embeddings("conv:cam")
    image = run.images([ids[42]])[0]
    for query in (image, np.asarray(image)):
        table = run.neighbors(image=query, layer="conv:cam", k=3)
        assert table.column("image_id")[0].as_py() == ids[42] and table.column("distance")[0].as_py() < 1e-3
    by_id = run.neighbors(image_id=int(ids[42]), layer="penultimate", k=4)
    assert by_id.num_rows == 4 and int(ids[42]) not in by_id.column("image_id").to_pylist()


def test_images_are_the_stored_bytes_decoded(digits_run):
    import io

    from PIL import Image

    run = featscope.open(digits_run)
    row = pq.read_table(sorted(Path(digits_run, "images").glob("part-*.parquet"))[0],
                        columns=["image_id", "bytes"]).slice(0, 2).to_pylist()
    got = run.images([r["image_id"] for r in row][::-1])
    assert [np.asarray(g).tolist() for g in got] == \
        [np.asarray(Image.open(io.BytesIO(r["bytes"])).convert("RGB")).tolist() for r in row[::-1]]
    with pytest.raises(featscope.UserError, match="unknown image id 7"):
        run.images([7])


def test_errors_are_user_errors_and_leave_nothing(tmp_path, capsys):
    with pytest.raises(featscope.UserError, match="^not a featscope run"):
        featscope.open(tmp_path / "nothing")
    for kwargs in ({"data": str(tmp_path / "missing")}, {"layers": ["conv", "layer99"]}, {"k": 0},
                   {"bogus_key": 1}, {"model": 42}):
        with pytest.raises(featscope.UserError) as err:
            featscope.run(out=str(tmp_path / "run"), quiet=True, **kwargs)
        assert len(str(err.value).splitlines()) == 1
        assert not (tmp_path / "run").exists()
    # the CLI prints the same line
    with pytest.raises(featscope.UserError) as err:
        featscope.run(data=str(tmp_path / "missing"), out=str(tmp_path / "run"), quiet=True)
    assert main(["run", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"featscope: error: {err.value}"


def test_notebook_summary_escapes_strings_from_the_data(digits_run, tmp_path):
    text = featscope.open(digits_run)._repr_html_()
    assert "<table>" in text and "builtin:digits" in text and "conv" in text
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(digits_run, odd, ignore=shutil.ignore_patterns("*.parquet", "*.faiss"))
    meta = json.loads((odd / "run.json").read_text())
    meta["dataset"]["source"] = "<img src=x onerror=alert(1)>"
    (odd / "run.json").write_text(json.dumps(meta))
    page = featscope.open(str(odd))._repr_html_()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
