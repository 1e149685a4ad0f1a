"""What `featscope status RUN` and `Run.status()` show: per stage, finished shards and totals."""
from __future__ import annotations

from featscope.core.config import STAGES, UserError
from featscope.core.rundir import RunDir, join, listdir, read_json

COLUMNS = ["stage", "status", "shards", "redone", "rows", "errors", "seconds"]


def status_rows(run_path: str) -> list[tuple]:
    run = RunDir(run_path)
    if not run.exists():
        raise UserError(f"not a featscope run (no run.json): {run_path}")
    meta = run.read_meta()
    rows = []

    def markers(folder: str) -> list[str]:
        return [join(folder, n) for n in listdir(folder) if n.startswith("part-") and n.endswith(".json")]

    for stage in STAGES:
        # shard markers: stats/<stage>/part-*.json, or per layer stats/<stage>/<layer>/part-*.json (knn)
        folder = run.p("stats", stage)
        paths = markers(folder) + [p for n in listdir(folder) if not n.endswith(".json") and not n.startswith(".")
                                   for p in markers(join(folder, n))]
        stats = [s for s in map(read_json, paths) if s is not None]
        info = meta.get("stages", {}).get(stage, {})
        status = info.get("status", "partial" if stats else "not run")
        # redone: shards computed by the last invocation (the rest were kept from an earlier one)
        rows.append((stage, status, len(stats), info.get("redone"), sum(s.get("rows", 0) for s in stats),
                     sum(s.get("errors", 0) for s in stats), round(sum(s.get("seconds", 0) for s in stats), 2)))
    return rows
