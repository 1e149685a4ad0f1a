"""Stage orchestration: validate everything up front, then run the stages in order, skipping
finished shards. Stages never call each other; they read and write the run directory.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
import warnings

from featscope.core import catalog
from featscope.core.config import STAGES, Config, UserError
from featscope.core.cpus import usable_cpus
from featscope.core.progress import progress, say
from featscope.core.rundir import RunDir, exists, remove_stale_temporaries

# config keys whose change makes existing ingest/extract output wrong for this run
_FINGERPRINT_KEYS = ("data", "model", "weights", "layers", "image_size", "resize", "mean", "std", "shard_size",
                     "max_image_pixels", "min_image_side", "save_maps", "perturb", "num_classes",
                     "train_epochs", "train_lr", "train_batch_size", "train_term", "train_lambda", "train_margin",
                     "train_miner", "train_on", "train_positive_views", "train_warmup_epochs", "train_pk",
                     "train_workers", "seed")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("featscope", "torch", "torchvision", "ray", "faiss-cpu", "duckdb", "pyarrow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# Ray's log lines that tell a featscope user nothing they can act on (ray.init's note that token
# authentication is on, ray.data's note that its own progress bars are off: featscope draws one
# per stage); each is dropped by exact text, at its own logger, so every other warning still shows
_RAY_NOISE = {"ray._private.authentication.authentication_token_setup": "Token authentication is enabled for this",
              "ray.data._internal.progress": "Progress bars disabled.",
              # ray.init from start_ray_in_background's thread; connect_ray sets the same handler
              "ray._private.worker": "SIGTERM handler is not set because current thread"}


class _DropRayNoise(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.text)


def quiet_ray_notes() -> None:
    for name, text in _RAY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRayNoise) for f in logger.filters):
            logger.addFilter(_DropRayNoise(text))


# set once start_ray_in_background's thread has started the embedded Ray; what that raised
_starting: threading.Event | None = None
_start_error: BaseException | None = None


def start_ray_in_background() -> None:
    """Start the embedded Ray in a thread while the driver goes on validating the run.

    On 2 cores `ray.init` (~7 s: Ray's own processes starting and registering) and the driver's
    checks (~7 s: importing torchvision, building and tracing the model) are mostly waits on other
    processes and imports; side by side they take about the longer of the two. connect_ray() waits
    for it. Only for the embedded Ray: a cluster (RAY_ADDRESS) is checked and joined in the
    main thread, so that an unreachable one is one line before any work."""
    global _starting
    import ray

    if _starting is not None or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return

    started = threading.Event()

    def start() -> None:
        global _start_error
        try:
            _init_ray(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised by connect_ray, in the caller's thread
            _start_error = exc
        started.set()
        # Ray binds the lifetime of the processes it starts (GCS, raylet) to their parent with
        # prctl(PR_SET_PDEATHSIG), and on Linux the parent is this *thread*: were it to end, they
        # would be killed and the driver lose its GCS ("Failed to connect to GCS within 60
        # seconds"). So it stays, idle, for the life of the process (a daemon: it does not hold up
        # the exit, after which atexit's ray.shutdown has stopped them anyway).
        threading.Event().wait()

    _starting = started
    threading.Thread(target=start, name="featscope-ray-start", daemon=True).start()
    atexit.register(_stop_at_exit)


def connect_ray(num_cpus: int | None = None) -> None:
    """RAY_ADDRESS (or a job submitted with `ray job submit`) selects a cluster; else an embedded Ray."""
    global _starting, _start_error
    import ray

    if _starting is not None:
        _starting.wait()
        _starting = None
        if threading.current_thread() is threading.main_thread():
            # what ray.init does when called from the main thread: SIGTERM exits through atexit,
            # whose ray.shutdown stops the embedded Ray's processes
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        if _start_error is not None:
            error, _start_error = _start_error, None
            raise error
    if ray.is_initialized():
        return
    _init_ray(num_cpus)


def _stop_at_exit() -> None:
    """At exit, a Ray start still under way (the run was refused, or interrupted, before it
    connected) is waited for and stopped: cut off by the exit, the agents its raylet had started
    would outlive the process. Registered after ray's own atexit hook, so it runs before it."""
    if _starting is not None:
        _starting.wait()
        import ray

        ray.shutdown()


def _init_ray(num_cpus: int | None) -> None:
    import ray

    quiet_ray_notes()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=True,
                  logging_level="WARNING", configure_logging=True)
    if os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # "local": always a new embedded Ray; a bare ray.init() would attach to any cluster whose
        # address Ray left in its temp dir (another session's, or a dead one's it then waits on)
        # num_cpus: this process's cores (affinity and cgroup quota); Ray's own count reads the
        # quota but not a `taskset` affinity, and would start workers for cores it cannot use
        ray.init(address="local", num_cpus=usable_cpus() if num_cpus is None else num_cpus, **kwargs)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # we draw one bar per stage ourselves
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A cluster address that nothing answers on is one line within `timeout` seconds, not
    ray.init's retries (it waits minutes on a dead GCS, printing only its own lines).

    Two steps: a TCP connection, then gRPC's own handshake (an HTTP/2 SETTINGS exchange, which
    needs no token): a port that accepts connections but never speaks gRPC (a hung GCS, some
    other server) would pass the first and hang ray.init forever."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":  # the address Ray would pick: its temp dir's last cluster (perhaps a dead one)
        try:
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address("auto")
        except Exception:  # noqa: BLE001 - none found: ray.init says so itself, at once
            return
        if resolved:
            check_reachable(resolved, timeout)
        return
    if address == "local" or "://" in address and not address.startswith("ray://"):
        return  # Ray resolves these itself (http(s):// is a job server's, which ray.init refuses)
    parsed = urlparse(address if "://" in address else "tcp://" + address)
    host, port = parsed.hostname, parsed.port or (10001 if address.startswith("ray://") else 6379)
    if not host:
        return

    def fail(why: str):
        raise UserError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS): {why}; "
                        f"start it, or unset RAY_ADDRESS for an embedded Ray on this machine") from None

    start = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        fail(exc.strerror or str(exc))
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, timeout - (time.monotonic() - start)))
    except grpc.FutureTimeoutError:
        fail(f"it accepts connections but does not answer as a Ray cluster within {timeout:g} s")
    finally:
        channel.close()


