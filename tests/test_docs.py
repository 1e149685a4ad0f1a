"""The Python examples of docs/python.md and the README's "From Python" section run as written,
in order, in an empty folder (a notebook's `__main__` namespace: classes defined there travel to
the Ray workers by value)."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text()
    if section:  # from the section's heading to the next heading of the same level
        start = text.index(section)
        level = section.split(" ", 1)[0]
        nxt = re.search(rf"^{level} ", text[start + len(section):], re.M)
        text = text[start:start + len(section) + (nxt.start() if nxt else len(text))]
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("doc, section", [("docs/python.md", None), ("README.md", "## From Python")])
def test_examples_run_as_written(doc, section, ray_session, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(ROOT / doc, section)
    assert blocks, f"no python examples in {doc}"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{doc}[example {i + 1}]", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{doc} example {i + 1} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    assert capsys.readouterr().out  # the examples print what they show
