"""The CUDA extraction path, measured on a GPU machine: one replica, no Ray.

    python benchmarks/extract_gpu.py [--n 20000] [--model resnet50] [--size 224] [--batch 256]

Ray is not needed to measure one replica: this builds the images shards with ingest's own
shard function, then times, side by side in one process,
  1. featscope's replica: featscope.stages.extract.ShardExtractor on device cuda (decode threads =
     --decode-threads, conv + penultimate + CAM maps written to Parquet, views included
     when --views is given);
  2. a plain PyTorch loop: DataLoader (num_workers = --decode-threads, pin_memory) decoding the
     same bytes with torchvision, forward on the GPU, logits copied back;
  3. pure forward: the model on a random on-device batch.
It also checks the exact kNN search (featscope.stages.vectors.exact_search) on the GPU against the CPU.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.simplefilter("ignore")


def build_images(run: str, n: int, shard_size: int) -> int:
    from featscope.stages import ingest

    plan = ingest.plan(f"builtin:shapes?n={n}", shard_size)
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(ingest.ingest_shard, [run] * len(plan.shards), range(len(plan.shards)), plan.shards,
                      [89_478_485] * len(plan.shards), [8] * len(plan.shards)))
    return len(plan.shards)


def spec_for(model_name: str, size: int, batch: int, views: list[str], decode_threads: int) -> dict:
    from featscope.core.config import build_config
    from featscope.stages.layers import Traced, resolve_layers
    from featscope.stages.models import build_model, preprocess_for

    cfg = build_config(None, {"model": model_name, "image_size": size, "data": "builtin:shapes"},
                       [f"batch_size={batch}"])
    model, info = build_model(model_name, None, 12)
    layers = resolve_layers(Traced(model, preprocess_for(cfg, info).image_size), ["conv", "penultimate"])
    return {"model": model_name, "weights": None, "num_classes": 12, "layers": [l.to_dict() for l in layers],
            "device": "cuda", "cfg": cfg.to_dict(), "views": views, "threads": 1, "decode_threads": decode_threads}


class BytesDataset(torch.utils.data.Dataset):
    def __init__(self, blobs, size):
        self.blobs, self.size = blobs, size

    def __getitem__(self, i):
        from torchvision.io import ImageReadMode, decode_image
        from torchvision.transforms.v2 import functional as F

        img = decode_image(torch.frombuffer(bytearray(self.blobs[i]), dtype=torch.uint8), mode=ImageReadMode.RGB)
        img = F.center_crop(F.resize(img, round(self.size * 256 / 224), antialias=True), [self.size, self.size])
        return img

    def __len__(self):
        return len(self.blobs)


def plain_loop(run: str, model_name: str, size: int, batch: int, workers: int) -> float:
    import pyarrow.parquet as pq
    import torchvision

    blobs = pq.read_table(os.path.join(run, "images"), columns=["bytes"]).column(0).to_pylist()
    model = torchvision.models.get_model(model_name, weights=None, num_classes=12).cuda().eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255
    loader = torch.utils.data.DataLoader(BytesDataset(blobs, size), batch_size=batch, num_workers=workers,
                                         pin_memory=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            x = (x.cuda(non_blocking=True).float() - mean) / std
            model(x).float().cpu()
    torch.cuda.synchronize()
    return len(blobs) / (time.perf_counter() - t0)


def pure_forward(model_name: str, size: int, batch: int, n: int) -> float:
    import torchvision

    model = torchvision.models.get_model(model_name, weights=None, num_classes=12).cuda().eval()
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode():
        model(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n // batch):
            model(x)
        torch.cuda.synchronize()
    return (n // batch) * batch / (time.perf_counter() - t0)


def knn_check(n: int = 100_000, d: int = 512, k: int = 10) -> dict:
    from featscope.stages.vectors import exact_search

    rng = np.random.default_rng(0)
    base = rng.standard_normal((n, d)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64)
    exact_search(base[:4096], base, ids, k, "l2", ids[:4096], device="cuda")  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    nb, dist = exact_search(base, base, ids, k, "l2", ids, device="cuda")
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    cpu_nb, cpu_d = exact_search(base[:2048], base, ids, k, "l2", ids[:2048], device="cpu")
    return {"knn_gpu_seconds_100k_512": round(secs, 3), "knn_gpu_gflops": round(2 * n * n * d / secs / 1e9, 1),
            "knn_gpu_matches_cpu": bool(np.array_equal(nb[:2048], cpu_nb) and np.allclose(dist[:2048], cpu_d, atol=1e-3))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--decode-threads", type=int, default=8)
    ap.add_argument("--views", default="", help="comma-separated, e.g. noise=0.05,shift=2")
    a = ap.parse_args()
    from featscope.stages.extract import ShardExtractor

    run = tempfile.mkdtemp(prefix="fs-gpu-")
    shards = build_images(run, a.n, 4096)
    result = {"device": torch.cuda.get_device_name(0), "images": a.n, "model": a.model, "image_size": a.size,
              "batch_size": a.batch, "decode_threads": a.decode_threads, "torch": torch.__version__}
    ex = ShardExtractor(run, spec_for(a.model, a.size, a.batch, [], a.decode_threads))
    ex.extract_shard(0)  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = sum(ex.extract_shard(i)["rows"] for i in range(shards))
    torch.cuda.synchronize()
    result["featscope_img_s"] = round(rows / (time.perf_counter() - t0), 1)
    if a.views:
        views = [v.strip() for v in a.views.split(",")]
        from featscope.stages.perturb import view_name

        exv = ShardExtractor(run, spec_for(a.model, a.size, a.batch, [view_name(v) for v in views], a.decode_threads))
        exv.extract_shard(0)
        t0 = time.perf_counter()
        for i in range(shards):
            exv.extract_shard(i)
        torch.cuda.synchronize()
        result["views"] = views
        result["views_time_ratio"] = round((time.perf_counter() - t0) / (rows / result["featscope_img_s"]), 3)
    result["plain_loop_img_s"] = round(plain_loop(run, a.model, a.size, a.batch, a.decode_threads), 1)
    result["pure_forward_img_s"] = round(pure_forward(a.model, a.size, a.batch, a.n), 1)
    result["vs_plain_loop"] = round(result["featscope_img_s"] / result["plain_loop_img_s"], 3)
    result["vs_pure_forward"] = round(result["featscope_img_s"] / result["pure_forward_img_s"], 3)
    result.update(knn_check())
    shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