def needs_ray(cfg: Config, stages: list[str], trains: bool = True) -> bool:
    """Whether any of these stages uses Ray in this invocation.

    Starting the embedded Ray and stopping it costs a run ~5.5 s on 2 cores (benchmarks/RESULTS.md,
    `## extract`) and gives nothing to what runs in this process anyway: ingest (its shards one after
    another here are as fast as two Ray tasks), extract on the CPU in one replica (`in_driver`),
    index, analyze and report. Ray is for what needs other processes or machines: a cluster
    (RAY_ADDRESS, or a job submitted with `ray job submit`), the kNN stage's actors, Ray Train, and
    extraction on GPUs, in several replicas or asked for on Ray. `trains`: whether the train stage
    would train at all (only the built-in CNN without weights does)."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    if "knn" in stages or ("train" in stages and trains and cfg.train_workers > 1):
        return True
    if "extract" in stages:
        if cfg.extract_in == "ray" or (cfg.replicas or 1) > 1:
            return True
        if cfg.device != "cpu" and gpu_may_be_present():
            return True
    return False


def gpu_may_be_present() -> bool:
    """A GPU device node this process may use, without importing torch (which takes seconds)."""
    import glob

    def hidden(*names: str) -> bool:
        return any(os.environ.get(n) is not None and os.environ[n].strip() in ("", "-1") for n in names)

    nvidia = bool(glob.glob("/dev/nvidia[0-9]*")) and not hidden("CUDA_VISIBLE_DEVICES")
    amd = os.path.exists("/dev/kfd") and not hidden("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
                                                    "CUDA_VISIBLE_DEVICES")  # ROCm torch reads all three
    return nvidia or amd


def _torch_sees_a_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def ray_connected() -> bool:
    if "ray" not in sys.modules:  # never imported: not connected (and no need to import it to say so)
        return False
    import ray

    return ray.is_initialized()


def ray_info() -> dict:
    """Where this invocation ran (run.json "ray"): the cluster's address and size; without Ray,
    address None and this process's share of the machine."""
    if not ray_connected():
        return {"address": None, "nodes": 1, "cpus": usable_cpus(), "gpus": 0}
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": ray.get_runtime_context().gcs_address, "nodes": len(nodes),
            "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes), "gpus": sum(n["Resources"].get("GPU", 0) for n in nodes)}


