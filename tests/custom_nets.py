"""Networks a researcher might bring: defined here, outside featscope and torchvision.

`make_net` is the `tests.custom_nets:make_net` factory of tests/test_own_models.py; `make_branchy`
and `make_shared_act` return networks torch.fx cannot trace (their forward branches on a tensor's
value).
"""
from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Two conv blocks, a global average pool and a linear head, written by hand."""

    def __init__(self, num_classes: int = 12, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))

    def reference(self, x):
        """What featscope's layers must be, computed by hand: conv (GAP) and penultimate are both
        the pooled map for a GAP + linear head."""
        fmap = self.body(x)
        return {"conv": fmap.mean(dim=(2, 3)), "penultimate": fmap.mean(dim=(2, 3)), "logits": self.forward(x),
                "map": fmap}


class Branchy(TinyNet):
    """A forward that branches on a tensor's value: torch.fx cannot trace it."""

    def forward(self, x):
        fmap = self.body(x)
        if fmap.sum() > 0:  # data-dependent control flow
            fmap = fmap * 1.0
        return self.head(fmap.mean(dim=(2, 3)))


class SharedAct(Branchy):
    """Untraceable too, with what hooks get wrong if they are careless: one ReLU module called twice,
    and an in-place ReLU that overwrites the output of `proj` after its hook has run."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(16, 16, 1)  # outputs of both signs
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        fmap = self.act(self.proj(self.body(x)))
        if fmap.sum() > 0:
            fmap = fmap * 1.0
        return self.head(self.act(fmap - 0.1).mean(dim=(2, 3)))

    def reference(self, x):
        proj = self.proj(self.body(x))
        return {"proj": proj.mean(dim=(2, 3)), "penultimate": torch.relu(torch.relu(proj) - 0.1).mean(dim=(2, 3))}


def make_shared_act() -> nn.Module:
    return SharedAct()


def make_net() -> nn.Module:
    return TinyNet()


def make_branchy() -> nn.Module:
    return Branchy()


class FlatHead(TinyNet):
    """A linear head on the flattened map (no global pooling): no CAM."""

    def __init__(self, num_classes: int = 12, width: int = 8, size: int = 32):
        super().__init__(num_classes, width)
        self.head = nn.Linear(2 * width * (size // 2) ** 2, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


class Constant(TinyNet):
    """Features that are the same for every image: what a collapsed embedding looks like."""

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)) * 0.0)


class Dropping(TinyNet):
    """Functional dropout reading self.training in the forward (timm's heads do this)."""

    def forward(self, x):
        pooled = self.body(x).mean(dim=(2, 3))
        return self.head(torch.nn.functional.dropout(pooled, 0.5, self.training))


def make_flat_head() -> nn.Module:
    return FlatHead()


def make_constant() -> nn.Module:
    return Constant()


_calls = [0]


def make_random() -> nn.Module:
    """A factory that ignores the seed: another network on every call."""
    _calls[0] += 1
    net = TinyNet()
    with torch.no_grad():
        net.head.bias.fill_(float(_calls[0]))
    return net


def make_nothing():
    return "not a module"


def make_broken():
    raise RuntimeError("out of coffee")
