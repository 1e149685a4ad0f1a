"""Extraction speed and memory: featscope's extract vs a plain PyTorch loop vs pure forward.

    python benchmarks/extract.py [--n 20000] [--small 2000] [--model resnet18] [--size 64]

In one script, on one ImageFolder of 64-px PNGs (procedural shapes, 12 classes):
  1. featscope: `featscope run --stages ingest,extract --image-size 64` (embedded Ray); the
     extract stage's wall time counts, replica start-up included (on one CPU node the replica
     runs in this process, extract_in=auto; its peak RSS is then this process's);
  2. the plain loop: torchvision ImageFolder + the same transforms + DataLoader + forward
     under inference_mode (best of num_workers 0 and 2);
  3. pure forward: the model on random tensors of the same shape, same batch size.
Peak memory: the extract replica's peak RSS on the full set vs on its first `--small` images.
Last line: one JSON object with the figures.

    python benchmarks/extract.py --whole 16000

Instead, what a user times: two whole processes, imports and start-up included, over the same
--whole PNGs: `featscope run --stages ingest,extract --set perturb=[]` (embedded Ray) and a plain
ImageFolder + DataLoader + forward script (PLAIN_SCRIPT, the faster of num_workers 0 and 2);
`vs_plain_process` = plain seconds / featscope seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_folder(root: str, n: int, size: int) -> None:
    from featscope.stages.builtin_data import SHAPE_CLASSES, render_shape, shape_params

    marker = os.path.join(root, f".complete-{n}-{size}")
    if os.path.exists(marker):
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        p = shape_params(i)
        folder = os.path.join(root, SHAPE_CLASSES[p["cls"]])
        os.makedirs(folder, exist_ok=True)
        render_shape(p, size).save(os.path.join(folder, f"{i:06d}.png"), compress_level=1)
    open(marker, "w").close()


def featscope_extract(data: str, out: str, model: str, size: int, batch: int, views: str = "[]") -> dict:
    from featscope.core.config import build_config
    from featscope.core.rundir import RunDir
    from featscope.pipeline.runner import run_pipeline

    common = {"data": data, "out": out, "model": model, "image_size": size}
    sets = [f"batch_size={batch}", "layers=[conv,penultimate]", f"perturb={views}"]
    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        run_pipeline(build_config(None, {**common, "stages": ["ingest"]}, sets), quiet=True)
        res = run_pipeline(build_config(None, {**common, "stages": ["extract"]}, sets), quiet=True)
        t2 = time.perf_counter()
    stats = RunDir(out).read_stats("extract")
    stage = RunDir(out).read_meta()["stages"]
    # the stages' own wall time (Ray actor start-up included; the driver's up-front validation,
    # which lists the folder and traces the model once, is not part of either stage)
    return {"images": res["extract"]["rows"], "ingest_s": stage["ingest"]["wall_seconds"],
            "extract_s": stage["extract"]["wall_seconds"], "driver_s": t2 - t0,
            "extract_shard_s": sum(s["seconds"] for s in stats),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in stats)}


def plain_loop(data: str, model_name: str, size: int, batch: int, workers: int) -> dict:
    import torchvision
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torchvision.datasets.ImageFolder(data, transform=tf)
    t0 = time.perf_counter()
    model = torchvision.models.get_model(model_name, weights=None).eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    n = 0
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
            n += len(x)
    return {"images": n, "seconds": time.perf_counter() - t0}


def pure_forward(model_name: str, size: int, batch: int, n: int) -> dict:
    import torchvision

    model = torchvision.models.get_model(model_name, weights=None).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n // batch):
            model(x)
    return {"images": (n // batch) * batch, "seconds": time.perf_counter() - t0}


# the plain whole-process baseline: what a user would write by hand for the same forward passes
PLAIN_SCRIPT = """
import sys, torch, torchvision
from torchvision import transforms as T
data, model_name, size, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(data, transform=tf), batch_size=batch,
                                     num_workers=workers)
model = torchvision.models.get_model(model_name, weights=None).eval()
with torch.inference_mode():
    n = sum(len(model(x)) for x, _ in loader)
