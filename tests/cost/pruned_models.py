"""Small torch models with configurable channel counts, and their physically smaller versions: the
output channels of a layer dropped, with the matching input columns of its consumers (a block of
``H*W`` features per channel after a flatten, the group's columns of a grouped conv)."""
from __future__ import annotations

import torch
from torch import nn


class Plain(nn.Module):
    """conv1 1->c1, conv2 c1->c2 (3x3), maxpool 2, flatten, fc c2*4*4 -> 5; input (1, 8, 8)."""

    SHAPE = (1, 8, 8)
    READS = {"conv1": (None, 1), "conv2": ("conv1", 1), "fc": ("conv2", 16)}

    def __init__(self, conv1=4, conv2=6):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, conv1, 3, padding=1), nn.Conv2d(conv1, conv2, 3, padding=1)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(conv2 * 16, 5)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.conv2(self.act(self.conv1(x)))))))


class Residual(nn.Module):
    """a 2->a (1x1), b a->b (3x3), c b->a (1x1), relu(a + c), maxpool 2, flatten, fc; input (2, 8, 8)."""

    SHAPE = (2, 8, 8)
    READS = {"a": (None, 1), "b": ("a", 1), "c": ("b", 1), "fc": ("a", 16)}  # the sum's channels are a's

    def __init__(self, a=4, b=4):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, a, 1), nn.Conv2d(a, b, 3, padding=1), nn.Conv2d(b, a, 1)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(a * 16, 3)

    def forward(self, x):
        x = self.act(self.a(x))
        return self.fc(self.flat(self.pool(self.act(x + self.c(self.act(self.b(x)))))))


class Separable(nn.Module):
    """pre 2->n, dw n->n (3x3, groups n), pw n->m (1x1), avgpool 2, flatten, fc; input (2, 8, 8)."""

    SHAPE = (2, 8, 8)
    READS = {"pre": (None, 1), "dw": ("pre", 1), "pw": ("dw", 1), "fc": ("pw", 16)}

    def __init__(self, pre=4, pw=5):
        super().__init__()
        self.pre, self.dw = nn.Conv2d(2, pre, 1), nn.Conv2d(pre, pre, 3, padding=1, groups=pre)
        self.pw, self.act, self.pool = nn.Conv2d(pre, pw, 1), nn.ReLU(), nn.AvgPool2d(2)
        self.flat, self.fc = nn.Flatten(), nn.Linear(pw * 16, 3)

    def forward(self, x):
        x = self.act(self.dw(self.act(self.pre(x))))
        return self.fc(self.flat(self.pool(self.act(self.pw(x)))))


class Grouped(nn.Module):
    """pre 2->n, g n->m (3x3, ``groups``), maxpool 2, flatten, fc; input (2, 8, 8)."""

    SHAPE = (2, 8, 8)
    READS = {"pre": (None, 1), "g": ("pre", 1), "fc": ("g", 16)}

    def __init__(self, pre=8, g=8, groups=2):
        super().__init__()
        self.pre, self.g = nn.Conv2d(2, pre, 1), nn.Conv2d(pre, g, 3, padding=1, groups=groups)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(g * 16, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.g(self.act(self.pre(x)))))))


class Concat(nn.Module):
    """a 2->a (1x1), b 2->b (3x3), cat, c (a+b)->c (3x3), maxpool 2, flatten, fc; input (2, 8, 8)."""

    SHAPE = (2, 8, 8)
    READS = {"a": (None, 1), "b": (None, 1), "c": (None, 1), "fc": ("c", 16)}  # the concat keeps every channel

    def __init__(self, a=4, b=4, c=6):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(2, a, 1), nn.Conv2d(2, b, 3, padding=1), nn.Conv2d(a + b, c, 3, padding=1)
        self.act, self.pool, self.flat, self.fc = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c * 16, 3)

    def forward(self, x):
        y = torch.cat([self.act(self.a(x)), self.act(self.b(x))], dim=1)
        return self.fc(self.flat(self.pool(self.act(self.c(y)))))


class Gated(nn.Module):
    """a 2->a then LeakyReLU, b a->b then Sigmoid (a pruned channel of b stays: sigmoid(0) = 0.5),
    maxpool 2, flatten, fc; input (2, 8, 8)."""

    SHAPE = (2, 8, 8)
    READS = {"a": (None, 1), "b": ("a", 1), "fc": (None, 16)}

    def __init__(self, a=4, b=4):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1)
        self.leaky, self.gate, self.pool = nn.LeakyReLU(0.2), nn.Sigmoid(), nn.MaxPool2d(2)
        self.flat, self.fc = nn.Flatten(), nn.Linear(b * 16, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.gate(self.b(self.leaky(self.a(x)))))))


def smaller(full: nn.Module, rows: dict[str, list[int]], **sizes) -> nn.Module:
    """``full`` rebuilt with only output channels ``rows[layer]`` (all where not given) and the
    input columns that read them; ``sizes``: the constructor's channel counts of the result."""
    small = type(full)(**sizes)
    for name in full.READS:
        layer, new = getattr(full, name), getattr(small, name)
        with torch.no_grad():
            new.weight.copy_(sliced(full, rows, name, layer.weight))
            new.bias.copy_(layer.bias[kept_rows(full, rows, name)])
    return small


def kept_rows(full: nn.Module, rows: dict, name: str) -> list[int]:
    return rows.get(name, list(range(getattr(full, name).weight.shape[0])))


def sliced(full: nn.Module, rows: dict, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of layer ``name``'s weight shape (its weight, per-element bits) without the pruned
    rows and the columns that read pruned channels; a grouped conv keeps per group its rows and the
    columns of its own input channels, and loses the groups left without rows."""
    src, block = full.READS[name]
    layer = getattr(full, name)
    keep = kept_rows(full, rows, name)
    cin = layer.weight.shape[1] * getattr(layer, "groups", 1)
    channels = kept_rows(full, rows, src) if src else list(range(cin // block))
    cols = [c * block + i for c in channels for i in range(block)]
    if isinstance(layer, nn.Linear):
        return tensor[keep][:, cols]
    per_in, per_out = layer.weight.shape[1], layer.weight.shape[0] // layer.groups
    parts = [([r for r in keep if r // per_out == g], [c - g * per_in for c in cols if c // per_in == g])
             for g in range(layer.groups)]
    parts = [(r, c) for r, c in parts if r]
    assert len({(len(r), len(c)) for r, c in parts}) == 1, "groups of unequal size have no torch conv"
    return torch.cat([tensor[r][:, c] for r, c in parts])
