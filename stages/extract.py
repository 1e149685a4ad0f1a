"""Extract: `images/` shards -> `features/<layer>/`, `maps/<method>/` and `views/` shards, on Ray Data.

The unit of work is one images shard. Ray Data runs a pool of model replicas (actors:
one per GPU, or CPU replicas that each own `num_cpus` threads) over the list of unfinished
shards; where that pool would be one CPU replica on the embedded Ray's one node, the same
replica class runs in the driver's process instead (`in_driver`, config `extract_in`). Each replica reads its shard's bytes, decodes them with torchvision's native decoder
in a background thread (overlapping the forward pass), runs one forward per batch that
returns every requested node and the logits, and streams row groups into temporary files
renamed into place when the shard is complete. Its stats file is written last. The explanation
maps (stages/explain/) come from the same forward pass.

Why not `read_images -> map_batches -> write_parquet`: on 2 cores that measured 196 img/s
against 450 img/s for a plain DataLoader loop (PIL decoding in Ray Data's read tasks and
per-batch scheduling compete with the forward pass for the same two cores).
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from featscope.core.rundir import AtomicParquetWriter, RunDir, layer_dir, read_table, shard_name, write_table_atomic

from .ingest import ERRORS_SCHEMA

FULL_MAPS = "conv"  # maps/conv/: the full `conv` maps (float16) when save_maps is on
EPS_MIN = 1e-6  # Quantus's eps_min: (x - x') / (x + (x == 0) * eps) in the relative input change
MODEL_MISMATCH = "featscope-model-mismatch:"  # a replica's refusal, turned into one UserError line on the driver


def features_schema(dim: int) -> pa.Schema:
    return pa.schema([("image_id", pa.int64()), ("view", pa.string()), ("pred", pa.int32()),
                      ("prob", pa.float32()), ("vec", pa.list_(pa.float32(), dim))])


# one row per (image, perturbed view): ||x - x'||_2 and, for the relative stabilities (Agarwal et
# al. 2022, as Quantus computes them), ||(x - x') / x||_2 and the logits' ||h(x) - h(x')||_2
VIEWS_SCHEMA = pa.schema([("image_id", pa.int64()), ("view", pa.string()), ("input_dist", pa.float32()),
                          ("input_rel_dist", pa.float32()), ("logit_dist", pa.float32())])


def full_maps_schema(size: int) -> pa.Schema:
    return pa.schema([("image_id", pa.int64()), ("view", pa.string()), ("class", pa.int32()),
                      ("channels", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
                      ("map", pa.list_(pa.float16(), size))])


def explanation_schema(hw: int) -> pa.Schema:
    """maps/<method>/: `map` explains `class` (the original's prediction) for this view; `ref` is the
    original's map carried by the view's own shift or rotation (NULL for other views), what the
    equivariance-corrected scores compare with. Each is stored as float16 divided by its largest
    |value| (`scale`, `ref_scale`, float32): a squared input gradient of 1e-6 would be a float16
    subnormal, off by percents, or 0; scaled, every map keeps float16's 11 bits relative to its
    peak. The catalog's `explanations` view multiplies them back."""
    return pa.schema([("image_id", pa.int64()), ("view", pa.string()), ("class", pa.int32()),
                      ("height", pa.int32()), ("width", pa.int32()), ("scale", pa.float32()),
                      ("map", pa.list_(pa.float16(), hw)), ("ref_scale", pa.float32()),
                      ("ref", pa.list_(pa.float16(), hw))])


def _fixed(arr: np.ndarray, dtype) -> pa.FixedSizeListArray:
    arr = np.ascontiguousarray(arr.reshape(len(arr), -1), dtype=dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])


