"""The report's cost: wall time, peak RSS and page size of `featscope report`, on a real
20,000-image run and on a 1,000,000-image synthetic run (features, kNN edges and images written
directly, as benchmarks/queries.py does; the measures then computed by the analyze stage's own
code), each report in a fresh process; peak RSS is that of its whole process tree (the report
and its UMAP worker process, summed), sampled every 50 ms.

The 20k run: builtin:shapes (20,000 images, 32 px), the built-in CNN trained 2 epochs on the
spot, views noise:0.05 and shift:2; `featscope run` made once (with --keep DIR it is kept and
reused). The page budgets are the defaults (50,000 map points, 2,000 hover thumbnails, UMAP of
10,000 when umap-learn is installed), so the 1M run's map shows a seeded sample of 50,000.

    python benchmarks/report.py [--keep DIR] [--images 1000000] [--small 20000] [--set report_umap_points=0]

A third report, of a 20,000-image synthetic run made by the same generator as the 1M one (the
same code paths: no views, so no torch), gives the like-for-like memory ratio.

Last line: one JSON object (seconds_20k, mb_20k, rss_mb_20k, seconds_1m, mb_1m, rss_mb_1m,
rss_ratio_1m_20k, size_ratio_1m_20k, rss_ratio_1m_20k_synthetic, ...).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARD = 4096  # images per shard, as the ingest stage writes them
MEASURE = """
import json, subprocess, sys, time
import psutil
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
peak = 0
import threading
out = {}
reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())))
reader.start()
root = psutil.Process(proc.pid)
while reader.is_alive():  # the process tree's RSS summed (the report and its UMAP worker), every 50 ms
    try:
        tree = [root] + root.children(recursive=True)
        peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
    except psutil.Error:
        pass
    time.sleep(0.05)
reader.join()
print(json.dumps({"rc": proc.returncode, "wall": time.perf_counter() - t0, "stdout": out["stdout"],
                  "stderr": out["stderr"][-2000:], "maxrss_kb": peak // 1024}))
"""


def timed_report(run: str, out: str, sets: list[str]) -> dict:
    """`featscope report RUN --out OUT` in a fresh process: wall seconds, peak RSS, page bytes."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "featscope.cli", "report", run, "--out", out,
           "--format", "json"] + [x for s in sets for x in ("--set", s)]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout)
    if res["rc"] != 0:
        raise SystemExit(f"featscope report failed: {res['stderr']}")
    recap = json.loads(res["stdout"])
    return {"seconds": round(res["wall"], 1), "rss_mb": round(res["maxrss_kb"] / 1024, 1),
            "mb": round(os.path.getsize(os.path.join(out, "index.html")) / 1e6, 2), "map_points": recap["map_points"],
            "figures": recap["figures"]}


def make_real_run(path: str, n: int) -> float:
    if os.path.exists(os.path.join(path, "results", "layer_comparison.parquet")):
        return 0.0
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "featscope.cli", "run", "--data", f"builtin:shapes?n={n}&size=32", "--out", path,
           "--stages", "ingest,train,extract,index,knn,analyze", "--set", "train_epochs=2", "--format", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"featscope run failed: {res.stderr[-2000:]}")
    return time.perf_counter() - t0


