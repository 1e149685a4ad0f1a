"""The queries benchmark at a small size: its pandas + numpy + scikit-learn implementation of every
measure (benchmarks/queries_pandas.py, written apart from the SQL) must agree with queries/*.sql on
a synthetic run, and the A/B script must run the whole suite. No timings are checked."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sql_suite_equals_pandas_on_a_small_synthetic_run(tmp_path):
    run = str(tmp_path / "run")
    out = _last_json(["benchmarks/queries.py", "--images", "3000", "--classes", "30", "--k", "8",
                      "--deep-queries", "300", "--keep", run])
    assert out["same_results"] is True
    assert {"suite_seconds", "vs_pandas"} <= set(out)
    assert set(out["per_measure_seconds"]) == {"knn_agreement", "class_distances", "per_class", "suspicious",
                                               "layer_comparison"}


def _in_git_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    return subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="needs the git checkout (queries/ as of HEAD)")
def test_suite_ab_runs_both_sides_and_compares_them(tmp_path):
    """A smoke test of the A/B script (in a clean checkout both sides are the same SQL)."""
    run = str(tmp_path / "run")
    _last_json(["benchmarks/queries.py", "--images", "1000", "--classes", "10", "--deep-queries", "100",
                "--keep", run, "--skip-pandas"])
    out = _last_json(["benchmarks/queries_ab.py", run, "--suite", "--rev", "HEAD", "--reps", "1"])["suite"]
    assert len(out["old_wall"]) == len(out["new_wall"]) == 1
    # HEAD's SQL against the working tree's: equal unless queries/ has uncommitted changes
    dirty = subprocess.run(["git", "status", "--porcelain", "queries"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    if not dirty:
        assert out["same"] is True and out["differ"] == []


def test_report_benchmark_runs_at_a_small_size(tmp_path):
    """benchmarks/report.py end to end on small runs (a real 300-image run, a 3,000-image synthetic
    one): its JSON keys and the pages it made. No timings are checked."""
    root = str(tmp_path / "bench")
    out = _last_json(["benchmarks/report.py", "--small", "300", "--images", "3000", "--classes", "20",
                      "--keep", root, "--set", "report_umap_points=0"])
    assert {"seconds_20k", "mb_20k", "rss_mb_20k", "seconds_1m", "mb_1m", "rss_mb_1m", "rss_ratio_1m_20k",
            "size_ratio_1m_20k", "rss_ratio_1m_20k_synthetic"} <= set(out)
    assert out["map_points_20k"] == 300 and out["map_points_1m"] == 3000
    for page in ("report-small", "report-big", "report-small-synthetic"):
        assert os.path.getsize(os.path.join(root, page, "index.html")) > 100_000


def test_explain_benchmark_runs_at_a_small_size(tmp_path):
    """benchmarks/explain.py end to end on 48 images at 32 px: its JSON keys, and featscope's stored
    scores equal to Quantus's own loop image by image. No timings are checked."""
    out = _last_json(["benchmarks/explain.py", "--n", "48", "--size", "32", "--batch", "16",
                      "--root", str(tmp_path / "bench")])
    assert set(out["cost_vs_features"]) == {"cam", "gradcam", "saliency", "lrp"}
    assert {"quantus_s", "featscope_marginal_s", "vs_quantus_marginal", "vs_quantus_whole"} <= set(out)
    assert out["quantus_images"] == 48
    assert max(out["max_rel_diff_vs_quantus"].values()) < 2e-3  # float16 storage


def test_knn_memory_part_runs_at_a_small_size():
    """benchmarks/knn.py --parts rss: the knn_rss_ratio_2m_200k figure, at sizes a test affords."""
    done = subprocess.run([sys.executable, "benchmarks/knn.py", "--parts", "rss", "--rss-small", "3000",
                           "--rss-large", "12000", "--ann-dim", "16"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out["rss_small_n"], out["rss_large_n"]) == (3000, 12000)
    for n in (3000, 12000):
        figures = out[f"rss_{n}"]
        assert figures["net_gb"] == pytest.approx(figures["peak_gb"] - figures["index_file_gb"], abs=2e-3)
        assert figures["peak_gb"] > 0.1  # the driver and the Ray processes were sampled
    assert out["knn_rss_ratio_2m_200k"] == pytest.approx(out["rss_12000"]["net_gb"] / out["rss_3000"]["net_gb"],
                                                         rel=1e-2)
