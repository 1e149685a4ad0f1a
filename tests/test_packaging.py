"""The distribution owns one import name: a built wheel holds `featscope` and nothing else at its
top level (the repository's pipeline/, stages/ and queries/ install inside it), with the SQL files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package_and_imports_from_anywhere(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.egg-info", "build",
                                                             ".bench", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
                   cwd=src, check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("featscope-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert top == {"featscope"}, top
    for part in ("featscope/pipeline/runner.py", "featscope/stages/extract.py", "featscope/queries/__init__.py",
                 "featscope/queries/knn_agreement.sql", "featscope/core/rundir.py", "featscope/cli.py"):
        assert part in names, part
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "featscope = featscope.cli:entry" in entry

    # installed on its own (the editable install of this checkout shadowed by PYTHONPATH)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") == \
        ["featscope"]
    code = ("import featscope, featscope.stages.extract, featscope.pipeline.runner, featscope.queries as q, os; "
            "print(featscope.__version__, os.path.dirname(featscope.__file__), os.path.isfile(q.sql_path('knn_agreement')))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    version, where, has_sql = out.stdout.split()
    assert version == "0.1.0" and where == str(target / "featscope") and has_sql == "True"


def test_source_checkout_imports_the_folders_beside_it():
    """From the repository root (tests, `ray job submit --working-dir .`) featscope/ is found first;
    its sub-packages are the top-level folders."""
    code = "import featscope.stages.extract as e, featscope.queries as q; print(e.__file__); print(q.HERE)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(ROOT / "stages" / "extract.py"), str(ROOT / "queries")]


def test_version_after_the_readme_install():
    out = subprocess.run([sys.executable, "-c", "import featscope; print(featscope.__version__)"], cwd="/",
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.0"
