"""Old against new SQL of some measures, alternated in one process on the same run: the wall and
CPU seconds of each, and whether the results are equal. "old" is queries/<measure>.sql at a git
revision (default HEAD), "new" the working tree's.

    python benchmarks/queries.py --keep /tmp/qb --skip-pandas     # builds the 1M-image run once
    python benchmarks/queries_ab.py /tmp/qb --measures knn_agreement,suspicious --reps 3 [--rev HEAD~1]

Last line: one JSON object {measure: {old_wall, new_wall, old_cpu, new_cpu, ratio, same}}, ratio =
median new wall / median old wall.
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

import queries  # noqa: E402
from pipeline import catalog  # noqa: E402


def timed(con, text: str):
    statements = duckdb.extract_statements(text)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in statements[:-1]:
        con.execute(s.query)
    table = con.sql(statements[-1].query).to_arrow_table()
    return time.perf_counter() - t0, time.process_time() - c0, table.to_pandas()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--measures", default="knn_agreement,class_distances,suspicious")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    con = catalog.connect(a.run, locked=False)
    con.execute(f"SET threads = {a.threads}")
    out = {}
    for m in a.measures.split(","):
        old = subprocess.run(["git", "show", f"{a.rev}:queries/{m}.sql"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
        sides = {"old": old, "new": queries.sql_text(m)}
        wall, cpu, result = {k: [] for k in sides}, {k: [] for k in sides}, {}
        for _ in range(a.reps):
            for side, text in sides.items():
                queries.set_params(con, m, {}, None)
                w, c, result[side] = timed(con, text)
                wall[side].append(round(w, 3))
                cpu[side].append(round(c, 3))
        a_, b_ = result["old"], result["new"]
        same = list(a_.columns) == list(b_.columns) and len(a_) == len(b_) and all(
            (a_[c].fillna(0) - b_[c].fillna(0)).abs().max() <= 1e-9 * max(1.0, a_[c].abs().max())
            if a_[c].dtype.kind in "fi" else a_[c].astype(str).equals(b_[c].astype(str)) for c in a_.columns)
        out[m] = {"old_wall": wall["old"], "new_wall": wall["new"], "old_cpu": cpu["old"], "new_cpu": cpu["new"],
                  "ratio": round(statistics.median(wall["new"]) / statistics.median(wall["old"]), 3), "same": bool(same)}
        print(m, out[m], file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
