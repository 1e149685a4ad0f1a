"""Train: plain cross-entropy training of a model on a labelled image set.

Used two ways: the pipeline's `train` stage (the embedded default trains the built-in CNN on
the run's own `images`, then caches the checkpoint in `RUN/model/`), and `featscope train`
(any SRC -> a checkpoint file). Images are decoded once and kept as uint8 at the model's
input size, which suits the small sets this is meant for; held-out = the `test`/`val`
split when the data has one, else a seeded 20% of the images.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from featscope.core.rundir import RunDir, read_table, write_json_atomic

from .images import decode_rgb
from .models import Preprocess


def _as_uint8(pre: Preprocess, blobs: list[bytes], batch: int = 512) -> torch.Tensor:
    return torch.cat([pre.geometry([decode_rgb(b) for b in blobs[i:i + batch]]) for i in range(0, len(blobs), batch)])


def held_out_mask(ids: np.ndarray, splits: list, seed: int) -> np.ndarray:
    named = np.array([s in ("test", "val", "validation") for s in splits])
    if named.any() and (~named).any():
        return named
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(ids), dtype=bool)
    mask[rng.permutation(len(ids))[: max(1, len(ids) // 5)]] = True
    return mask


def fit(model: nn.Module, pre: Preprocess, x_u8: torch.Tensor, y: torch.Tensor, held_out: np.ndarray,
        epochs: int, lr: float, batch_size: int, seed: int, progress=None) -> dict:
    """Train with AdamW + one-cycle LR and light shift augmentation; return held-out accuracy."""
    torch.manual_seed(seed)
    train_idx = torch.from_numpy(np.flatnonzero(~held_out))
    test_idx = torch.from_numpy(np.flatnonzero(held_out))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = max(1, epochs * math.ceil(len(train_idx) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    mean, std = pre.mean, pre.std
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    epochs_iter = progress(range(epochs), "train", 0, epochs, unit="epoch") if progress else range(epochs)
    for _ in epochs_iter:
        model.train()
        for b in train_idx[torch.randperm(len(train_idx), generator=gen)].split(batch_size):
            x = (x_u8[b].float() - mean) / std
            # random shifts of up to 2 px: cheap augmentation that helps small data
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(x), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return {"held_out_accuracy": accuracy(model, pre, x_u8[test_idx], y[test_idx]) if len(test_idx) else None,
            "train_images": int(len(train_idx)), "held_out_images": int(len(test_idx)), "epochs": epochs,
            "seconds": round(time.perf_counter() - start, 2)}


@torch.no_grad()
def accuracy(model, pre, x_u8, y, batch: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model((x_u8[i:i + batch].float() - pre.mean) / pre.std)
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(y))


def save_checkpoint(path: str, model: nn.Module, name: str, class_names: list[str], image_size: int,
                    metrics: dict) -> None:
    from featscope.core.rundir import write_file_atomic

    write_file_atomic(path, lambda tmp: torch.save({"model": name, "state_dict": model.state_dict(),
                                                    "class_names": class_names, "image_size": image_size,
                                                    "metrics": metrics}, tmp))


def train_records(name: str, records: list[dict], class_names: list[str], cfg, out: str, progress=None) -> dict:
    """Train `name` from scratch on records with `bytes`, `label`, `split`, `image_id`; save to `out`."""
    from .models import build_model, preprocess_for

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised" is the point here
        model, info = build_model(name, None, len(class_names))
    pre = preprocess_for(cfg, info)
    x = _as_uint8(pre, [r["bytes"] for r in records])
    y = torch.tensor([r["label"] for r in records], dtype=torch.long)
    mask = held_out_mask(np.array([r["image_id"] for r in records]), [r["split"] for r in records], cfg.seed)
    metrics = fit(model, pre, x, y, mask, cfg.train_epochs, cfg.train_lr, cfg.train_batch_size, cfg.seed, progress)
    save_checkpoint(out, model, name, class_names, pre.image_size, metrics)
    return metrics


def run(run_dir: RunDir, cfg, class_names: list[str], progress=None) -> dict:
    """The pipeline stage: train on the run's images, cache RUN/model/<model>.pt."""

    records = []
    for f in run_dir.parquet_files("images"):
        records += read_table(f, columns=["image_id", "label", "split", "bytes"]).to_pylist()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = run_dir.p("model", f"{cfg.model}.pt")
    metrics = train_records(cfg.model, records, class_names, cfg, path, progress)
    write_json_atomic(run_dir.p("model", "train.json"), metrics)
    return {**metrics, "checkpoint": path}
