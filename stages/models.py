"""Models: torchvision architectures by name, and the built-in small CNN.

Weights come only from local files, loaded with `torch.load(..., weights_only=True)`:
a bare state_dict, or a checkpoint dict holding one under `state_dict` / `model` /
`model_state_dict`. The class count is read from the head's weight shape.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import UserError

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


def check_model_name(name: str) -> None:
    if name != "smallcnn" and name not in _torchvision_names():
        raise UserError(f"unknown model '{name}' (smallcnn or a torchvision classification model, "
                        f"e.g. resnet18, resnet50, vgg16, densenet121, efficientnet_b0, convnext_tiny)")


def load_weights_file(path: str) -> dict:
    """A local file, or the run's own checkpoint (a URI when the run is on object storage)."""
    from pipeline.rundir import exists, local_file

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


def build_model(name: str, weights: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """Return an eval-mode model and what the rest of the pipeline needs to know about it."""
    if weights:
        return _build_model(name, weights, num_classes)
    # a randomly initialised model is seeded: every replica, retried shard and rerun builds the same one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build_model(name, weights, num_classes)


def _build_model(name: str, weights: str | None, num_classes: int | None) -> tuple[nn.Module, ModelInfo]:
    check_model_name(name)
    ckpt, sd = {}, None
    if weights:
        ckpt = load_weights_file(weights)
        sd = _state_dict(ckpt, weights)
    if name == "smallcnn":
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
    else:
        warnings.warn(f"{name}: no --weights given, the model is randomly initialised (seeded)", stacklevel=3)
    info.class_names = ckpt.get("class_names") if isinstance(ckpt.get("class_names"), list) else None
    return model.eval(), info


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