def tiny_pngs(classes: int) -> list[bytes]:
    """One 32 x 32 picture per class (a coloured square on grey), PNG."""
    from PIL import Image, ImageDraw

    out = []
    rng = np.random.default_rng(0)
    for c in range(classes):
        img = Image.new("RGB", (32, 32), (128, 128, 128))
        ImageDraw.Draw(img).rectangle([6, 6, 25, 25], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def make_synthetic_run(path: str, n: int, classes: int) -> None:
    """benchmarks/queries.py's run (images, features, knn, knn_deep, run.json) with image bytes,
    then the measures written to results/ by the analyze stage's loop."""
    if os.path.exists(os.path.join(path, "results", "layer_comparison.parquet")):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_queries", os.path.join(ROOT, "benchmarks", "queries.py"))
    qbench = importlib.util.module_from_spec(spec)  # benchmarks/queries.py's synthetic run
    spec.loader.exec_module(qbench)

    from featscope import queries
    from featscope.core import catalog
    from featscope.core.rundir import RunDir, write_table_atomic

    qbench.make_run(path, n, classes, 10, 10_000)
    pngs = tiny_pngs(classes)
    for f in sorted(os.listdir(os.path.join(path, "images"))):
        p = os.path.join(path, "images", f)
        t = pq.read_table(p)
        data = pa.array([pngs[l] for l in t.column("label").to_numpy()], pa.binary())
        pq.write_table(t.set_column(t.schema.get_field_index("bytes"), "bytes", data), p)
    # the shards of a real run: 4,096 images each (shard_size), not the query benchmark's 250,000
    layer = qbench.LAYER
    for folder in ("images", f"features/{layer}", f"knn/{layer}"):
        d = os.path.join(path, folder)
        t = pa.concat_tables(pq.read_table(os.path.join(d, f)) for f in sorted(os.listdir(d)))
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
        rows = SHARD * (10 if folder.startswith("knn") else 1)
        for i, r0 in enumerate(range(0, t.num_rows, rows)):
            pq.write_table(t.slice(r0, rows), os.path.join(d, f"part-{i:05d}.parquet"))
    run = RunDir(path)
    meta = run.read_meta()
    meta["stages"] = {s: {"status": "done"} for s in ("ingest", "extract", "index", "knn", "analyze")}
    meta["model"] = {"name": "synthetic", "kind": "benchmark", "num_classes": classes}
    run.write_meta(meta)
    catalog.write_catalog(run)
    con = catalog.connect(path, locked=True)
    for measure in queries.MEASURES:
        given = {"seed": 0} if any(p.name == "seed" for p in queries.params(measure)) else {}
        write_table_atomic(run.p("results", measure + ".parquet"), queries.run_measure(con, measure, given, meta))


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("duckdb", "pyarrow", "matplotlib", "bokeh", "scikit-learn", "numpy")} | \
        {"umap-learn": md.version("umap-learn") if __import__("importlib").util.find_spec("umap") else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="build the runs here and keep them (reused when they exist)")
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="report settings for both reports, e.g. report_umap_points=0")
    a = ap.parse_args()
    root = a.keep or tempfile.mkdtemp(prefix="featscope-report-bench-")
    os.makedirs(root, exist_ok=True)
    small, big = os.path.join(root, f"shapes-{a.small}"), os.path.join(root, f"synthetic-{a.images}")
    small_syn = os.path.join(root, f"synthetic-{a.small}")
    try:
        made = make_real_run(small, a.small)
        t0 = time.perf_counter()
        make_synthetic_run(big, a.images, a.classes)
        made_big = time.perf_counter() - t0
        make_synthetic_run(small_syn, a.small, min(a.classes, a.small // 20))
        r20 = timed_report(small, os.path.join(root, "report-small"), a.set)
        r1m = timed_report(big, os.path.join(root, "report-big"), a.set)
        r20s = timed_report(small_syn, os.path.join(root, "report-small-synthetic"), a.set)
        out = {"images_small": a.small, "images_big": a.images, "settings": a.set,
               "seconds_20k": r20["seconds"], "mb_20k": r20["mb"], "rss_mb_20k": r20["rss_mb"],
               "seconds_1m": r1m["seconds"], "mb_1m": r1m["mb"], "rss_mb_1m": r1m["rss_mb"],
               "rss_ratio_1m_20k": round(r1m["rss_mb"] / r20["rss_mb"], 3),
               "size_ratio_1m_20k": round(r1m["mb"] / r20["mb"], 3),
               # the same synthetic generator at both sizes: the same code paths (no views, no torch)
               "seconds_20k_synthetic": r20s["seconds"], "rss_mb_20k_synthetic": r20s["rss_mb"],
               "mb_20k_synthetic": r20s["mb"],
               "rss_ratio_1m_20k_synthetic": round(r1m["rss_mb"] / r20s["rss_mb"], 3),
               "map_points_20k": r20["map_points"], "map_points_1m": r1m["map_points"],
               "made_run_seconds": round(made, 1), "made_synthetic_seconds": round(made_big, 1),
               "versions": versions()}
        print(json.dumps(out))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
