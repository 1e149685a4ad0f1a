"""The `featscope` command line."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

from .core.config import STAGES, UserError, build_config
from .core.progress import set_quiet


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="featscope", description="Feature databases and continuity measures "
                                 "for image networks.")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the pipeline (no arguments: the embedded default, end to end)")
    r.add_argument("config", nargs="?", help="YAML config file")
    r.add_argument("--data", help="ImageFolder dir, Parquet file/folder, or builtin:digits / builtin:shapes")
    r.add_argument("--model", help="smallcnn, a torchvision architecture name, timm:NAME, or "
                   "package.module:factory (your own network)")
    r.add_argument("--weights", help="local state_dict / checkpoint (loaded with weights_only=True)")
    r.add_argument("--layers", help="comma-separated: conv, conv:flat, conv:cam, penultimate, or node names")
    r.add_argument("--image-size", type=int, dest="image_size")
    r.add_argument("--out", help="run directory")
    r.add_argument("--k", type=int)
    r.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    r.add_argument("--perturb", action="append", help="NAME=STRENGTH (repeatable)")
    r.add_argument("--explain", help="comma-separated explanation methods: cam, gradcam, saliency, lrp "
                   "(default: cam where the head is GAP + linear, else gradcam)")
    r.add_argument("--overwrite", action="store_true", default=None)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    _add_format(r)

    s = sub.add_parser("sql", help="run a read-only SQL query over a run's catalog")
    s.add_argument("run")
    s.add_argument("query")
    _add_format(s)

    t = sub.add_parser("train", help="train a model (cross-entropy, plus a metric term) and save a checkpoint")
    t.add_argument("--data", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--out", required=True, help="checkpoint file to write")
    t.add_argument("--weights", help="start from this state_dict / checkpoint (fine-tuning)")
    t.add_argument("--image-size", type=int, dest="image_size")
    t.add_argument("--epochs", type=int, dest="train_epochs")
    t.add_argument("--lr", type=float, dest="train_lr")
    t.add_argument("--batch-size", type=int, dest="train_batch_size")
    t.add_argument("--term", dest="train_term", help="none (default), triplet, semihard, softmargin or supcon")
    t.add_argument("--lambda", type=float, dest="train_lambda", help="weight of the term (default 1)")
    t.add_argument("--margin", type=float, dest="train_margin", help="triplet margin on L2-normalised features")
    t.add_argument("--miner", dest="train_miner", help="auto, batch-hard, semihard or all")
    t.add_argument("--on", dest="train_on", help="conv (default), conv:cam, conv:flat or penultimate")
    t.add_argument("--positive-views", dest="train_positive_views", help="e.g. noise=0.05,shift=2")
    t.add_argument("--warmup-epochs", type=int, dest="train_warmup_epochs")
    t.add_argument("--pk", dest="train_pk", help="P,K: P classes x K images per batch")
    t.add_argument("--workers", type=int, dest="train_workers", help="Ray Train workers (DDP); default 1")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_format(t)

    st = sub.add_parser("status", help="which stages and shards of a run are finished")
    st.add_argument("run")
    _add_format(st)

    q = sub.add_parser("query", help="compute one measure (queries/*.sql) over a run, read-only")
    q.add_argument("run")
    q.add_argument("measure", help="knn_agreement, class_distances, per_class, suspicious, continuity, "
                   "explanation_continuity, layer_comparison, image_agreement, distance_histogram, continuity_images "
                   "or explanation_images")
    q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the measure's SQL (layer, k, seed, pairs, triplets, top, method, view, ...)")
    _add_format(q)

    cp = sub.add_parser("compare", help="one measure of several runs side by side, with deltas")
    cp.add_argument("runs", nargs="+", metavar="RUN")
    cp.add_argument("--measure", default="layer_comparison",
                    help="layer_comparison (default), knn_agreement, class_distances or per_class")
    cp.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    cp.add_argument("--html", metavar="FILE", help="also write the runs' reports side by side, with deltas, "
                    "to this one offline HTML file")
    _add_format(cp)

    rp = sub.add_parser("report", help="write the run's offline HTML report (RUN/report/index.html)")
    rp.add_argument("run")
    rp.add_argument("--out", help="folder for index.html (default RUN/report)")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="report_points, report_thumbnails, report_queries, report_umap_points, seed")
    _add_format(rp)

    nb = sub.add_parser("neighbors", help="nearest images to an image id or an image file, in one layer")
    nb.add_argument("run")
    which = nb.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, dest="image_id", help="an image_id of the run")
    which.add_argument("--image", dest="image_file", help="an image file, embedded with the run's own model")
    nb.add_argument("--layer", help="an index layer (default: conv if the run has it, else its first): conv:cam, penultimate, penultimate:cosine, ...")
    nb.add_argument("--k", type=int, default=10)
    _add_format(nb)
    return ap


# ---- output ----------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (int, float, str, bool)):
        return v
    return str(v)


def print_rows(columns: list[str], rows: list[tuple], fmt: str, out=None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        json.dump([{c: _jsonable(v) for c, v in zip(columns, r)} for r in rows], out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        w.writerows([[_jsonable(v) for v in r] for r in rows])
    else:
        def cell(v):
            if isinstance(v, float):
                return f"{v:.4g}"
            s = str(_jsonable(v))
            return s if len(s) <= 60 else s[:57] + "..."

        cells = [[cell(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in cells:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")


# ---- commands --------------------------------------------------------------------------
def cmd_run(a) -> int:
    overrides = {k: getattr(a, k) for k in ("data", "model", "weights", "layers", "image_size", "out", "k",
                                             "stages", "perturb", "overwrite", "explain")}
    cfg = build_config(a.config, overrides, a.set)
    from .pipeline.runner import run_pipeline

    summary = run_pipeline(cfg, quiet=a.format == "json")
    if a.format == "json":
        print(json.dumps(_jsonable(summary), indent=1))
        return 0
    run = summary["run"]
    ing = summary.get("ingest") or {}
    ext = summary.get("extract") or {}
    print(f"run: {run}")
    if ext:
        rate = ext["rows"] / ext["seconds"] if ext.get("seconds") else float("nan")
        print(f"extracted {ext['rows']} images x {len(cfg.layers)} layers ({ext['redone']} of {ext['shards']} "
              f"shards computed now, {rate:.0f} img/s per replica)")
    if ing:
        print(f"{ing['rows']} images, {ing['errors'] + ext.get('errors', 0)} errors")
    if summary.get("analyze"):
        from featscope.stages.analyze import continuity_rows, deep_note, summary_rows

        columns, rows = summary_rows(run)
        print("explanation continuity per layer (featscope query RUN layer_comparison for every figure):")
        print_rows(columns, rows, "table")
        print(deep_note(run))
        columns, rows = continuity_rows(run)
        if rows:
            print("continuity under perturbation (featscope query RUN continuity, per class too):")
            print_rows(columns, rows, "table")
        from featscope.stages.analyze import explanation_rows

        columns, rows = explanation_rows(run)
        if rows:
            print("explanations under perturbation, over every view (featscope query RUN explanation_continuity):")
            print_rows(columns, rows, "table")
    if summary.get("report"):
        print(f"report: {summary['report']['path']}")
    print("query it:")
    print(f"  featscope sql {run} \"SELECT label_name, count(*) AS n, avg(prob) AS confidence "
          f"FROM images JOIN predictions USING (image_id) GROUP BY 1 ORDER BY 1\"")
    from .core.rundir import RunDir

    print(f"  duckdb -init {RunDir(run).p('catalog.sql')}")
    return 0


def cmd_sql(a) -> int:
    from .core.catalog import connect, read_only_query

    con = connect(a.run)
    rel = read_only_query(con, a.query)
    if rel is None:
        return 0
    try:
        columns, rows = rel.columns, rel.fetchall()
    except Exception as exc:  # errors raised while fetching
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None
    print_rows(columns, rows, a.format)
    return 0


def cmd_train(a) -> int:
    overrides = {k: getattr(a, k) for k in ("data", "model", "weights", "image_size", "train_epochs", "train_lr",
                                             "train_batch_size", "train_term", "train_lambda", "train_margin",
                                             "train_miner", "train_on", "train_positive_views",
                                             "train_warmup_epochs", "train_pk", "train_workers")}
    cfg = build_config(None, overrides, a.set)
    from .pipeline.runner import train_checkpoint

    metrics = train_checkpoint(cfg, a.out)
    if a.format == "json":
        print(json.dumps(metrics))
    else:
        print(f"saved {a.out}: held-out accuracy {metrics['held_out_accuracy']:.4f} "
              f"({metrics['train_images']} train / {metrics['held_out_images']} held-out, "
              f"{metrics['skipped_images']} unusable images)")
    return 0


def cmd_status(a) -> int:
    from .pipeline.status import COLUMNS, status_rows

    print_rows(COLUMNS, status_rows(a.run), a.format)
    return 0


def cmd_query(a) -> int:
    from . import queries
    from .api import measure_table

    # Python values as DuckDB gives them (HUGEINT sums stay ints, not Arrow decimals)
    columns, rows = measure_table(a.run, a.measure, queries.parse_params(a.param), rows=True)
    print_rows(columns, rows, a.format)
    return 0


def cmd_compare(a) -> int:
    from featscope import queries
    from featscope.queries.compare import compare

    columns, rows = compare(a.runs, a.measure, queries.parse_params(a.param))
    if a.html:
        from featscope.stages.report.compare import write_compare

        path = write_compare(a.runs, a.html)
        if a.format != "json":
            print(f"report: {path}", file=sys.stderr)
    print_rows(columns, rows, a.format)
    return 0


def cmd_report(a) -> int:
    from featscope.stages.report import report_settings, write_run_report

    recap = write_run_report(a.run, a.out, report_settings(a.set))
    if a.format == "json":
        print(json.dumps(_jsonable(recap), indent=1))
    else:
        print(f"report: {recap['path']} ({recap['bytes'] / 1e6:.1f} MB, {recap['seconds']} s)")
    return 0


def cmd_neighbors(a) -> int:
    from featscope.stages.neighbors import COLUMNS, neighbors

    rows = neighbors(a.run, image_id=a.image_id, image_file=a.image_file, layer=a.layer, k=a.k)
    print_rows(COLUMNS, [tuple(r.get(c) for c in COLUMNS) for r in rows], a.format)
    return 0


COMMANDS = {"run": cmd_run, "sql": cmd_sql, "train": cmd_train, "status": cmd_status,
            "neighbors": cmd_neighbors, "query": cmd_query, "compare": cmd_compare, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    set_quiet(getattr(a, "format", "table") == "json")
    try:
        return COMMANDS[a.command](a)
    except UserError as exc:
        print(f"featscope: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featscope: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `featscope sql ... | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")
        return 0


def entry() -> None:
    """The `featscope` console script: main() in a process of its own, whose fd 2 it may filter
    (main() itself stays safe to call in-process, from tests and notebooks)."""
    from featscope.core.native_lines import drop_native_lines

    drop_native_lines()
    sys.exit(main())


if __name__ == "__main__":
    entry()
