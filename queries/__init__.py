"""The measures: one readable SQL file per measure, run by DuckDB over a run's catalog views.

Each file starts with its parameters as

    SET VARIABLE name = coalesce(getvariable('name'), DEFAULT)::TYPE;

so in the plain DuckDB CLI a user sets any of them (`SET VARIABLE k = 5;`) before
`.read queries/knn_agreement.sql`, and the file keeps them. Here the same lines are the
parameter declarations: `run_measure` resets every declared variable, sets the ones given
(cast to the declared type), then runs the file's statements.

knn_agreement.sql and class_distances.sql keep their figures (with per-class rows) as the
temporary tables `results_<measure>` and the parameters they were computed with as the variable
`<measure>_params`; knn_agreement.sql also keeps its per-image counts
(`results_knn_agreement_images`) and the kNN edges with both labels
(`results_knn_agreement_edges`). The measures that READS names read those tables:
class_distances.sql its kNN-scope distances from the labelled edges and its kNN triplets from
the per-image counts, suspicious.sql its candidates from the per-image counts, per_class.sql and
layer_comparison.sql are thin SQL over the figures; so the 10M kNN edges are joined to labels and
grouped per image once per connection. In the CLI a user
`.read`s the files in order (their headers say so; they stop with an error when an input is
missing or stale); here `relation` runs a measure's inputs first unless the connection already
holds them for the same parameters (as in the analyze stage, which runs every measure on one
connection).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import duckdb

from featscope.core.config import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
# the order the analyze stage runs them in
MEASURES = ("knn_agreement", "class_distances", "distance_histogram", "per_class", "suspicious", "continuity",
            "explanation_continuity", "layer_comparison", "image_agreement", "continuity_images",
            "explanation_images")
# measure -> the measures whose results_<measure> tables it reads
READS = {"class_distances": ("knn_agreement",),
         "suspicious": ("knn_agreement",),
         "per_class": ("knn_agreement", "class_distances"),
         "layer_comparison": ("knn_agreement", "class_distances"),
         "image_agreement": ("knn_agreement",),
         "distance_histogram": ("class_distances",),  # (which reads knn_agreement: _ensure follows it)
         "continuity_images": ("continuity",),
         "explanation_images": ("explanation_continuity",)}
_PARAM = re.compile(r"^SET VARIABLE (\w+) = coalesce\(getvariable\('(\w+)'\), (.*)\)::(\w+);\s*$", re.M)


@dataclass
class Param:
    name: str
    default: str  # the SQL expression of the default
    type: str


def sql_path(measure: str) -> str:
    if measure not in MEASURES:
        raise UserError(f"unknown measure '{measure}' (measures: {', '.join(MEASURES)})")
    return os.path.join(HERE, measure + ".sql")


def sql_text(measure: str) -> str:
    with open(sql_path(measure)) as fh:
        return fh.read()


def params(measure: str) -> list[Param]:
    out = []
    for m in _PARAM.finditer(sql_text(measure)):
        name, again, default, typ = m.groups()
        assert name == again, f"{measure}.sql: SET VARIABLE {name} reads getvariable('{again}')"
        out.append(Param(name, default, typ))
    return out


def parse_params(items: list[str] | None) -> dict[str, str]:
    """`--param name=value` strings -> {name: value}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param expects name=value, got {item!r}")
        name, value = item.split("=", 1)
        out[name.strip()] = value.strip()
    return out