class ShardExtractor:
    """One model replica. Ray Data constructs it once per actor and calls it per shard."""

    def __init__(self, run_path: str, spec: dict):
        import torch

        from .layers import Layer, extractor_for, head_weights, trace
        from .models import build_model, pick_device, preprocess_for

        self.torch = torch
        threads = int(spec.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.run = RunDir(run_path)
        self.spec = spec
        cfg = spec["cfg"]
        module = spec.get("module")  # an nn.Module object given to the Python API, in this process
        if spec.get("module_ref") is not None:  # the same, sent to Ray's workers through the object store
            import ray

            module = ray.get(spec["module_ref"])
        with warnings.catch_warnings():  # "no --weights": the driver has said it once, not once per replica
            warnings.simplefilter("ignore", UserWarning)
            model, info = build_model(spec["model"], spec["weights"], spec["num_classes"], module,
                                      spec.get("search_path"))
        if spec.get("model_sha256") and module is None:
            from .models import state_sha256

            # the user's code or a timm release on this node could build another network than the driver's
            if state_sha256(model) != spec["model_sha256"]:
                raise RuntimeError(f"{MODEL_MISMATCH} {spec['model']} on this worker is not the network the "
                                   f"driver built (another version of its module or of timm here?)")
        self.device = pick_device(spec["device"])
        self.pre = preprocess_for(_Cfg(cfg), info).to(self.device)
        traced = trace(model, self.pre.image_size)
        self.layers = [Layer(**d) for d in spec["layers"]]
        nodes = list(dict.fromkeys(layer.node for layer in self.layers))
        conv_node = traced.names[traced.conv] if getattr(traced, "conv", None) is not None else None
        self.cam_node = conv_node if traced.cam_ok else None  # CAM: the explanation and the `cam` pooling
        self.methods = list(spec.get("explain") or [])
        self.explain_size = int(cfg.get("explain_size") or 56)
        self.save_maps = bool(cfg["save_maps"]) and conv_node is not None
        self.conv_node = conv_node
        if conv_node and (self.cam_node or "gradcam" in self.methods or self.save_maps):
            nodes.append(conv_node)
        if self.cam_node:
            self.head_w, self.head_b = (t.to(self.device) for t in head_weights(traced))
        self.extractor = extractor_for(traced, list(dict.fromkeys(nodes))).to(self.device).eval()
        from .explain import Explainer

        model.to(self.device).eval()
        self.explainer = Explainer(self.methods, self.extractor, model, conv_node, self.explain_size,
                                   cfg.get("explain_batch_size") or int(cfg["batch_size"]))
        self.input_size = self.pre.image_size
        self.batch_size = int(cfg["batch_size"])
        self.views = list(spec.get("views") or [])
        self.data, self.seed = cfg["data"], int(cfg["seed"])
        self.pool = ThreadPoolExecutor(1)  # decoding overlaps the forward pass
        self.write_pool = ThreadPoolExecutor(1)  # one writer thread keeps each file's row order
        self.pending_writes: list = []
        threads = int(spec.get("decode_threads") or 1)
        self.decoders = ThreadPoolExecutor(threads) if threads > 1 else None

    def close(self) -> None:
        """The threads go (a replica in the driver's process would otherwise keep them)."""
        for pool in (self.pool, self.write_pool, self.decoders):
            if pool is not None:
                pool.shutdown(wait=True)

    # Ray Data passes a batch of shard indices (batch_size=1: one shard per call)
    def __call__(self, batch: dict) -> dict:
        out = [self.extract_shard(int(i)) for i in batch["shard"]]
        return {k: np.array([o[k] for o in out]) for k in ("shard", "rows", "errors", "seconds")}

    def _decode(self, rows: list[tuple[int, str, bytes]]):
        """Decode one batch and make its perturbed views (runs in the background thread)."""
        from . import perturb
        from .images import decode_rgb

        def one(row):
            try:
                return decode_rgb(row[2]), None
            except Exception as exc:  # validated at ingest; a failure here is still one row, not a crash
                return None, f"{type(exc).__name__}: {exc}"

        # a GPU replica outruns one decoding thread: then decode with several (the decoders release the GIL)
        decoded = list(self.decoders.map(one, rows)) if self.decoders else [one(r) for r in rows]
        ids, uris, images, errors = [], [], [], []
        for (image_id, uri, _), (img, err) in zip(rows, decoded):
            if img is None:
                errors.append((uri, err))
            else:
                images.append(img)
                ids.append(image_id)
                uris.append(uri)
        raw = {"orig": images}
        for view in self.views:
            if images and perturb.needs_source(view):
                raw[view] = [torch_from_pil(perturb.background_image(self.data, u, view, self.seed, i))
                             for i, u in zip(ids, uris)]
        # resizing, perturbing and normalising happen in the main thread: torch ops here would
        # open a second OpenMP team beside the forward pass's and oversubscribe the cores
        # (measured: 2 views cost 3.8x instead of ~3x on 2 cores)
        return ids, raw, errors

    def _inputs(self, ids: list[int], raw: dict) -> dict:
        """Decoded uint8 images -> the model inputs of every view, on the replica's device.

        The uint8 batch is moved first and resized, perturbed and normalised on the device:
        on a GPU, doing that on the CPU (4x the bytes as float) capped a replica at a tenth of
        its forward rate.
        """
        from . import perturb

        x_u8 = self.pre.geometry(raw["orig"], self.device)
        inputs = {"orig": self.pre.normalize(x_u8)}
        for view in self.views:
            if view in raw:
                inputs[view] = self.pre.normalize(self.pre.geometry(raw[view], self.device))
            else:
                inputs[view] = self.pre.normalize(perturb.apply(x_u8.float(), ids, view, self.seed))
        return inputs

    def extract_shard(self, index: int) -> dict:
        start = time.perf_counter()
        name = self._shard = shard_name(index)
        table = read_table(self.run.p("images", name + ".parquet"), columns=["image_id", "uri", "bytes"])
        rows = list(zip(table.column("image_id").to_pylist(), table.column("uri").to_pylist(),
                        table.column("bytes").to_pylist()))
        del table
        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        writers: dict[str, AtomicParquetWriter] = {}
        errors, n_rows = [], 0
        try:
            pending = self.pool.submit(self._decode, batches[0]) if batches else None
            for b in range(len(batches)):
                ids, inputs, bad = pending.result()
                pending = self.pool.submit(self._decode, batches[b + 1]) if b + 1 < len(batches) else None
                errors += bad
                if not ids:
                    continue
                inputs = self._inputs(ids, inputs)
                orig = self._write_batch(writers, ids, inputs["orig"], "orig")
                for view in self.views:
                    # a view's explanations and CAM pooling use the original's predicted class: the
                    # same explanation target for both inputs, as in Montavon et al.'s continuity
                    seen = self._write_batch(writers, ids, inputs[view], view, orig=orig)
                    self._write_view_dists(writers, ids, view, inputs["orig"], inputs[view], orig["logits"],
                                           seen["logits"])
                n_rows += len(ids)
            for f in self.pending_writes:
                f.result()  # re-raises a failed write
            for w in writers.values():
                w.close()
        except BaseException:
            for f in self.pending_writes:
                f.exception()  # let the writer thread finish before the files go
            for w in writers.values():
                w.abort()
            raise
        finally:
            self.pending_writes = []
        if errors:
            write_table_atomic(self.run.p("errors", f"extract-{name}.parquet"), pa.table({
                "uri": [u for u, _ in errors], "stage": ["extract"] * len(errors),
                "error": ["decode_failed"] * len(errors), "message": [m for _, m in errors]}, schema=ERRORS_SCHEMA))
        import resource

        stats = {"shard": index, "rows": n_rows, "errors": len(errors), "views": len(self.views),
                 "seconds": round(time.perf_counter() - start, 3), "device": str(self.device),
                 "replica_pid": os.getpid(),
                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        self.run.write_stats("extract", index, stats)
        return stats

    def _writer(self, writers, folder: str, schema: pa.Schema) -> AtomicParquetWriter:
        path = self.run.p(folder, self._shard + ".parquet")
        if path not in writers:
            writers[path] = AtomicParquetWriter(path, schema)
        return writers[path]

    def _write_view_dists(self, writers, ids, view: str, x, x_view, logits, logits_view) -> None:
        diff = (x_view - x).flatten(1)
        dist = diff.norm(dim=1).cpu().numpy().astype(np.float32)
        xf = x.flatten(1)
        rel = (diff / (xf + (xf == 0) * EPS_MIN)).norm(dim=1).cpu().numpy().astype(np.float32)
        out = (logits_view - logits).norm(dim=1).cpu().numpy().astype(np.float32)

        def write():
            w = self._writer(writers, "views", VIEWS_SCHEMA)
            w.write(pa.table({"image_id": pa.array(ids, pa.int64()), "view": pa.array([view] * len(ids)),
                              "input_dist": pa.array(dist), "input_rel_dist": pa.array(rel),
                              "logit_dist": pa.array(out)}, schema=VIEWS_SCHEMA))

        self.pending_writes.append(self.write_pool.submit(write))

    def _write_batch(self, writers, ids, x, view: str, orig: dict | None = None) -> dict:
        """One forward for every layer (and the explanations); returns the predicted classes, the
        logits and the maps. The Parquet writing goes to the writer thread, so the model (a GPU
        especially) is not idle while rows are encoded."""
        torch = self.torch
        from . import perturb
        from .explain.cam import cam as class_activation_map
        from .layers import pool

        outs, logits, cls, maps = self.explainer.forward(x, None if orig is None else orig["classes"])
        with torch.inference_mode():
            prob, pred = torch.softmax(logits, dim=1).max(dim=1)
            cam = None
            if self.cam_node:
                cam = class_activation_map(outs[self.cam_node].float(), self.head_w, cls)
                if "cam" in self.methods:
                    maps["cam"] = cam
            vecs = {layer.name: pool(outs[layer.node].float(), layer.pooling, cam).cpu().numpy()
                    for layer in self.layers}
            refs = {}
            if orig is not None and perturb.is_geometric(view):
                refs = {m: perturb.warp_map(orig["maps"][m], ids, view, self.seed, self.input_size) for m in maps}
            maps_np = {m: _scaled_half(v) for m, v in maps.items()}
            refs_np = {m: _scaled_half(v) for m, v in refs.items()}
            pred_np, prob_np, cls_np = pred.cpu().numpy(), prob.cpu().numpy(), cls.cpu().numpy()
            fmap_np = outs[self.conv_node].half().cpu().numpy() if self.save_maps else None
        self.pending_writes.append(self.write_pool.submit(
            self._write_rows, writers, ids, view, pred_np, prob_np, vecs, cls_np, maps_np, refs_np, fmap_np))
        return {"classes": pred.cpu() if orig is None else orig["classes"], "logits": logits, "maps": maps}

    def _write_rows(self, writers, ids, view, pred, prob, vecs, cls, maps, refs, fmap) -> None:
        n = len(ids)
        common = {"image_id": pa.array(ids, pa.int64()), "view": pa.array([view] * n, pa.string()),
                  "pred": pa.array(pred.astype(np.int32)), "prob": pa.array(prob)}
        for layer in self.layers:
            vec = vecs[layer.name]
            w = self._writer(writers, os.path.join("features", layer_dir(layer.name)), features_schema(vec.shape[1]))
            w.write(pa.table({**common, "vec": _fixed(vec, np.float32)}, schema=w.schema))
        for method, (m, scale) in maps.items():
            h, wd = m.shape[1:]
            w = self._writer(writers, os.path.join("maps", method), explanation_schema(h * wd))
            if method in refs:
                ref, ref_scale = _fixed(refs[method][0], np.float16), pa.array(refs[method][1])
            else:
                ref, ref_scale = pa.nulls(n, w.schema.field("ref").type), pa.nulls(n, pa.float32())
            w.write(pa.table({"image_id": common["image_id"], "view": common["view"],
                              "class": pa.array(cls.astype(np.int32)), "height": pa.array(np.full(n, h, np.int32)),
                              "width": pa.array(np.full(n, wd, np.int32)), "scale": pa.array(scale),
                              "map": _fixed(m, np.float16), "ref_scale": ref_scale, "ref": ref}, schema=w.schema))
        if fmap is not None:
            c, h, wd = fmap.shape[1:]
            w = self._writer(writers, os.path.join("maps", FULL_MAPS), full_maps_schema(fmap[0].size))
            w.write(pa.table({"image_id": common["image_id"], "view": common["view"],
                              "class": pa.array(cls.astype(np.int32)), "channels": pa.array(np.full(n, c, np.int32)),
                              "height": pa.array(np.full(n, h, np.int32)), "width": pa.array(np.full(n, wd, np.int32)),
                              "map": _fixed(fmap, np.float16)}, schema=w.schema))


def _scaled_half(t) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) -> (float16 maps divided by each one's largest |value|, that value as float32; 1
    for an all-zero map)."""
    t = t.float()
    peak = t.abs().flatten(1).max(dim=1).values
    scale = peak.where(peak > 0, peak.new_ones(()))
    return (t / scale[:, None, None]).cpu().numpy().astype(np.float16), scale.cpu().numpy().astype(np.float32)


def torch_from_pil(img):
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


class _Cfg:
    """Attribute access over the config dict a replica receives."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def run(run_dir: RunDir, cfg, spec: dict, n_shards: int, progress) -> dict:
    """Extract every images shard that has no extract stats yet; returns totals."""
    todo = [i for i in range(n_shards) if not run_dir.shard_done("extract", i)]
    if todo:
        resources, nodes = _resources()
        gpus = int(resources.get("GPU", 0)) if cfg.device != "cpu" else 0
        if gpus:
            replicas = cfg.replicas or gpus
            cpus = max(1, int(resources.get("CPU", 1)) // replicas)
            remote = {"num_gpus": 1, "num_cpus": cpus}
            spec = {**spec, "device": "cuda", "threads": 1, "decode_threads": cpus}
        else:
            # CPU: by default one replica per node owning all its cores (torch threads beat
            # several single-threaded replicas fighting over the same cores)
            replicas = cfg.replicas or len(nodes) or 1
            per_node = min(int(n["Resources"]["CPU"]) for n in nodes) if nodes else int(resources.get("CPU", 1))
            threads = max(1, per_node * len(nodes) // replicas) if nodes else per_node
            remote = {"num_cpus": threads}
            spec = {**spec, "device": "cpu", "threads": threads}
        replicas = max(1, min(replicas, len(todo)))
        try:
            if in_driver(cfg.extract_in, gpus, len(nodes), replicas):
                _extract_here(run_dir, spec, todo, n_shards, progress)
            else:
                _extract_on_ray(run_dir, spec, todo, n_shards, progress, replicas, remote)
        except Exception as exc:  # noqa: BLE001 - Ray wraps a replica's error in its own types
            text = str(exc)
            if MODEL_MISMATCH not in text:
                raise
            from featscope.core.config import UserError

            raise UserError(text[text.index(MODEL_MISMATCH) + len(MODEL_MISMATCH):].splitlines()[0].strip()) from None
    stats = run_dir.read_stats("extract")
    return {"shards": len(stats), "redone": len(todo), "rows": sum(s["rows"] for s in stats),
            "errors": sum(s["errors"] for s in stats), "seconds": sum(s["seconds"] for s in stats)}


def _resources() -> tuple[dict, list[dict]]:
    """The cluster's resources and its live nodes with CPUs; without Ray (the runner did not need
    it: one CPU replica in this process), this process's cores as the one node."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
            return ray.cluster_resources(), nodes
    from featscope.core.cpus import usable_cpus

    cpus = float(usable_cpus())  # a cgroup quota counts, as in Ray's own count
    return {"CPU": cpus}, [{"Alive": True, "Resources": {"CPU": cpus}}]


def in_driver(extract_in: str, gpus: int, nodes: int, replicas: int) -> bool:
    """Where the one replica runs: `driver` (this process), `ray` (a Ray Data actor pool), or
    `auto`: the driver when the work is one CPU replica on the embedded Ray's single node.

    There a replica actor is a second Python on the same cores that imports torch and torchvision
    and builds and traces the model again (the driver has just done so to validate the run): ~11.5 s
    of a 16,000-image run on 2 cores, which the actor does not win back (benchmarks/RESULTS.md,
    `## extract`). What the actor gives and the driver does not: a replica killed mid-shard is
    restarted by Ray; in the driver the run stops, and the same command resumes at that shard."""
    if extract_in != "auto":
        return extract_in == "driver"
    return not gpus and nodes == 1 and replicas == 1 and not os.environ.get("RAY_ADDRESS")


def _extract_here(run_dir: RunDir, spec: dict, todo: list[int], n_shards: int, progress) -> None:
    import torch

    threads = torch.get_num_threads()  # the replica sets its own; the driver's later stages keep theirs
    replica = ShardExtractor(run_dir.path, spec)
    try:
        for index in progress(iter(todo), "extract", n_shards - len(todo), n_shards):
            replica.extract_shard(index)
    finally:
        replica.close()
        torch.set_num_threads(threads)


def _extract_on_ray(run_dir: RunDir, spec: dict, todo: list[int], n_shards: int, progress, replicas: int,
                    remote: dict) -> None:
    import ray.data

    ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
    # a replica killed mid-shard is restarted and its shard retried: Ray Data's actor-pool defaults
    # (max_restarts=-1, max_task_retries=-1; passing them again is deprecated in Ray 2.60, and
    # tests/test_cluster.py kills a replica to hold them to it). The retry rewrites the same final
    # names with the same content, so every row exists once.
    ds = ds.map_batches(ShardExtractor, fn_constructor_args=(run_dir.path, spec), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=replicas), **remote)
    for _ in progress(ds.iter_rows(), "extract", n_shards - len(todo), n_shards):
        pass
