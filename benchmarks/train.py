"""Training with a metric term, measured: cross-entropy alone vs cross-entropy + term, on builtin:shapes.

    python benchmarks/train.py [--n 6000] [--size 32] [--epochs 10] [--seeds 0,1,2]
                               [--variants ce,gap,cam,cam_views] [--keep DIR]

Each variant x seed is one `featscope.run` of the embedded pipeline (the built-in CNN trained on
the spot, then extract with noise and shift views, index, kNN and every measure), so the figures
are the project's own measures of the conv layer (GAP, L2; and cosine): held-out accuracy, kNN
agreement, MAP@R, the global ROC-AUC and triplet violation rate, continuity accuracy under noise
and shift, and the seconds per training epoch. Variants:

  ce         cross-entropy alone (train_term=none)
  gap        + triplet (batch-hard) on the L2-normalised GAP of the last conv map
  cam        + triplet on the CAM-masked map (conv:cam)
  cam_views  + triplet on conv:cam with each image's noise/shift view as an extra positive
  semihard   + triplet with semi-hard mining (margin 0.3) on the GAP
  supcon     + supervised contrastive on the GAP

Prints a table (mean and spread over seeds) and, last, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "ce": {},
    "gap": {"train_term": "triplet", "train_on": "conv"},
    "cam": {"train_term": "triplet", "train_on": "conv:cam"},
    "cam_views": {"train_term": "triplet", "train_on": "conv:cam", "train_positive_views": ["noise=0.05", "shift=2"]},
    "semihard": {"train_term": "semihard", "train_margin": 0.3, "train_on": "conv"},
    "supcon": {"train_term": "supcon", "train_on": "conv"},
}
FIGURES = ("held_out_accuracy", "agreement", "map_at_r", "auc", "triplet_violation_rate", "auc_cosine",
           "violation_cosine", "continuity_noise", "continuity_shift", "epoch_seconds")


def measure(run, train_json: dict) -> dict:
    def one(rows, **match):
        return next(r for r in rows if all(r.get(k) == v for k, v in match.items()))

    ka = one(run.measure("knn_agreement", layer="conv").to_pylist(), scope="all")
    l2 = one(run.measure("class_distances", layer="conv").to_pylist(), scope="global")
    cos = one(run.measure("class_distances", layer="conv:cosine").to_pylist(), scope="global")
    cont = {r["view"]: r["continuity_accuracy"] for r in run.measure("continuity", layer="conv").to_pylist()
            if r["scope"] == "all"}
    epochs = [h["seconds"] for h in train_json["history"]]
    return {"held_out_accuracy": train_json["held_out_accuracy"], "agreement": ka["agreement"],
            "map_at_r": ka["map_at_r"], "auc": l2["auc"], "triplet_violation_rate": l2["triplet_violation_rate"],
            "auc_cosine": cos["auc"], "violation_cosine": cos["triplet_violation_rate"],
            "continuity_noise": cont.get("noise:0.05"), "continuity_shift": cont.get("shift:2"),
            # the first epoch carries start-up costs (tracing, allocation): the median of the rest
            "epoch_seconds": statistics.median(epochs[1:] or epochs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="ce,gap,cam,cam_views")
    ap.add_argument("--keep", help="keep the runs in this folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config for every variant")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    import yaml

    import featscope

    common = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    root = a.keep or tempfile.mkdtemp(prefix="featscope-train-bench-")
    data = f"builtin:shapes?n={a.n}&size={a.size}"
    results: dict[str, list[dict]] = {}
    for variant in a.variants.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            out = os.path.join(root, f"{variant}-{seed}")
            t0 = time.perf_counter()
            run = featscope.run(data=data, model="smallcnn", layers=["conv"], out=out, metrics=["l2", "cosine"],
                                perturb=["noise=0.05", "shift=2"], train_epochs=a.epochs, seed=seed, quiet=True,
                                **{**common, **VARIANTS[variant]})
            with open(os.path.join(out, "model", "train.json")) as fh:
                figures = measure(run, json.load(fh))
            figures["run_seconds"] = round(time.perf_counter() - t0, 1)
            results.setdefault(variant, []).append(figures)
            print(variant, seed, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}),
                  file=sys.stderr, flush=True)
    summary = {}
    print(f"{'variant':<10} " + " ".join(f"{f:>24}" for f in FIGURES))
    for variant, rows in results.items():
        stats = {}
        for f in FIGURES:
            vals = [r[f] for r in rows if r[f] is not None]
            stats[f] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        summary[variant] = stats
        print(f"{variant:<10} " + " ".join(f"{stats[f]['mean']:>15.4f} ± {stats[f]['sd']:.4f}" for f in FIGURES))
    base = summary.get("ce", {}).get("epoch_seconds", {}).get("mean")
    out = {"n": a.n, "size": a.size, "epochs": a.epochs, "seeds": a.seeds, "summary": summary,
           "term_epoch_time_ratio": {v: round(s["epoch_seconds"]["mean"] / base, 3)
                                     for v, s in summary.items() if base and v != "ce"}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