def _lit(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _check(measure: str, given: dict, meta: dict | None) -> None:
    """What a run can answer: the layer must be one of its index layers, k at most its k."""
    if not meta:
        return
    layers = [k["name"] for k in meta.get("index_layers", [])]
    if given.get("layer") is not None and given["layer"] not in layers:
        raise UserError(f"unknown layer '{given['layer']}' for {measure} (layers of this run: "
                        f"{', '.join(layers) or 'none'})")
    methods = meta.get("explain") or []
    if given.get("method") is not None and given["method"] not in methods:
        raise UserError(f"unknown explanation method '{given['method']}' for {measure} (methods of this run: "
                        f"{', '.join(methods) or 'none'})")
    views = meta.get("views")
    if given.get("view") is not None and views is not None and given["view"] not in views:
        raise UserError(f"unknown view '{given['view']}' for {measure} (views of this run: "
                        f"{', '.join(views) or 'none'}; written NAME:STRENGTH as stored)")
    run_k = (meta.get("config") or {}).get("k")
    if given.get("k") is not None and run_k and int(given["k"]) > run_k:
        raise UserError(f"k={given['k']} is more than the run's k={run_k}")


def set_params(con: duckdb.DuckDBPyConnection, measure: str, given: dict | None = None,
               meta: dict | None = None) -> dict:
    """Reset the measure's variables and set the given ones; returns them as typed values."""
    declared = {p.name: p for p in params(measure)}
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise UserError(f"unknown parameter '{unknown[0]}' for {measure} "
                        f"(parameters: {', '.join(declared) or 'none'})")
    typed = {}
    for name, p in declared.items():
        con.execute(f"RESET VARIABLE {name}")
        if name not in given:
            continue
        value = con.execute(f"SELECT TRY_CAST({_lit(given[name])} AS {p.type})").fetchone()[0]
        if value is None or (isinstance(value, (int, float)) and value < (1 if name in ("k", "top") else 0)):
            raise UserError(f"parameter {name}={given[name]!r} for {measure}: expected a "
                            f"{'positive ' if name in ('k', 'top') else ''}{p.type.lower()}")
        typed[name] = value
    _check(measure, typed, meta)
    for name, value in typed.items():
        con.execute(f"SET VARIABLE {name} = {_lit(value)}::{declared[name].type}")
    return typed


def _holds(con: duckdb.DuckDBPyConnection, measure: str) -> bool:
    """Whether results_<measure> holds the figures for the parameters now set (its file sets
    `<measure>_params` to a struct of its parameters, in declaration order)."""
    struct = ", ".join(f"'{p.name}': getvariable('{p.name}')" for p in params(measure))
    return bool(con.execute(f"SELECT getvariable('{measure}_params') IS NOT DISTINCT FROM {{{struct}}}").fetchone()[0])


def _ensure(con: duckdb.DuckDBPyConnection, measure: str, given: dict, meta: dict | None) -> None:
    """Compute results_<measure> for these parameters unless the connection already holds it
    (and, when it must be computed, first the results it reads)."""
    names = {p.name for p in params(measure)}
    mine = {k: v for k, v in given.items() if k in names}
    set_params(con, measure, mine, meta)
    statements = duckdb.extract_statements(sql_text(measure))
    for s in statements:  # the parameter lines: the defaults resolved, to compare with
        if _PARAM.search(s.query):
            con.execute(s.query)
    if _holds(con, measure):
        return
    for dep in READS.get(measure, ()):
        _ensure(con, dep, given, meta)
    set_params(con, measure, mine, meta)
    for s in statements[:-1]:  # the last statement only reads the table back
        con.execute(s.query)


def relation(con: duckdb.DuckDBPyConnection, measure: str, given: dict | None = None,
             meta: dict | None = None) -> duckdb.DuckDBPyRelation:
    """The measure's result as a DuckDB relation (its inputs, then the file's SET lines run first)."""
    set_params(con, measure, given, meta)  # a wrong parameter fails before any work
    if measure in READS:
        for dep in READS[measure]:
            _ensure(con, dep, {k: v for k, v in (given or {}).items() if v is not None}, meta)
        set_params(con, measure, given, meta)
    statements = duckdb.extract_statements(sql_text(measure))
    for s in statements[:-1]:
        con.execute(s.query)
    return con.sql(statements[-1].query)


def run_measure(con: duckdb.DuckDBPyConnection, measure: str, given: dict | None = None,
                meta: dict | None = None):
    """The measure's result as a pyarrow Table."""
    return relation(con, measure, given, meta).fetch_arrow_table()
