"""HTML building blocks of the report: one self-contained page, every string from the data escaped.

The page's building blocks (tables, cells, images, sections, the document); the sections add
headings and notes of their own, through `esc` like everything here. `esc` is applied to every
value that came from a run (class and file names, URIs, error messages, layer names); numbers
carry their exact value in `data-value` (what the tests compare with `featscope query`), shown
rounded.
"""
from __future__ import annotations

import html
import math

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 0 18px 60px; color: #222; }
h1 { font-size: 22px; margin: 18px 0 4px; } h2 { font-size: 18px; margin-top: 34px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 20px 0 6px; } nav a { margin-right: 12px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f4f4f4; }
td.best { font-weight: bold; background: #e6f4ea; } .note { color: #666; font-size: 12.5px; }
.missing { color: #8a5a00; background: #fff6e0; padding: 6px 10px; border-left: 3px solid #e0a000; }
.figs { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; } .figs img { max-width: 100%; }
.grid { display: flex; gap: 4px; margin: 4px 0 10px; flex-wrap: wrap; }
.cell { width: 78px; font-size: 10.5px; text-align: center; overflow-wrap: anywhere; }
.cell img, .cell .noimg { width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated; border: 3px solid transparent; }
.cell.query img, .cell.query .noimg { border-color: #1f77b4; } .cell.wrong img, .cell.wrong .noimg { border-color: #d62728; }
.noimg { display: inline-block; background: #eee; color: #999; line-height: 64px; }
.scroll { max-height: 420px; overflow: auto; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cell(value, best: bool = False) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        cls = "num best" if best else "num"
        return f'<td class="{cls}" data-value="{esc(repr(value))}">{esc(fmt(value))}</td>'
    return f"<td>{esc(fmt(value))}</td>"


def table(columns: list[str], rows: list, best: dict | None = None, cls: str = "", table_id: str = "") -> str:
    """rows: tuples in column order; best: column -> set of row indexes to mark."""
    best = best or {}
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(v, i in best.get(c, ())) for c, v in zip(columns, row)) + "</tr>"
                   for i, row in enumerate(rows))
    attrs = (f' class="{esc(cls)}"' if cls else "") + (f' id="{esc(table_id)}"' if table_id else "")
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def best_rows(columns: list[str], rows: list, higher: set, lower: set) -> dict:
    """column -> the indexes of the rows holding that column's best value (ties all marked)."""
    out = {}
    for j, c in enumerate(columns):
        if c not in higher and c not in lower:
            continue
        vals = [(i, r[j]) for i, r in enumerate(rows) if isinstance(r[j], (int, float)) and r[j] is not None
                and not (isinstance(r[j], float) and math.isnan(r[j]))]
        if len(vals) < 2:
            continue
        target = max(v for _, v in vals) if c in higher else min(v for _, v in vals)
        out[c] = {i for i, v in vals if v == target}
    return out


def image(uri: str, alt: str, width: int | None = None) -> str:
    w = f' width="{int(width)}"' if width else ""
    return f'<img src="{esc(uri)}" alt="{esc(alt)}"{w}>'


def thumb_cell(uri: str | None, lines: list[str], cls: str = "", title: str = "") -> str:
    pic = f'<img src="{esc(uri)}" alt="">' if uri else '<span class="noimg">no image</span>'
    text = "<br>".join(esc(x) for x in lines)
    return f'<div class="cell {esc(cls)}" title="{esc(title)}">{pic}<br>{text}</div>'


def missing(section: str, stage: str) -> str:
    return (f'<p class="missing">{esc(section)} needs the <b>{esc(stage)}</b> stage, which this run has not '
            f'finished: <code>featscope run ... --stages {esc(stage)}</code> (with the same settings) adds it.</p>')


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}\n</section>\n'


def document(title: str, sections: list[tuple[str, str, str]], head_extra: str = "", subtitle: str = "") -> str:
    """sections: (anchor, title, body html)."""
    nav = "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style>{head_extra}</head>\n<body>"
            f"<h1>{esc(title)}</h1><p class=\"note\">{esc(subtitle)}</p><nav>{nav}</nav>\n{body}</body></html>\n")
