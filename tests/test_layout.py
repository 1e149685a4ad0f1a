"""Imports run one way: face (featscope/api.py, cli.py) -> pipeline/ -> stages/ -> queries/ ->
featscope/core/ (docs/ARCHITECTURE.md). A lower folder importing a higher one fails here."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the featscope sub-packages it may import
LAYERS = {"featscope/core": {"core"},
          "queries": {"core", "queries"},
          "stages": {"core", "queries", "stages"},
          "pipeline": {"core", "queries", "stages", "pipeline"}}
PACKAGE = {"featscope/core": "core", "queries": "queries", "stages": "stages", "pipeline": "pipeline"}


def imported(path: Path, folder: str) -> set[str]:
    """The featscope sub-packages a file imports (absolute `featscope.X`, or relative within its own)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:  # relative: its own package
                out.add(PACKAGE[folder])
                continue
            if node.level > 1:  # from .. (featscope itself): `from ..core import x`, `from .. import api`
                out.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
                continue
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "featscope":
                out.add(parts[1] if len(parts) > 1 else "featscope")
            elif parts[0] in ("pipeline", "stages", "queries"):
                out.add(f"top-level {parts[0]}")  # the old names: not importable once installed
    return out


def _only_subpackages(path: Path) -> bool:
    """Every `from featscope import X` of the file imports sub-packages, not the API."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "featscope" and not node.level:
            if any(a.name not in ("core", "queries", "stages", "pipeline") for a in node.names):
                return False
        if isinstance(node, ast.Import) and any(a.name == "featscope" for a in node.names):
            return False
    return True


def test_imports_run_one_way():
    bad = []
    for folder, allowed in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            # `from featscope import queries` counts as queries; featscope itself (the face) never
            extra = imported(path, folder) - allowed
            if folder != "featscope/core":
                extra -= {"featscope"} if _only_subpackages(path) else set()
            if extra:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_wrong_import(tmp_path):
    wrong = tmp_path / "x.py"
    wrong.write_text("from featscope.pipeline.runner import run_pipeline\nimport stages.extract\n"
                     "from featscope import api\nfrom .. import cli\nfrom ..core import rundir\n")
    assert imported(wrong, "stages") == {"featscope", "api", "cli", "core", "pipeline", "top-level stages"}


OLD = re.compile(r"^\s*(from|import) (pipeline|stages|queries)\b|python -m (pipeline|stages|queries)\b|"
                 r"from (pipeline|stages|queries)\.\w+ import", re.M)


def test_no_old_top_level_names_anywhere():
    """tests/, benchmarks/ and the docs use featscope.X too: the old names import nothing once installed."""
    files = [p for d in ("tests", "benchmarks", "featscope", "pipeline", "stages", "queries", "docs")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".sql")] + [ROOT / "README.md"]
    bad = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}" for p in files if p.name != "test_layout.py"
           for m in OLD.finditer(p.read_text())]
    assert not bad, "\n".join(bad)
