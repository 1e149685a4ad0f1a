"""The analyze stage: the deep search behind precision@1 / R-precision / MAP@R, results/ for every
measure, the summary `featscope run` ends with, and that the measures measure (a trained CNN
against the same network with random weights, on builtin:digits)."""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

from featscope import queries
from featscope.cli import main
from featscope.core.config import build_config
from featscope.core.rundir import RunDir
from featscope.stages import analyze
from tests.synthetic_measures import INDEX_LAYERS, Synthetic, write_run


@pytest.fixture(scope="module")
def syn():
    return Synthetic(seed=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, syn):
    return write_run(str(tmp_path_factory.mktemp("analyze") / "run"), syn)


@pytest.mark.parametrize("layer", INDEX_LAYERS, ids=lambda l: l["name"])
def test_deep_search_equals_brute_force(run, syn, layer):
    queries_ids = syn.ids[::7]
    qids, nbr, dist = analyze.deep_search(RunDir(run), layer["features"], layer["metric"], queries_ids, depth=40)
    assert list(qids) == sorted(queries_ids)
    full = syn.distances(layer)
    np.fill_diagonal(full, np.inf)
    row_of = {int(i): r for r, i in enumerate(syn.ids)}
    for q, got_ids, got_d in zip(qids, nbr, dist):
        r = row_of[int(q)]
        order = np.argsort(full[r], kind="stable")[:40]
        assert list(got_ids) == list(syn.ids[order])
        np.testing.assert_allclose(got_d, full[r, order], rtol=1e-5, atol=1e-6)


def test_analyze_writes_every_measure_and_a_seeded_sample(run, syn):
    cfg = build_config(None, {"out": run}, ["deep_queries=100", "deep_k=30"])
    res = analyze.run(RunDir(run), cfg, lambda items, **kw: items)
    assert res["measures"] == len(queries.MEASURES) and res["layers"] == len(INDEX_LAYERS)
    assert (res["deep_queries"], res["deep_images"], res["deep_k"]) == (100, len(syn.ids), 30)
    assert res["deep_sample"].startswith("seeded sample")
    for m in queries.MEASURES:
        t = pq.read_table(RunDir(run).p("results", m + ".parquet"))
        assert t.num_rows > 0 or m in ("continuity", "continuity_images", "explanation_continuity",
                                       "explanation_images")  # no perturbed views in this run
    deep = pq.read_table(RunDir(run).p("knn_deep", "conv"))
    first = sorted(set(deep.column("query_id").to_pylist()))
    sizes, label_of = np.bincount(syn.labels), dict(zip(syn.ids, syn.labels))
    sample = np.sort(np.random.default_rng(cfg.seed).choice(np.sort(syn.ids), 100, replace=False))
    # each query of the seeded sample to its R = class size - 1, capped at deep_k (the lone image: none)
    assert first == [q for q in sample if sizes[label_of[q]] > 1]
    assert deep.num_rows == sum(min(sizes[label_of[q]] - 1, 30) for q in sample) and \
        set(deep.column("rank").to_pylist()) == set(range(1, 31))
    # the same seed gives the same sample, and a run with nothing changed keeps its search
    mtime = RunDir(run).p("knn_deep", "conv", "part-00000.parquet")
    import os

    from featscope.core.rundir import layer_dir

    for layer in INDEX_LAYERS:  # every knn edge, with its labels (tests/test_queries.py checks the values)
        labelled = pq.read_table(RunDir(run).p("knn_labels", layer_dir(layer["name"])))
        assert labelled.num_rows == pq.read_table(RunDir(run).p("knn", layer_dir(layer["name"]))).num_rows
        assert set(labelled.column("layer").to_pylist()) == {layer["name"]}
    assert res["knn_labels_written"] == sum(pq.read_table(RunDir(run).p("knn_labels", layer_dir(l["name"]))).num_rows
                                            for l in INDEX_LAYERS)
    labels_file = RunDir(run).p("knn_labels", "conv", "part-00000.parquet")
    before, labels_before = os.stat(mtime).st_mtime_ns, os.stat(labels_file).st_mtime_ns
    again = analyze.run(RunDir(run), cfg, lambda items, **kw: items)
    assert os.stat(mtime).st_mtime_ns == before
    assert again["knn_labels_written"] == 0 and os.stat(labels_file).st_mtime_ns == labels_before
    assert sorted(set(pq.read_table(RunDir(run).p("knn_deep", "conv")).column("query_id").to_pylist())) == first
    agreement = {(r["layer"], r["scope"]): r for r in pq.read_table(RunDir(run).p("results", "knn_agreement.parquet")).to_pylist()}
    assert agreement[("conv", "all")]["deep_n"] == len(first) == 100 - sum(sizes[label_of[q]] == 1 for q in sample)
    columns, rows = analyze.summary_rows(run)
    assert columns[0] == "layer" and {r[0] for r in rows} == {l["name"] for l in INDEX_LAYERS}


# ---- the measures measure: builtin:digits, trained against random weights ---------------------
@pytest.fixture(scope="module")
def random_digits_run(ray_session, tmp_path_factory):
    """The built-in CNN with random weights (train_epochs=0), same data, same layers."""
    from featscope.pipeline.runner import run_pipeline

    out = tmp_path_factory.mktemp("digits-random") / "run"
    cfg = build_config(None, {"out": str(out)}, ["train_epochs=0", "perturb=[]"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg, quiet=True)
    return str(out)


def _comparison(path):
    return {r["layer"]: r for r in pq.read_table(RunDir(path).p("results", "layer_comparison.parquet")).to_pylist()
            if r["kind"] == "features"}  # (the explanation methods' rows: tests/test_explain.py)


def test_trained_cnn_scores_clearly_higher_than_random_weights(digits_run, random_digits_run):
    trained, random = _comparison(digits_run), _comparison(random_digits_run)
    assert set(trained) == set(random) == {"conv:cam", "penultimate"}
    for layer in trained:
        t, r = trained[layer], random[layer]
        assert t["agreement"] > r["agreement"] + 0.05, (layer, t["agreement"], r["agreement"])
        assert t["global_auc"] > r["global_auc"] + 0.02, (layer, t["global_auc"], r["global_auc"])
        assert t["map_at_r"] > r["map_at_r"] + 0.05, (layer, t["map_at_r"], r["map_at_r"])
        assert t["deep_n"] == t["n"] == 1797  # digits is small: every image is a deep query


def test_featscope_run_ends_with_the_summary(digits_run, tmp_path, capsys):
    # the run's own config again: every stage resumes, analyze recomputes, the summary is printed
    import yaml

    config = {k: v for k, v in RunDir(digits_run).read_meta()["config"].items()
              if k not in ("out", "stages", "overwrite")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--out", digits_run]) == 0
    out = capsys.readouterr().out
    assert "explanation continuity per layer" in out
    lines = out.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("layer "))
    assert lines[header].split() == analyze.SUMMARY_COLUMNS
    assert {lines[header + 2].split()[0], lines[header + 3].split()[0]} == {"conv:cam", "penultimate"}
    assert "precision@1, R-precision, MAP@R: exact search, 1797 of 1797 images" in out


def test_compare_two_digits_runs(digits_run, random_digits_run, capsys):
    assert main(["compare", random_digits_run, digits_run, "--format", "json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    agreement = {r["layer"]: r for r in rows if r["figure"] == "agreement"}
    assert set(agreement) == {"conv:cam", "penultimate"}
    assert all(r[[c for c in r if c.startswith("delta_")][0]] > 0.05 for r in agreement.values())
