"""Data-parallel training on Ray Train: `train_workers` TorchTrainer workers (one per GPU when the
cluster has them, else CPU workers with gloo), DDP over the same `fit` loop as one process.

Each worker builds the model the same way (seeded, or from the same weights), takes every
`world`-th image of each batch (the batches themselves are drawn from the same seed on every
worker), and DDP averages the gradients. Rank 0 reports the checkpoint. The decoded images travel
to the workers with the loop's config: this suits the data sets the train command is meant for
(the built-in ones, a few 10k images); larger ones would want Ray Data.
"""
from __future__ import annotations

import os
import tempfile

import torch


def _loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from .models import build_model
    from .train import fit

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    model, _ = build_model(config["name"], config["weights"], config["num_classes"])
    metrics = fit(model, config["pre"], config["x"], config["y"], config["held_out"], config["cfg"],
                  rank=rank, world=world, wrap=ray.train.torch.prepare_model)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(model.state_dict(), os.path.join(tmp, "model.pt"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def fit_on_ray(name: str, weights: str | None, num_classes: int, pre, x, y, held_out, cfg) -> tuple[dict, dict]:
    """Train on `cfg.train_workers` Ray Train workers; (rank 0's metrics, the trained state_dict)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = int(cfg.train_workers)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if cfg.device != "cpu" else 0
    use_gpu = gpus >= workers
    threads = max(1, int(resources.get("CPU", 1)) // workers)
    storage = tempfile.mkdtemp(prefix="featscope-train-")  # Ray Train's checkpoints; ours is written after
    try:
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"name": name, "weights": weights, "num_classes": num_classes, "pre": pre,
                               "x": x, "y": y, "held_out": held_out, "cfg": cfg, "threads": threads},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": threads}),
            run_config=RunConfig(storage_path=storage, name="featscope-train"))
        result = trainer.fit()
        with result.checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
        return {**result.metrics, "workers": workers}, state
    finally:
        import shutil

        shutil.rmtree(storage, ignore_errors=True)
