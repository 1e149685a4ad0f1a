"""Train: cross-entropy training of a model on a labelled image set, with an optional metric term
(stages/train_terms.py) that pulls same-class features together.

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

from featscope.core.config import UserError
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


def plan_batches(cfg, labels: np.ndarray, n_classes: int) -> tuple[int, int] | None:
    """(P, K) for class-balanced batches, or None for plain shuffled batches.

    `train_pk` "P,K" asks for them; otherwise a metric term gets them when a plain batch would
    hold fewer than 4 images per class on average (batch-hard mining needs positives in the batch).
    """
    if cfg.train_pk:
        p, k = (int(v) for v in str(cfg.train_pk).replace("x", ",").split(","))
        return p, k
    if cfg.train_term != "none" and cfg.train_batch_size / max(1, n_classes) < 4:
        return max(2, min(n_classes, cfg.train_batch_size // 4)), 4
    return None


def check_training(cfg, traced, labels: np.ndarray | None, class_names: list[str]) -> None:
    """Everything about the term that can be wrong, said before training starts (UserError).
    labels: the training images' labels; None before ingest (then the class list stands for them)."""
    if cfg.train_term == "none" and not cfg.train_pk:
        return
    present = np.unique(labels) if labels is not None else np.arange(len(class_names))
    _check_pk(cfg, labels, present, class_names)
    if cfg.train_term == "none":
        return
    if len(present) < 2:
        raise UserError(f"train_term {cfg.train_term} needs at least two classes in the training images "
                        f"(found {len(present)})")
    on = cfg.train_on
    if on == "penultimate" and traced.linear is None:
        raise UserError("train_on penultimate: the model has no final nn.Linear classifier")
    if on.startswith("conv") and traced.conv is None:
        raise UserError(f"train_on {on}: the model has no conv map in front of its classifier; use penultimate")
    if on == "conv:cam" and not traced.cam_ok:
        raise UserError("train_on conv:cam needs a global-average-pool + linear head (for the CAM of the true "
                        "class); this model has none: use conv")
    from . import perturb

    for spec in cfg.train_positive_views:
        if perturb.needs_source(spec):
            raise UserError("train_positive_views: the background view is not available in training")


def _check_pk(cfg, labels, present, class_names) -> None:
    """An asked-for P x K must fit the data (the automatic one samples small classes with replacement)."""
    if not cfg.train_pk:
        return
    p, k = plan_batches(cfg, labels, len(present))
    if p > len(present):
        raise UserError(f"train_pk {p},{k}: P = {p} classes per batch, but the training images hold "
                        f"{len(present)} classes")
    if labels is None:
        return  # counts unknown before ingest: the train stage checks again
    counts = np.bincount(labels, minlength=len(class_names))
    small = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    if k > counts[small]:
        raise UserError(f"train_pk {p},{k}: K = {k} images per class, but class '{class_names[small]}' has "
                        f"{counts[small]} training images")


class _Term:
    """The term's pieces for one model: the extractor's nodes, the head's weights, the PML loss."""

    def __init__(self, model: nn.Module, cfg, image_size: int):
        from .layers import extractor_for, trace
        from .train_terms import MetricTerm

        traced = trace(model, image_size)
        self.on = cfg.train_on
        self.conv = traced.names[traced.conv] if cfg.train_on.startswith("conv") else None
        self.pen = traced.names[traced.penultimate] if cfg.train_on == "penultimate" else None
        if not traced.trace_error:
            traced = traced.training_graph(model)  # hooks (a Hooked model) follow model.train() by themselves
        self.extractor = extractor_for(traced, [n for n in (self.conv, self.pen) if n])
        self.head = traced.gm.get_submodule(traced.linear.target) if cfg.train_on == "conv:cam" else None
        self.term = MetricTerm(cfg.train_term, cfg.train_margin, cfg.train_miner)
        from . import perturb

        self.views = [perturb.view_name(v) for v in cfg.train_positive_views]

    def loss(self, net, x: torch.Tensor, xviews: list[torch.Tensor], labels: torch.Tensor):
        """(cross-entropy of the originals, term, stats): one forward for the originals and their views."""
        from .train_terms import cam_mask, embed

        n = len(labels)
        outs = net(torch.cat([x, *xviews]) if xviews else x)
        every = labels.repeat(1 + len(xviews))
        ce = nn.functional.cross_entropy(outs[self.extractor.logits_name][:n], labels)
        fmap = outs[self.conv] if self.conv else None
        mask = cam_mask(fmap, self.head.weight, every) if self.head is not None else None
        term, stats = self.term(embed(self.on, fmap, outs[self.pen] if self.pen else None, mask), every)
        return ce, term, stats