print(n)
"""


def whole_processes(data: str, out: str, model: str, size: int, batch: int) -> dict:
    import subprocess

    def timed(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
        return time.perf_counter() - t0

    shutil.rmtree(out, ignore_errors=True)
    fs = timed([sys.executable, "-m", "featscope.cli", "run", "--data", data, "--out", out, "--model", model,
                "--image-size", str(size), "--stages", "ingest,extract", "--set", "perturb=[]",
                "--set", f"batch_size={batch}", "--format", "json"])
    plain = {w: timed([sys.executable, "-c", PLAIN_SCRIPT, data, model, str(size), str(batch), str(w)])
             for w in (0, 2)}
    best = min(plain.values())
    from featscope.core.rundir import RunDir

    return {"whole_images": RunDir(out).read_meta()["stages"]["extract"]["rows"], "featscope_process_s": round(fs, 2),
            "plain_process_s_by_workers": {w: round(v, 2) for w, v in plain.items()},
            "vs_plain_process": round(best / fs, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".bench"))
    ap.add_argument("--whole", type=int, default=0, help="time whole processes over this many PNGs instead")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    if a.whole:
        folder = os.path.join(work, f"shapes{a.whole}")
        make_folder(folder, a.whole, a.size)
        res = whole_processes(folder, os.path.join(work, "run-whole"), a.model, a.size, a.batch)
        print(json.dumps({"model": a.model, "image_size": a.size, "batch_size": a.batch, **res}))
        return
    big, small = os.path.join(work, f"shapes{a.n}"), os.path.join(work, f"shapes{a.small}")
    t = time.perf_counter()
    make_folder(big, a.n, a.size)
    make_folder(small, a.small, a.size)
    print(f"datasets ready ({time.perf_counter() - t:.1f} s)", file=sys.stderr)

    from featscope.pipeline.runner import connect_ray

    connect_ray()
    fs = featscope_extract(big, os.path.join(work, "run-big"), a.model, a.size, a.batch)
    print("featscope", fs, file=sys.stderr)
    fs_small = featscope_extract(small, os.path.join(work, "run-small"), a.model, a.size, a.batch)
    print("featscope small", fs_small, file=sys.stderr)
    # the cost of perturbed views: the small set without and with 2 views, same replica set-up
    fs_views = featscope_extract(small, os.path.join(work, "run-views"), a.model, a.size, a.batch,
                                 "[noise=0.05,shift=2]")
    print("featscope small, 2 views", fs_views, file=sys.stderr)
    loops = {w: plain_loop(big, a.model, a.size, a.batch, w) for w in (0, 2)}
    print("plain", loops, file=sys.stderr)
    best = min(loops.values(), key=lambda r: r["seconds"])
    pf = pure_forward(a.model, a.size, a.batch, a.n)
    print("pure forward", pf, file=sys.stderr)

    fs_rate = fs["images"] / fs["extract_s"]
    result = {
        "images": fs["images"], "model": a.model, "image_size": a.size, "batch_size": a.batch,
        "cpus": os.cpu_count(), "gpu": torch.cuda.is_available(),
        "featscope_img_s": round(fs_rate, 1),
        "featscope_img_s_excluding_actor_start": round(fs["images"] / fs["extract_shard_s"], 1),
        "plain_loop_img_s": round(best["images"] / best["seconds"], 1),
        "plain_loop_img_s_by_workers": {w: round(r["images"] / r["seconds"], 1) for w, r in loops.items()},
        "pure_forward_img_s": round(pf["images"] / pf["seconds"], 1),
        "ingest_s": round(fs["ingest_s"], 2),
        "vs_plain_loop": round(fs_rate / (best["images"] / best["seconds"]), 3),
        "vs_plain_loop_with_ingest": round(fs["images"] / (fs["extract_s"] + fs["ingest_s"])
                                           / (best["images"] / best["seconds"]), 3),
        "vs_pure_forward": round(fs_rate / (pf["images"] / pf["seconds"]), 3),
        "peak_rss_mb_big": fs["peak_rss_mb"], "peak_rss_mb_small": fs_small["peak_rss_mb"],
        "rss_ratio_20k_2k": round(fs["peak_rss_mb"] / fs_small["peak_rss_mb"], 3),
        "views2_time_ratio": round(fs_views["extract_shard_s"] / fs_small["extract_shard_s"], 3),
        "views2_time_ratio_wall": round(fs_views["extract_s"] / fs_small["extract_s"], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
