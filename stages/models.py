"""Models by name: where a network comes from, and what the pipeline needs to know about it.

A model name (`--model`, config `model`) is one of
- `smallcnn`: the built-in CNN;
- a torchvision classification architecture (`resnet50`);
- `timm:NAME`: a timm model (the optional `timm` extra), sized and normalised by its pretrained_cfg;
- `package.module:factory`: the user's own network, a zero-argument callable returning an
  `nn.Module`, imported on every Ray worker (the current directory is searched too, so a
  `models.py` beside the command works, and `ray job submit --working-dir .` ships it);
- `object:CLASS`: an `nn.Module` object given to the Python API, sent to workers through Ray's
  object store (`module=` below); it cannot be rebuilt from its name alone.

Weights come only from local files, loaded with `torch.load(..., weights_only=True)`:
a bare state_dict, or a checkpoint dict holding one under `state_dict` / `model` /
`model_state_dict`. For named architectures the class count is read from the head's weight
shape. Without weights a model is built under a fixed seed, so every replica, retry, rerun and
later lookup (`neighbors --image`) rebuilds the same network.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from featscope.core.config import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALLCNN_SIZE = 32


class SmallCNN(nn.Module):
    """Conv stack -> global average pool -> linear head: CAM is exact for it."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        w = width
        self.features = nn.Sequential(*block(3, w, True), *block(w, 2 * w, True), *block(2 * w, 4 * w, False),
                                      *block(4 * w, 4 * w, False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@dataclass
class ModelInfo:
    name: str
    num_classes: int
    image_size: int  # the model's own input side
    mean: tuple
    std: tuple
    resize_ratio: float  # resize short side to image_size * ratio, then centre-crop
    class_names: list[str] | None = None
    weights: str | None = None


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_kind(name: str) -> str:
    """smallcnn | torchvision | timm | object | factory, from the name's shape alone."""
    if name == "smallcnn":
        return "smallcnn"
    if name.startswith("timm:"):
        return "timm"
    if name.startswith("object:"):
        return "object"
    if ":" in name:
        return "factory"
    return "torchvision"


def check_model_name(name: str, module: nn.Module | None = None) -> None:
    """Cheap checks of a model name, before anything is built (no import of the user's code)."""
    kind = model_kind(name)
    if kind == "torchvision" and name not in _torchvision_names():
        raise UserError(f"unknown model '{name}' (smallcnn, a torchvision classification model such as resnet18, "
                        f"resnet50, vgg16, densenet121, efficientnet_b0, convnext_tiny; timm:NAME; or "
                        f"package.module:factory for your own network)")
    if kind == "timm":
        timm = _timm()
        if not timm.is_model(name[5:]):
            raise UserError(f"unknown timm model '{name[5:]}' (timm.list_models() names them, e.g. timm:resnet18)")
    if kind == "factory":
        mod, _, attr = name.rpartition(":")
        if not mod or not attr or not all(p.isidentifier() for p in mod.split(".") + attr.split(".")):
            raise UserError(f"model '{name}': expected package.module:factory (a zero-argument callable "
                            f"returning an nn.Module)")
    if kind == "object" and module is None:
        raise UserError(f"model '{name}' was an nn.Module object given to featscope.run: it cannot be rebuilt "
                        f"from its name; pass it again (featscope.open(RUN, model=net)), or use "
                        f"package.module:factory")


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm: models need timm installed: pip install timm (the featscope[timm] extra)") from None
    return timm


def search_path() -> list[str]:
    """Where a factory's module is looked for besides sys.path: the directory the command runs in
    (console scripts do not put it on sys.path; a job's working directory is its cwd)."""
    return [os.getcwd()]


def import_factory(name: str, paths: list[str] | None = None):
    import importlib
    import sys

    for p in paths or search_path():
        if p and os.path.isdir(p) and p not in sys.path:
            sys.path.append(p)
    mod_name, _, attr = name.rpartition(":")
    try:
        obj = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or the user's module failing at import
        raise UserError(f"model '{name}': cannot import {mod_name}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise UserError(f"model '{name}': {mod_name} has no attribute '{attr}'") from None
    if not callable(obj):
        raise UserError(f"model '{name}': {attr} is not callable (expected a factory returning an nn.Module)")
    return obj


def _from_factory(name: str, paths: list[str] | None) -> nn.Module:
    factory = import_factory(name, paths)
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise UserError(f"model '{name}': the factory raised {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model '{name}': the factory returned {type(model).__name__}, not a torch nn.Module")
    return model


def load_weights_file(path: str) -> dict:
    """A local file, or the run's own checkpoint (a URI when the run is on object storage)."""
    from featscope.core.rundir import exists, local_file

    if not exists(path):
        raise UserError(f"weights file not found: {path}")
    try:
        with local_file(path) as local:
            obj = torch.load(local, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, non-tensor payloads refused by weights_only
        raise UserError(f"cannot load weights {path} with weights_only=True: {str(exc).splitlines()[0]}") from None
    return obj if isinstance(obj, dict) else {}


def _state_dict(obj: dict, path: str) -> dict:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise UserError(f"{path} holds no state_dict (expected a dict of tensors, or a checkpoint with 'state_dict')")
    return sd


def build_model(name: str, weights: str | None = None, num_classes: int | None = None,
                module: nn.Module | None = None, paths: list[str] | None = None) -> tuple[nn.Module, ModelInfo]:
    """Return an eval-mode model and what the rest of the pipeline needs to know about it.

    `module`: the nn.Module of an `object:` model (a copy is used, the caller's is not touched);
    `paths`: where a factory's module is searched (the driver's search_path(), sent to workers).
    """
    if weights:
        return _build_model(name, weights, num_classes, module, paths)
    if model_kind(name) == "factory":
        import_factory(name, paths)  # a module's own import-time randomness stays outside the seeded block
    # a randomly initialised model is seeded: every replica, retried shard and rerun builds the same one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build_model(name, weights, num_classes, module, paths)


def _build_model(name: str, weights: str | None, num_classes: int | None, module: nn.Module | None,
                 paths: list[str] | None) -> tuple[nn.Module, ModelInfo]:
    check_model_name(name, module)
    kind = model_kind(name)
    ckpt, sd = {}, None
    if weights:
        ckpt = load_weights_file(weights)
        sd = _state_dict(ckpt, weights)
    if kind in ("factory", "object"):
        import copy

        # an object's copy on the CPU: tracing probes with CPU inputs, and workers may have no GPU
        if kind == "factory":
            model = _from_factory(name, paths)
        else:
            try:  # the run's own copy: the caller's object stays as it was given
                model = copy.deepcopy(module).cpu()
            except Exception as exc:  # noqa: BLE001 - whatever copying the user's class raises
                raise UserError(f"the nn.Module {type(module).__name__} cannot be copied (deepcopy failed: "
                                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                f"give it without what cannot be copied (locks, open files), or pass "
                                f"package.module:factory") from None
        # the user's network: its own head and input size; ImageNet statistics unless the config says
        # otherwise (image_size, resize, mean, std); a timm-made network brings its pretrained_cfg
        info = _info_from_cfg(name, getattr(model, "pretrained_cfg", None)) or \
            ModelInfo(name, _out_features(model), 224, IMAGENET_MEAN, IMAGENET_STD, 1.0)
        info.num_classes = _out_features(model)
    elif kind == "timm":
        timm = _timm()
        arch = name[5:]
        probe_cfg = timm.models.get_pretrained_cfg(arch)
        head = (probe_cfg.classifier if probe_cfg is not None else None) or "fc"
        head = head[0] if isinstance(head, (list, tuple)) else head
        if sd is not None:
            key = f"{head}.weight"
            if key not in sd:
                raise UserError(f"{weights} does not fit {name}: no '{key}' in its state_dict")
            num_classes = sd[key].shape[0]
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes or 1000)
        info = _info_from_cfg(name, model.pretrained_cfg)
        info.num_classes = num_classes or 1000
    elif name == "smallcnn":
        if sd is not None:
            num_classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else num_classes
        model = SmallCNN(num_classes or 10)
        info = ModelInfo(name, num_classes or 10, int(ckpt.get("image_size", SMALLCNN_SIZE)),
                         (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)
    else:
        import torchvision

        probe = torchvision.models.get_model(name, weights=None)
        from .layers import final_linear_name

        head = final_linear_name(probe)
        if sd is not None:
            key = f"{head}.weight"
            if key not in sd:
                raise UserError(f"{weights} does not fit {name}: no '{key}' in its state_dict")
            num_classes = sd[key].shape[0]
        num_classes = num_classes or 1000
        model = probe if num_classes == 1000 else torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        info = ModelInfo(name, num_classes, 224, IMAGENET_MEAN, IMAGENET_STD, 256 / 224)
    if sd is not None:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"{weights} does not fit {name}: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
        info.weights = os.path.abspath(weights)
    elif kind != "object":
        warnings.warn(f"{name}: no --weights given, the model is randomly initialised (seeded)", stacklevel=3)
    info.class_names = ckpt.get("class_names") if isinstance(ckpt.get("class_names"), list) else None
    return model.eval(), info


def _out_features(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


def _info_from_cfg(name: str, pcfg) -> ModelInfo | None:
    """timm's pretrained_cfg (a dict or a PretrainedCfg): input size, normalisation, crop ratio."""
    if pcfg is None:
        return None
    get = pcfg.get if isinstance(pcfg, dict) else (lambda k, d=None: getattr(pcfg, k, d))
    size = get("input_size") or (3, 224, 224)
    return ModelInfo(name, int(get("num_classes") or 0), int(size[-1]), tuple(get("mean") or IMAGENET_MEAN),
                     tuple(get("std") or IMAGENET_STD), 1.0 / float(get("crop_pct") or 0.875))


def state_sha256(model: nn.Module) -> str:
    """A fingerprint of the network itself (names, shapes and bytes of its state): a changed
    factory, object or timm release is another model, whatever its name says."""
    import hashlib

    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


from featscope.core.rundir import file_sha256  # noqa: E402,F401 - here for the callers that build models


def pick_device(pref: str) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device cuda asked for, but torch sees no GPU")
        return torch.device("cuda")
    return torch.device("cpu")


class Preprocess:
    """uint8 CHW images of any size -> normalised float batch: resize short side, centre-crop."""

    def __init__(self, image_size: int, resize: int, mean, std):
        self.image_size, self.resize = image_size, resize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0

    def _geometry(self, batch: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        h, w = batch.shape[-2:]
        if min(h, w) != self.resize:
            batch = F.resize(batch, self.resize, antialias=True)
        if batch.shape[-2:] != (self.image_size, self.image_size):
            batch = F.center_crop(batch, [self.image_size, self.image_size])
        return batch

    def to(self, device) -> "Preprocess":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def geometry(self, images: list[torch.Tensor], device=None) -> torch.Tensor:
        """uint8 images of any size -> uint8 (N, 3, S, S) at the model's input size, on `device`."""
        if all(im.shape == images[0].shape for im in images):
            # one transfer and one resize call for the whole batch
            return self._geometry(torch.stack(images).to(device, non_blocking=True))
        return torch.stack([self._geometry(im.to(device, non_blocking=True)) for im in images])

    def normalize(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """uint8-range (scale=1) or [0, 1] (scale=255) pixels -> the model's input space."""
        return (x.float() * scale - self.mean) / self.std

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.normalize(self.geometry(images))


def preprocess_for(cfg, info: ModelInfo) -> Preprocess:
    size = cfg.image_size or info.image_size
    resize = cfg.resize or max(size, round(size * info.resize_ratio))
    return Preprocess(size, resize, cfg.mean or info.mean, cfg.std or info.std)
