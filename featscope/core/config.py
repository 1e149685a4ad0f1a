"""Run configuration: defaults, YAML files, command-line overrides and validation.

Everything the stages need to know travels in one plain `Config` object, which is also
written to `run.json` so that a run can be resumed and compared later.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml


class UserError(Exception):
    """Something the user gave is wrong: printed as one line, exit code 2, before any work."""


STAGES = ("ingest", "train", "extract", "index", "knn", "analyze", "report")
POOLINGS = ("gap", "flat", "cam")
METRICS = ("l2", "cosine")
EXPLAIN_METHODS = ("cam", "gradcam", "saliency", "lrp")  # stages/explain/


@dataclass
class Config:
    data: str = "builtin:digits"
    model: str = "smallcnn"  # smallcnn, a torchvision name, timm:NAME, package.module:factory (stages/models.py)
    weights: str | None = None
    # None: two distinct vector sets the network has (stages/layers.py default_layers): conv:cam and
    # penultimate for a global-average-pool + linear head (whose conv GAP *is* penultimate), else conv
    # and penultimate
    layers: list[str] | None = None
    image_size: int | None = None  # None: the model's own (224 torchvision, 32 smallcnn)
    out: str | None = None  # None: runs/<dataset>-<model>
    k: int = 10
    stages: list[str] | None = None  # None: all
    # perturbed views for the continuity measure; `--set perturb=[]` for none
    perturb: list[str] = field(default_factory=lambda: ["noise=0.05", "shift=2"])
    overwrite: bool = False
    metrics: list[str] = field(default_factory=lambda: ["l2"])
    # preprocessing: resize the short side, centre-crop image_size, normalise
    resize: int | None = None  # None: image_size for smallcnn, image_size * 256/224 otherwise
    mean: list[float] | None = None  # None: the model's own
    std: list[float] | None = None
    # execution
    batch_size: int = 128
    shard_size: int = 4096  # images per shard: the unit of work and of resume
    device: str = "auto"  # auto | cpu | cuda
    replicas: int | None = None  # model replicas; None: one per GPU, else 1
    # where extraction runs: auto (this process for one CPU replica on the embedded Ray; else Ray
    # actors) | driver | ray (an actor pool, whose replicas Ray restarts when one is killed)
    extract_in: str = "auto"
    num_classes: int | None = None  # head size for randomly initialised models; None: dataset's
    seed: int = 0
    # bad input
    max_image_pixels: int = 89_478_485  # PIL's own decompression-bomb limit
    min_image_side: int = 8  # smaller images carry no usable content: errors rows
    save_maps: bool = False  # also write the full conv maps (float16) into maps/conv/
    # explanation maps (stages/explain/) of the original's predicted class, for orig and every view:
    # cam, gradcam, saliency, lrp; None: cam where the head is GAP + linear, else gradcam; [] for none
    explain: list[str] | None = None
    explain_size: int = 56  # side of the stored saliency / lrp maps (area-averaged from the input)
    # gradient methods (gradcam, saliency, lrp) keep the activations for the backward pass, as training
    # does: they run on slices of this many images (None: batch_size); lower it when a GPU runs out of memory
    explain_batch_size: int | None = None
    explain_topk: float = 10.0  # the top-k% overlap of explanation_continuity: IoU of the k% most relevant cells
    continuity_queries: int = 20000  # images whose views' twin rank is counted exactly; above: a seeded sample
    # indexes and the kNN graph (stages/index.py, stages/knn.py); changing them redoes only those stages
    index_factory: str = "auto"  # auto: chosen from N, dim and index_memory_gb; or a faiss factory string
    index_memory_gb: float = 4.0  # memory budget of one index; beyond it the vectors are compressed (IVF-PQ)
    index_flat_max: int = 100_000  # exact Flat index up to this many vectors
    index_recall: float = 0.95  # ANN search parameters (nprobe, efSearch) grow until recall@k reaches this
    exact_knn_max: int = 200_000  # kNN graph by exact blocked matmul up to this many vectors; beyond: the index
    # analyze: precision@1 / R-precision / MAP@R need the R = class size - 1 nearest of each query, deeper
    # than the kNN graph: an exact search for every image when there are at most deep_queries images, else
    # for a seeded sample of deep_queries images; R is capped at deep_k
    deep_queries: int = 20_000
    deep_k: int = 1000
    # the embedded training of the built-in CNN (when no --weights is given)
    train_epochs: int = 8
    train_lr: float = 3e-3
    train_batch_size: int = 64
    # the metric term (stages/train_terms.py): loss = cross-entropy + train_lambda * term; none: plain CE
    train_term: str = "none"  # none | triplet | semihard | softmargin | supcon
    train_lambda: float = 1.0
    train_margin: float = 0.2  # on L2-normalised embeddings
    train_miner: str = "auto"  # auto (the term's own) | batch-hard | semihard | all
    train_on: str = "conv"  # conv | conv:cam | conv:flat | penultimate
    train_positive_views: list[str] = field(default_factory=list)  # e.g. [noise=0.05, shift=2]: extra positives
    train_warmup_epochs: int = 4  # cross-entropy only, then lambda ramped in over one epoch (batch-hard
    #                                 mining from the first epoch hurt on builtin:shapes: benchmarks/RESULTS.md)
    train_pk: str | None = None  # "P,K": P classes x K images per batch; None: P x K when a plain batch
    #                              would hold fewer than 4 images per class (K = 4), else plain batches
    train_workers: int = 1  # Ray Train workers (DDP); 1: in this process
    # the report (stages/report/): what the page shows of a large run, seeded by `seed`
    report_points: int = 50_000  # points on the 2-D maps; above: a seeded sample, and the page says so
    report_thumbnails: int = 2_000  # points of the interactive map whose hover shows the image
    report_umap_points: int = 10_000  # UMAP maps (umap-learn installed) of at most this many of them; 0: none
    report_queries: int = 6  # neighbour grids of seeded sample queries (and as many suspicious images)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def dataset_name(self) -> str:
        src = self.data.rstrip("/")
        if src.startswith("builtin:"):
            return src.split(":", 1)[1].split("?")[0]
        if "://" in src:  # a URI: its path, without the query (s3://bucket/imagenet/train?region=...)
            from urllib.parse import unquote, urlparse

            src = unquote(urlparse(src).path).rstrip("/") or urlparse(src).netloc
        return os.path.splitext(os.path.basename(src))[0] or "data"

    @property
    def run_dir(self) -> str:
        # timm:resnet18 -> timm-resnet18, mypkg.nets:make -> mypkg.nets-make, object:Net -> object-Net
        model = self.model.replace(":", "-").replace("/", "-")
        return self.out or os.path.join("runs", f"{self.dataset_name}-{model}")


_FIELDS = {f.name: f for f in fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or `--set` value into the field's type, or raise UserError."""
    f = _FIELDS[name]
    typ = str(f.type)
    if value is None:
        return None
    try:
        if typ.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            inner = typ[typ.index("[") + 1 : typ.index("]")]
            conv = float if inner == "float" else str
            return [conv(v) for v in value]
        if typ.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ.startswith("int"):
            if isinstance(value, str) and value.lower() in ("none", "null", ""):
                return None
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ.startswith("float"):
            return float(value)
        if typ.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{name}': cannot read {value!r} as {typ}") from None
    return value


