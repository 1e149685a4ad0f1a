"""featscope: does my network treat similar images similarly?

The Python API (docs/python.md):

    import featscope
    run = featscope.run(data="builtin:digits", out="runs/digits")   # the pipeline, as `featscope run`
    run = featscope.open("runs/digits")                              # a finished run
    run.sql("SELECT * FROM knn LIMIT 5")                             # read-only, a pyarrow Table
    run.measure("knn_agreement"); ids, vecs = run.embeddings("penultimate")
    featscope.compare(run_a, run_b)

The package is also the home of the whole distribution: `featscope.pipeline`, `featscope.stages`
and `featscope.queries` are the repository's top-level folders pipeline/, stages/ and queries/,
mapped into this package when installed (pyproject.toml). Names are loaded on first use, so
`import featscope` (and the CLI's start) does not import torch, Ray or DuckDB.
"""
from __future__ import annotations

import os as _os

from .core.config import UserError

# In a source checkout (tests from the repository root, `ray job submit --working-dir .`) this
# folder can be imported before the installed package; its sub-packages pipeline/, stages/ and
# queries/ then sit beside it, not inside it.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml")) and _os.path.isfile(_os.path.join(_ROOT, "stages", "extract.py")):
    __path__.append(_ROOT)  # noqa: F821 - a package's own __path__


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("featscope")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


__version__ = _version()
_API = ("run", "open", "compare", "train", "Run")
__all__ = ["UserError", "__version__", "run", "compare", "train", "Run"]  # not open: it would shadow the builtin


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'featscope' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