def fit(model: nn.Module, pre: Preprocess, x_u8: torch.Tensor, y: torch.Tensor, held_out: np.ndarray, cfg,
        progress=None, rank: int = 0, world: int = 1, wrap=None, log=None) -> dict:
    """Train with AdamW + one-cycle LR and light shift augmentation, cross-entropy plus the metric
    term when `cfg.train_term` asks for one; return held-out accuracy and the per-epoch history.

    rank / world / wrap: one of `world` data-parallel workers (Ray Train), `wrap` making the
    trained module DDP (and placing it on the worker's device). Each worker takes every world-th
    image of the epoch in plain batches of batch_size / world, or draws its own P x K batches
    (seed + rank), the same number of steps on every worker.
    """
    epochs, lr, batch_size, seed = cfg.train_epochs, cfg.train_lr, cfg.train_batch_size, cfg.seed
    term = _Term(model, cfg, pre.image_size) if cfg.train_term != "none" else None
    torch.manual_seed(seed)
    train_idx = torch.from_numpy(np.flatnonzero(~held_out))
    test_idx = torch.from_numpy(np.flatnonzero(held_out))
    pk = plan_batches(cfg, y[train_idx].numpy(), len(np.unique(y[train_idx].numpy())))
    if pk:
        steps_per_epoch = max(1, len(train_idx) // (pk[0] * pk[1] * world))
    elif world == 1:
        steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    else:  # whole batches only: every worker must take the same number of steps (allreduce)
        steps_per_epoch = max(1, len(train_idx) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    net = term.extractor if term else model
    net = wrap(net) if wrap else net
    device = next(model.parameters()).device  # wrap may have moved it (a GPU worker)
    mean, std = pre.mean.to(device), pre.std.to(device)
    gen = torch.Generator().manual_seed(seed)
    # pytorch-metric-learning's sampler draws from c_f.NUMPY_RANDOM (numpy's global state): its own here
    sampler_rng = np.random.RandomState(seed + rank)
    start, history = time.perf_counter(), []
    epochs_iter = progress(range(epochs), "train", 0, epochs, unit="epoch") if progress else range(epochs)
    for epoch in epochs_iter:
        model.train()
        t0, sums, n_steps = time.perf_counter(), {}, 0
        for step, b in enumerate(_batches(train_idx, y, pk, batch_size, gen, steps_per_epoch, rank, world,
                                          sampler_rng)):
            # random shifts of up to 2 px: cheap augmentation that helps small data
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xf = torch.roll(x_u8[b].to(device).float(), shifts=(dy, dx), dims=(2, 3))
            x, labels = (xf - mean) / std, y[b].to(device)
            if term is None:
                loss = nn.functional.cross_entropy(net(x), labels)
                parts = {"ce": loss.item()}
            else:
                from . import perturb

                ids = (b + epoch * len(y)).tolist()  # another draw of each view every epoch
                xviews = [(perturb.apply(xf, ids, v, seed) - mean) / std for v in term.views]
                ce, value, stats = term.loss(net, x, xviews, labels)
                # warm-up epochs of cross-entropy alone, then lambda ramped in over one epoch
                ramp = min(1.0, max(0.0, epoch - cfg.train_warmup_epochs + (step + 1) / steps_per_epoch))
                lam = cfg.train_lambda * ramp
                loss = ce + lam * value
                parts = {"ce": ce.item(), "term": stats.term, "active": stats.active, "lambda": lam,
                         "same_sum": stats.same_sum, "same_n": stats.same_n, "diff_sum": stats.diff_sum,
                         "diff_n": stats.diff_n}
            if not math.isfinite(loss.item()):
                raise UserError(f"training diverged at epoch {epoch + 1}: the loss is {loss.item()}; "
                                f"lower train_lr ({lr}) or train_lambda ({cfg.train_lambda})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
        row = _epoch_row(epoch, sums, n_steps, time.perf_counter() - t0)
        history.append(row)
        if log:
            log("train epoch " + "  ".join(f"{k} {v:g}" for k, v in row.items() if k != "epoch") +
                f"  ({row['epoch']}/{epochs})")
        if term is not None and row["diff_dist"] is not None and row["diff_dist"] < 1e-4:
            raise UserError(f"training collapsed at epoch {epoch + 1}: every embedding on {cfg.train_on} is the same "
                            f"(mean different-class distance {row['diff_dist']:.2g}); lower train_lambda "
                            f"({cfg.train_lambda}) or train_lr, or raise train_warmup_epochs")
    model.eval()
    return {"held_out_accuracy": accuracy(model, pre, x_u8[test_idx], y[test_idx]) if len(test_idx) else None,
            "train_images": int(len(train_idx)), "held_out_images": int(len(test_idx)), "epochs": epochs,
            "seconds": round(time.perf_counter() - start, 2), "term": cfg.train_term, "history": history}


def _epoch_row(epoch: int, sums: dict, n_steps: int, seconds: float) -> dict:
    """Means over the epoch's steps; distances as pooled means over every pair of the epoch's batches."""
    row = {"epoch": epoch + 1}
    for k in ("ce", "term", "active", "lambda"):
        if k in sums:
            row[k] = round(sums[k] / max(1, n_steps), 5)
    for k in ("same", "diff"):
        if f"{k}_n" in sums:
            row[f"{k}_dist"] = round(sums[f"{k}_sum"] / sums[f"{k}_n"], 5) if sums[f"{k}_n"] else None
    row["seconds"] = round(seconds, 3)
    return row


def _batches(train_idx: torch.Tensor, y: torch.Tensor, pk, batch_size: int, gen: torch.Generator, steps: int,
             rank: int = 0, world: int = 1, rng: np.random.RandomState | None = None):
    """This worker's batches of one epoch (indices into the images)."""
    if not pk:
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        if world == 1:
            yield from order.split(batch_size)
            return
        mine = order[rank::world]
        per = max(1, batch_size // world)
        for s in range(steps):
            yield mine[s * per:(s + 1) * per]
        return
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    p, k = pk
    sampler = MPerClassSampler(y[train_idx].numpy(), m=k, batch_size=p * k, length_before_new_iter=steps * p * k)
    saved, c_f.NUMPY_RANDOM = c_f.NUMPY_RANDOM, rng if rng is not None else np.random.RandomState(0)
    try:
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)
    finally:
        c_f.NUMPY_RANDOM = saved
    yield from train_idx[order].split(p * k)


@torch.no_grad()
def accuracy(model, pre, x_u8, y, batch: int = 512) -> float:
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    mean, std = pre.mean.to(device), pre.std.to(device)
    for i in range(0, len(y), batch):
        logits = model((x_u8[i:i + batch].to(device).float() - mean) / std).cpu()
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, len(y))


def save_checkpoint(path: str, model: nn.Module, name: str, class_names: list[str], image_size: int,
                    metrics: dict) -> None:
    from featscope.core.rundir import write_file_atomic

    write_file_atomic(path, lambda tmp: torch.save({"model": name, "state_dict": model.state_dict(),
                                                    "class_names": class_names, "image_size": image_size,
                                                    "metrics": metrics}, tmp))


def train_records(name: str, records: list[dict], class_names: list[str], cfg, out: str, progress=None,
                  weights: str | None = None, log=None) -> dict:
    """Train `name` on records with `bytes`, `label`, `split`, `image_id` (from scratch, or from
    `weights`), cross-entropy plus cfg's metric term; save a checkpoint to `out`."""
    import warnings

    from .layers import trace
    from .models import build_model, preprocess_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised" is the point here
        model, info = build_model(name, weights, len(class_names))
    pre = preprocess_for(cfg, info)
    y = torch.tensor([r["label"] for r in records], dtype=torch.long)
    mask = held_out_mask(np.array([r["image_id"] for r in records]), [r["split"] for r in records], cfg.seed)
    if cfg.train_term != "none" or cfg.train_pk:  # every check of the term before the images are decoded
        traced = trace(model, pre.image_size) if cfg.train_term != "none" else None
        check_training(cfg, traced, y[torch.from_numpy(~mask)].numpy(), class_names)
    x = _as_uint8(pre, [r["bytes"] for r in records])
    if cfg.train_workers > 1:
        from .train_ray import fit_on_ray

        metrics, state = fit_on_ray(name, weights, len(class_names), pre, x, y, mask, cfg)
        model.load_state_dict(state)
        model.eval()
    else:
        metrics = fit(model, pre, x, y, mask, cfg, progress, log=log)
    save_checkpoint(out, model, name, class_names, pre.image_size, metrics)
    return metrics


def run(run_dir: RunDir, cfg, class_names: list[str], progress=None) -> dict:
    """The pipeline stage: train on the run's images, cache RUN/model/<model>.pt."""

    records = []
    for f in run_dir.parquet_files("images"):
        records += read_table(f, columns=["image_id", "label", "split", "bytes"]).to_pylist()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = run_dir.p("model", f"{cfg.model}.pt")
    from featscope.core.progress import say

    metrics = train_records(cfg.model, records, class_names, cfg, path, progress, log=say)
    write_json_atomic(run_dir.p("model", "train.json"), metrics)
    return {**metrics, "checkpoint": path}
