"""Old against new SQL of some measures, alternated in one process on the same run: the wall and
CPU seconds of each, and whether the results are equal. "old" is queries/<measure>.sql at a git
revision (default HEAD), "new" the working tree's; only the .sql files are swapped (queries/
__init__.py, which runs them, is the working tree's). The order alternates too (old, new, new,
old, ...), so neither side always pays the warm-up of the run's files.

    python benchmarks/queries.py --keep /tmp/qb --skip-pandas     # builds the 1M-image run once
    python benchmarks/queries_ab.py /tmp/qb --measures knn_agreement,suspicious --reps 3 [--rev HEAD~1]
    python benchmarks/queries_ab.py /tmp/qb --suite --reps 4 [--rev 15b40b8]

The per-measure mode runs both sides on one connection, so it cannot compare across a change of
the tables one measure keeps for another (b432381 changed knn_agreement's edges and made
class_distances' pairs a view): use --suite there, which opens a connection per pass.

Last line: one JSON object {measure: {old_wall, new_wall, old_cpu, new_cpu, ratio, same}}, ratio =
median new wall / median old wall. With --suite the unit is the whole suite (the measures of
benchmarks/queries.py in its order, on a fresh connection each time, the measures a measure reads
computed first as the analyze stage does), queries/*.sql as of REV against the working tree's;
the key is "suite", `same` says whether every measure's result is equal and `differ` lists those
that are not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import duckdb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from featscope import queries  # noqa: E402
from featscope.core import catalog  # noqa: E402


def timed(con, text: str):
    statements = duckdb.extract_statements(text)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in statements[:-1]:
        con.execute(s.query)
    table = con.sql(statements[-1].query).to_arrow_table()
    return time.perf_counter() - t0, time.process_time() - c0, table.to_pandas()


def _order(rep: int) -> tuple[str, str]:
    return ("old", "new") if rep % 2 == 0 else ("new", "old")


def same_table(a_, b_) -> bool:
    return list(a_.columns) == list(b_.columns) and len(a_) == len(b_) and all(
        (a_[c].fillna(0) - b_[c].fillna(0)).abs().max() <= 1e-9 * max(1.0, a_[c].abs().max())
        if a_[c].dtype.kind in "fi" else a_[c].astype(str).equals(b_[c].astype(str)) for c in a_.columns)


def suite_ab(run: str, rev: str, reps: int, threads: int) -> dict:
    """Whole suites alternated: queries/ as of `rev` (extracted to a temporary folder, which
    queries.HERE points at while that side runs) against the working tree's."""
    import importlib.util
    import tempfile
    spec = importlib.util.spec_from_file_location("bench_queries", os.path.join(ROOT, "benchmarks", "queries.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # its SUITE (the name `queries` is the package)
    from featscope.core.rundir import RunDir
    meta = RunDir(run).read_meta()
    here = queries.HERE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git archive {rev} queries | tar -x -C {tmp}", shell=True, cwd=ROOT, check=True)
        sides = {"old": os.path.join(tmp, "queries"), "new": here}
        wall, cpu, result = {k: [] for k in sides}, {k: [] for k in sides}, {}
        try:
            for rep in range(reps):
                for side in _order(rep):
                    queries.HERE = sides[side]
                    con = catalog.connect(run, locked=False)
                    con.execute(f"SET threads = {threads}")
                    t0, c0 = time.perf_counter(), time.process_time()
                    result[side] = {m: queries.run_measure(con, m, {}, meta).to_pandas() for m in bench.SUITE}
                    wall[side].append(round(time.perf_counter() - t0, 3))
                    cpu[side].append(round(time.process_time() - c0, 3))
                    con.close()
                    print(side, wall[side][-1], cpu[side][-1], file=sys.stderr, flush=True)
        finally:
            queries.HERE = here
    differ = [m for m in bench.SUITE if not same_table(result["old"][m], result["new"][m])]
    return {"suite": {"old_wall": wall["old"], "new_wall": wall["new"], "old_cpu": cpu["old"], "new_cpu": cpu["new"],
                      "ratio": round(statistics.median(wall["new"]) / statistics.median(wall["old"]), 3),
                      "same": not differ, "differ": differ}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--measures", default="knn_agreement,class_distances,suspicious")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suite", action="store_true", help="alternate whole suites instead of single measures")
    a = ap.parse_args()
    if a.suite:
        print(json.dumps(suite_ab(a.run, a.rev, a.reps, a.threads)))
        return
    con = catalog.connect(a.run, locked=False)
    con.execute(f"SET threads = {a.threads}")
    out = {}
    for m in a.measures.split(","):
        old = subprocess.run(["git", "show", f"{a.rev}:queries/{m}.sql"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
        sides = {"old": old, "new": queries.sql_text(m)}
        wall, cpu, result = {k: [] for k in sides}, {k: [] for k in sides}, {}
        for rep in range(a.reps):
            for side in _order(rep):
                text = sides[side]
                queries.set_params(con, m, {}, None)
                w, c, result[side] = timed(con, text)
                wall[side].append(round(w, 3))
                cpu[side].append(round(c, 3))
        same = same_table(result["old"], result["new"])
        out[m] = {"old_wall": wall["old"], "new_wall": wall["new"], "old_cpu": cpu["old"], "new_cpu": cpu["new"],
                  "ratio": round(statistics.median(wall["new"]) / statistics.median(wall["old"]), 3), "same": bool(same)}
        print(m, out[m], file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