def index_layers(cfg: Config, layers) -> list[dict]:
    """The vector sets that get an index and a kNN graph: each extracted layer x each metric.

    `l2` keeps the layer's own name; other metrics add a suffix (`penultimate:cosine`). A layer
    spec that names a metric itself (`--layers penultimate:cosine`) adds that pair too.
    """
    from featscope.stages.layers import split_metric

    out: dict[str, dict] = {}

    def add(layer_name: str, metric: str) -> None:
        name = layer_name if metric == "l2" else f"{layer_name}:{metric}"
        out.setdefault(name, {"name": name, "features": layer_name, "metric": metric})

    for layer in layers:
        for metric in cfg.metrics:
            add(layer.name, metric)
    for spec in cfg.layers:
        base, metric = split_metric(spec)
        if metric:
            match = [l.name for l in layers if l.name == base or l.name == base + ":gap"]
            if match:
                add(match[0], metric)
    return list(out.values())


class Prepared:
    """Everything validated before any work starts."""

    def __init__(self, cfg: Config, module=None, on_inputs_checked=None):
        from featscope.stages import ingest

        self.cfg = cfg
        self.module = module  # the nn.Module of an `object:` model (the Python API)
        self.stages = [s for s in STAGES if cfg.stages is None or s in cfg.stages]
        self.uses_ray = True  # what the caller decides once the inputs are checked (needs_ray)
        if cfg.weights and not os.path.isfile(cfg.weights):
            raise UserError(f"weights file not found: {cfg.weights}")
        self.plan = ingest.plan(cfg.data, cfg.shard_size)
        self.classes = self.plan.classes
        # the built-in CNN without weights is trained on the spot (the embedded default)
        self.needs_training = cfg.model == "smallcnn" and not cfg.weights and cfg.train_epochs > 0
        if on_inputs_checked:
            # the checks that need no torch passed; from here on (importing torch and torchvision,
            # building and tracing the model) it takes seconds, and the caller's work can go beside it
            on_inputs_checked(self)
        from featscope.stages.layers import default_layers, resolve_layers, same_vectors, trace
        from featscope.stages.models import build_model, check_model_name, model_kind, preprocess_for, search_path

        self.kind = model_kind(cfg.model)
        self.search_path = search_path() if self.kind == "factory" else []
        check_model_name(cfg.model, module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = build_model(cfg.model, cfg.weights, cfg.num_classes or len(self.classes), module,
                                      self.search_path)
        # the network itself, for models whose name does not pin it down (the user's code, timm releases)
        self.model_sha256 = None
        if self.kind in ("factory", "object", "timm"):
            from featscope.stages.models import state_sha256

            self.model_sha256 = state_sha256(model)
        if self.kind == "factory" and not cfg.weights:
            # every worker builds its own copy: a factory that gives another network each call would
            # give every replica another network
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again, _ = build_model(cfg.model, None, cfg.num_classes or len(self.classes), None, self.search_path)
            if state_sha256(again) != self.model_sha256:
                raise UserError(f"model '{cfg.model}': the factory builds a different network on each call "
                                f"(under the same seed); make it deterministic or give --weights")
        if self.kind == "object":
            self.module = model  # the CPU copy (weights applied) is what the replicas get
        if not self.uses_ray and "extract" in self.stages and cfg.device != "cpu" and _torch_sees_a_gpu():
            # a GPU the device-node probe missed (torch is imported by now): Ray places the replicas
            self.uses_ray = True
        if self.uses_ray:  # without Ray the one replica takes the object as it is
            self.check_sendable()
        self.info = info
        self.pre = preprocess_for(cfg, info)
        traced = trace(model, self.pre.image_size)
        if cfg.layers is None:  # resolved once, here: run.json, the fingerprint and every stage see the list
            cfg.layers = default_layers(traced)
        self.layers = resolve_layers(traced, cfg.layers)
        # two names for one set of vectors: every figure twice, one answer (said, not refused)
        self.same_vectors = same_vectors(traced, self.layers)
        self.index_layers = index_layers(cfg, self.layers)
        from featscope.stages import perturb

        self.views = list(dict.fromkeys(perturb.view_name(v) for v in cfg.perturb))
        perturb.check_source(cfg.data, self.views)
        self.cam_available = traced.cam_ok
        from featscope.stages import explain

        self.explain = explain.resolve(cfg.explain, traced, model, cfg.model)
        self.default_explain = explain.default_methods(traced)
        if self.needs_training:  # the term's settings, before any work (the train stage checks counts)
            from featscope.stages.train import check_training

            check_training(cfg, traced, None, self.classes)
        self.run = RunDir(cfg.run_dir)
        if not cfg.weights and not self.needs_training and self.kind != "object":  # said once every check passed
            say(f"warning: {cfg.model} has no --weights: it is randomly initialised (seeded)")
        for a, b, why in self.same_vectors:
            hint = "; conv:cam or conv:flat is a distinct set" if "global-average-pool" in why else ""
            say(f"note: layers {a} and {b} are the same vectors for this network ({why}): every figure comes "
                f"out twice{hint}")


    def check_sendable(self) -> None:
        """An `object:` module goes to Ray workers pickled: one clear line when it cannot be."""
        if self.kind != "object":
            return
        import ray.cloudpickle

        model = self.module
        try:
            ray.cloudpickle.dumps(model)
        except Exception as exc:  # noqa: BLE001 - whatever pickling the user's class raises
            raise UserError(f"the nn.Module {type(model).__name__} cannot be sent to Ray workers "
                            f"(pickling failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            f"define it in an importable module and pass package.module:factory") from None
    def fingerprint(self) -> str:
        keys = {k: getattr(self.cfg, k) for k in _FINGERPRINT_KEYS}
        keys["dataset"] = self.plan.fingerprint
        # the explanation methods as resolved (`None` and the model's default are the same run), and
        # their pixel size only where a pixel method uses it; a run with the defaults keeps its old hash
        from featscope.stages.explain import PIXEL_METHODS

        if sorted(self.explain) != sorted(self.default_explain):
            keys["explain"] = sorted(self.explain)
        if set(self.explain) & set(PIXEL_METHODS):
            keys["explain_size"] = self.cfg.explain_size
        if self.cfg.weights:
            from featscope.stages.models import file_sha256

            keys["weights_sha256"] = file_sha256(self.cfg.weights)
        if self.model_sha256:
            keys["model_sha256"] = self.model_sha256
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _require(run: RunDir, stage: str, needs: str) -> None:
    if not run.read_stats(needs):
        raise UserError(f"stage '{stage}' needs the output of '{needs}' in {run.root}: run that stage first")


def run_pipeline(cfg: Config, quiet: bool = False, module=None) -> dict:
    """Run the configured stages; `module`: the nn.Module of an `object:` model (featscope.run(model=net))."""
    from featscope.core.progress import set_quiet

    set_quiet(quiet)  # progress bars and notes on stderr; none in --format json
    prep = _prepare_run(cfg, module)  # raises UserError before any work
    run = prep.run
    if prep.uses_ray:
        connect_ray()
    run.write_meta({**run.read_meta(), "ray": ray_info()})
    summary: dict = {"run": run.path}
    from featscope.stages import extract, ingest, train

    for stage in prep.stages:
        t0 = time.perf_counter()
        if stage == "ingest":
            res = ingest.run(run, cfg, prep.plan, progress)
            say(f"{res['rows']} images, {res['errors']} errors")
        elif stage == "train":
            if not prep.needs_training:
                continue
            weights = run.p("model", f"{cfg.model}.pt")
            if exists(weights) and run.read_meta().get("stages", {}).get("train", {}).get("status") == "done":
                continue
            _require(run, stage, "ingest")
            res = train.run(run, cfg, prep.classes, progress)
            say(f"trained {cfg.model}: held-out accuracy {res['held_out_accuracy']:.3f} "
                f"({res['train_images']} train / {res['held_out_images']} held-out images, {res['seconds']} s)")
        elif stage == "extract":
            _require(run, stage, "ingest")
            res = extract.run(run, cfg, _model_spec(prep), len(prep.plan.shards), progress)
        else:
            # index, knn, analyze, report: each module exposes run(run_dir, cfg, progress) -> stats dict
            import importlib

            try:
                module = importlib.import_module(f"featscope.stages.{stage}")
            except ModuleNotFoundError as exc:
                if exc.name != f"featscope.stages.{stage}":
                    raise  # a missing dependency inside the stage is an error, not "not built"
                continue  # no such stage module (report)
            _require(run, stage, "ingest" if stage == "report" else "extract")  # a report shows what exists
            res = module.run(run, cfg, progress)
        run.update_stage(stage, **_plain(res), status="done", wall_seconds=round(time.perf_counter() - t0, 2))
        catalog.write_catalog(run)
        summary[stage] = res
    catalog.write_catalog(run)
    return summary


def _prepare_run(cfg: Config, module) -> Prepared:
    """Every check, then the run directory and its run.json: the embedded Ray starts beside the slow part."""
    def start_ray_if_needed(prep: Prepared) -> None:
        # a Ray the caller has already connected (a notebook's ray.init, a test session) is used as it is
        prep.uses_ray = needs_ray(cfg, prep.stages, prep.needs_training) or ray_connected()
        if prep.uses_ray:
            start_ray_in_background()

    prep = Prepared(cfg, module, on_inputs_checked=start_ray_if_needed)
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            check_reachable(os.environ["RAY_ADDRESS"])  # before the run directory is made
    run = prep.run
    if cfg.overwrite:
        run.wipe()
    meta = run.read_meta()
    fp = prep.fingerprint()
    if meta and meta.get("fingerprint") != fp:
        raise UserError(f"{run.root} holds a run made with another config or dataset: "
                        f"use --overwrite to redo it, or --out for a new run")
    if prep.stages and prep.stages[0] != "ingest":
        _require(run, prep.stages[0], "ingest")
    meta.update({"fingerprint": fp, "config": cfg.to_dict(), "versions": versions(),
                 "dataset": {"source": cfg.data, "kind": prep.plan.kind, "fingerprint": prep.plan.fingerprint,
                             "inputs": prep.plan.n_inputs, "classes": prep.classes},
                 "model": {"name": cfg.model, "kind": prep.kind, "sha256": prep.model_sha256,
                           "num_classes": prep.info.num_classes, "search_path": prep.search_path},
                 "layers": [layer.to_dict() for layer in prep.layers],
                 "index_layers": prep.index_layers,
                 "views": prep.views,
                 "preprocess": {"image_size": prep.pre.image_size, "resize": prep.pre.resize,
                                "mean": list(cfg.mean or prep.info.mean), "std": list(cfg.std or prep.info.std)},
                 "cam": prep.cam_available, "explain": prep.explain})
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta.setdefault("stages", {})
    run.create()
    remove_stale_temporaries(run.root)
    run.write_meta(meta)
    return prep


def _plain(res: dict) -> dict:
    return {k: v for k, v in res.items() if isinstance(v, (int, float, str, type(None))) and k != "wall_seconds"}


def _model_spec(prep: Prepared) -> dict:
    cfg = prep.cfg
    weights = cfg.weights
    if prep.needs_training:
        weights = prep.run.p("model", f"{cfg.model}.pt")
        if not exists(weights):
            raise UserError(f"stage 'extract' needs the trained checkpoint {weights}: run the 'train' stage first")
    spec = {"model": cfg.model, "weights": weights, "num_classes": cfg.num_classes or len(prep.classes),
            "layers": [layer.to_dict() for layer in prep.layers], "device": cfg.device, "cfg": cfg.to_dict(),
            "views": prep.views, "search_path": prep.search_path, "model_sha256": prep.model_sha256,
            "explain": prep.explain}
    if prep.module is not None:
        if ray_connected():
            import ray

            spec["module_ref"] = ray.put(prep.module)  # every replica reads it from the object store
        else:
            spec["module"] = prep.module  # the one replica runs in this process
    return spec


def train_checkpoint(cfg: Config, out: str) -> dict:
    """`featscope train`: train cfg.model on cfg.data with cross-entropy, save a checkpoint to `out`
    (loadable with `featscope run --weights`). Unusable images are skipped and counted."""
    from featscope.stages import ingest, train
    from featscope.stages.images import BadImage, validate
    from featscope.stages.models import check_model_name

    check_model_name(cfg.model)
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise UserError(f"weights file not found: {cfg.weights}")
    plan = ingest.plan(cfg.data, cfg.shard_size)
    if cfg.train_workers > 1:
        connect_ray()  # Ray Train's workers
    records, errors = [], 0
    index = {c: i for i, c in enumerate(plan.classes)}
    for shard in plan.shards:
        for rec in ingest._records(shard):
            try:
                if rec.get("error"):
                    raise rec["error"]
                data, _, _ = validate(rec["bytes"], cfg.max_image_pixels, cfg.min_image_side)
            except BadImage:
                errors += 1
                continue
            records.append({"image_id": ingest.image_id(rec["key"]), "bytes": data,
                            "label": index[rec["label_name"]], "split": rec["split"]})
    metrics = train.train_records(cfg.model, records, plan.classes, cfg, out, progress, weights=cfg.weights, log=say)
    metrics.update({"checkpoint": os.path.abspath(out), "skipped_images": errors})
    return metrics
