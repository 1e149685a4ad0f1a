"""Lookups on the embedded default run: by id, by file, the knn view, and bad input (exit code 2)."""
from __future__ import annotations

import json

import pytest

from featscope.core import catalog
from featscope.cli import main
from featscope.stages.builtin_data import digits_records
from featscope.stages.ingest import image_id
from featscope.stages.neighbors import COLUMNS, neighbors


@pytest.fixture(scope="module")
def digit_file(tmp_path_factory):
    rec = next(digits_records(17, 18, {}))
    path = tmp_path_factory.mktemp("q") / "digit.png"
    path.write_bytes(rec["bytes"])
    return str(path), image_id(rec["key"])


@pytest.mark.parametrize("layer", ["conv:cam", "penultimate"])
def test_lookup_by_file_finds_the_image_itself(digits_run, digit_file, capsys, layer):
    path, own = digit_file
    assert main(["neighbors", digits_run, "--image", path, "--layer", layer, "--k", "3", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [list(r) for r in rows] == [COLUMNS] * 3
    assert rows[0]["image_id"] == own and rows[0]["rank"] == 1 and rows[0]["distance"] < 1e-3
    assert rows[0]["uri"] == "builtin:digits/00017" and rows[1]["distance"] > 1e-3


def test_lookup_by_id_matches_the_knn_graph(digits_run):
    con = catalog.connect(digits_run)
    qid = con.sql("SELECT image_id FROM images ORDER BY image_id LIMIT 1 OFFSET 100").fetchall()[0][0]
    rows = neighbors(digits_run, image_id=qid, layer="conv:cam", k=10)
    graph = con.sql(f"SELECT neighbor_id, distance FROM knn WHERE layer = 'conv:cam' AND query_id = {qid} "
                    "ORDER BY rank").fetchall()
    assert len(rows) == 10 and all(r["image_id"] != qid for r in rows)
    assert [r["rank"] for r in rows] == list(range(1, 11))
    for r, (nid, dist) in zip(rows, graph):
        assert r["distance"] == pytest.approx(dist, abs=1e-5)
    assert {r["image_id"] for r in rows} == {nid for nid, _ in graph}  # ties aside: none in real features


def test_knn_view_of_the_default_run(digits_run):
    con = catalog.connect(digits_run)
    n = con.sql("SELECT count(*) FROM images").fetchall()[0][0]
    per = con.sql("SELECT layer, query_id, count(*) c, sum((query_id = neighbor_id)::INT) s FROM knn "
                  "GROUP BY ALL").fetchall()
    layers = {l for l, *_ in per}
    assert layers == {"conv:cam", "penultimate"} and len(per) == 2 * n
    assert {(c, s) for _, _, c, s in per} == {(10, 0)}


def test_bad_input_is_one_line_and_exit_2(digits_run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    for argv in (["--id", "12345"], ["--id", "12345", "--layer", "nope"], ["--image", str(bad)],
                 ["--image", str(tmp_path / "missing.png")]):
        assert main(["neighbors", digits_run, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("featscope: error:") and len(err.splitlines()) == 1, err
    assert main(["neighbors", str(tmp_path), "--id", "1"]) == 2