def build_config(config_file: str | None = None, overrides: dict[str, Any] | None = None,
                 sets: list[str] | None = None) -> Config:
    """Defaults < YAML file < --set key=value < explicit command-line flags."""
    values: dict[str, Any] = {}
    if config_file:
        if not os.path.isfile(config_file):
            raise UserError(f"config file not found: {config_file}")
        with open(config_file) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"config file {config_file} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {config_file} must hold a mapping of keys to values")
        values.update(loaded)
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        values[key.strip().replace("-", "_")] = yaml.safe_load(val) if val else None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}' (known: {', '.join(sorted(_FIELDS))})")
    cfg = Config(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.stages is not None:
        bad = [s for s in cfg.stages if s not in STAGES]
        if bad:
            raise UserError(f"unknown stage '{bad[0]}' (stages: {', '.join(STAGES)})")
    bad = [m for m in cfg.metrics if m not in METRICS]
    if bad:
        raise UserError(f"unknown metric '{bad[0]}' (metrics: {', '.join(METRICS)})")
    if cfg.k < 1:
        raise UserError("k must be at least 1")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UserError("image_size must be at least 8 pixels")
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise UserError("batch_size and shard_size must be positive")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, not {cfg.device!r}")
    if cfg.extract_in not in ("auto", "driver", "ray"):
        raise UserError(f"extract_in must be auto, driver or ray, not {cfg.extract_in!r}")
    if cfg.layers is not None and not cfg.layers:
        raise UserError("at least one layer is needed")
    if cfg.deep_queries < 1 or cfg.deep_k < 1:
        raise UserError("deep_queries and deep_k must be positive")
    if cfg.explain_batch_size is not None and cfg.explain_batch_size < 1:
        raise UserError("explain_batch_size must be >= 1")
    if cfg.explain_size < 1 or not 0 < cfg.explain_topk <= 100:
        raise UserError("explain_size must be >= 1 and explain_topk a percentage in (0, 100]")
    if min(cfg.report_points, cfg.report_thumbnails, cfg.report_queries, cfg.report_umap_points) < 0:
        raise UserError("report_points, report_thumbnails, report_queries and report_umap_points must be >= 0")
    validate_training(cfg)


def validate_training(cfg: Config) -> None:
    from_terms = ("none", "triplet", "semihard", "softmargin", "supcon")
    if cfg.train_term not in from_terms:
        raise UserError(f"unknown train term '{cfg.train_term}' (terms: {', '.join(from_terms)})")
    if cfg.train_miner not in ("auto", "batch-hard", "semihard", "all"):
        raise UserError(f"unknown train miner '{cfg.train_miner}' (auto, batch-hard, semihard, all)")
    if cfg.train_on not in ("conv", "conv:cam", "conv:flat", "penultimate"):
        raise UserError(f"unknown train_on '{cfg.train_on}' (conv, conv:cam, conv:flat, penultimate)")
    if cfg.train_lambda < 0 or cfg.train_margin < 0:
        raise UserError("train_lambda and train_margin must be >= 0")
    if cfg.train_warmup_epochs < 0 or cfg.train_epochs < 0 or cfg.train_workers < 1:
        raise UserError("train_epochs and train_warmup_epochs must be >= 0, train_workers >= 1")
    if cfg.train_term != "none" and cfg.train_epochs > 0 and cfg.train_warmup_epochs >= cfg.train_epochs:
        raise UserError(f"train_term {cfg.train_term} would never apply: train_warmup_epochs "
                        f"({cfg.train_warmup_epochs}) >= train_epochs ({cfg.train_epochs}); lower the warm-up")
    if cfg.train_pk is not None:
        parts = str(cfg.train_pk).replace("x", ",").split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise UserError(f"train_pk must be P,K (classes x images per class), not {cfg.train_pk!r}")
