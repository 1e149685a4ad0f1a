"""Data-parallel training on Ray Train: `train_workers` TorchTrainer workers (one per GPU when the
cluster has them, else CPU workers with gloo), DDP over the same `fit` loop as one process.

Each worker builds the model the same way (seeded, or from the same weights), takes every
`world`-th image of each batch (the batches themselves are drawn from the same seed on every
worker), and DDP averages the gradients. Rank 0 reports the checkpoint. The decoded images travel
to the workers with the loop's config: this suits the data sets the train command is meant for
(the built-in ones, a few 10k images); larger ones would want Ray Data. Ray Train's own
checkpoint storage is a local temporary folder: one machine (any number of GPUs) works, several
machines would need shared storage there (not handled yet).
"""
from __future__ import annotations

import os
import tempfile

import torch


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)  # Ray forwards a worker's stderr to the driver's


def _loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from .models import build_model
    from .train import fit

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    model, _ = build_model(config["name"], config["weights"], config["num_classes"], paths=config["paths"])
    # prepare_model: DDP, on this worker's device (its GPU when it has one); fit moves each batch there
    metrics = fit(model, config["pre"], config["x"], config["y"], config["held_out"], config["cfg"],
                  rank=rank, world=world, wrap=ray.train.torch.prepare_model,
                  log=_stderr if rank == 0 and config["log"] else None)
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

    from featscope.core import progress
    from featscope.core.config import UserError

    from .models import search_path

    workers = int(cfg.train_workers)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if cfg.device != "cpu" else 0
    use_gpu = gpus >= workers
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    per_node = min(int(r["CPU"]) for r in nodes) if nodes else int(resources.get("CPU", 1))
    # a worker's threads must fit on one node: the CPUs shared out, never more than the smallest node has
    threads = max(1, min(per_node, int(resources.get("CPU", 1)) // workers))
    storage = tempfile.mkdtemp(prefix="featscope-train-")  # Ray Train's checkpoints; ours is written after
    try:
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"name": name, "weights": weights, "num_classes": num_classes, "pre": pre,
                               "x": x, "y": y, "held_out": held_out, "cfg": cfg, "threads": threads,
                               "paths": search_path(), "log": not progress.QUIET},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": threads}),
            run_config=RunConfig(storage_path=storage, name="featscope-train"))
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - Ray Train wraps a worker's error in its own
            for failure in (getattr(exc, "worker_failures", None) or {}).values():
                if isinstance(failure, UserError):  # collapse, divergence: the worker's one line
                    raise UserError(str(failure).splitlines()[0]) from None
            raise
        with result.checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
        return {**result.metrics, "workers": workers}, state
    finally:
        import shutil

        shutil.rmtree(storage, ignore_errors=True)
