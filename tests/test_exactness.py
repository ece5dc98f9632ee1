"""Bit-exact integer deployment of every supported layer type (see :mod:`conformance`).

To cover a new layer, add a builder: a function returning a tiny float model and its input shape
(without batch). Every check of :class:`conformance.ExactnessSuite` then runs on it for every
granularity and both numerics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conformance import ExactnessSuite


class Residual(nn.Module):
    """``act(a(x) + b(x))``-style blocks: ``b`` may be ``None`` (identity shortcut)."""

    def __init__(self, a: nn.Module, b: nn.Module | None, act: nn.Module | None = None, head: nn.Module | None = None):
        super().__init__()
        self.a, self.b = a, b
        self.act = act or nn.Identity()
        self.head = head or nn.Identity()

    def forward(self, x):
        y = self.a(x)
        z = self.b(y) if self.b is not None else y
        return self.head(self.act(y + z))


class TwoBranches(nn.Module):
    """Sum of two convolutions of the same input whose outputs differ in range (and scale)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.b.weight.mul_(6.0)

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


class FunctionalHead(nn.Module):
    def __init__(self, flatten):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 4)
        self.flatten = flatten

    def forward(self, x):
        return self.fc(self.flatten(F.relu(self.conv(x))))


def seq(*layers, shape):
    return lambda: (nn.Sequential(*layers), shape)


IMG, SIG, VEC = (2, 5, 5), (2, 9), (6,)

BUILDERS = {
    # convolutions
    "conv1d": lambda: (nn.Sequential(nn.Conv1d(2, 4, 3)), SIG),
    "conv1d-strided-padded-dilated": lambda: (nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2)), SIG),
    "conv1d-grouped": lambda: (nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1)), (4, 7)),
    "conv2d": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3)), IMG),
    "conv2d-strided": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3, stride=2)), IMG),
    "conv2d-padded": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1)), IMG),
    "conv2d-dilated": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2, padding=1)), IMG),
    "conv2d-asymmetric": lambda: (nn.Sequential(nn.Conv2d(2, 4, (1, 3), stride=(2, 1), padding=(1, 0))), IMG),
    "conv2d-grouped": lambda: (nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), (4, 4, 4)),
    "conv2d-depthwise": lambda: (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1)), (4, 4, 4)),
    "conv2d-no-bias": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3, bias=False)), IMG),
    # linear
    "linear": lambda: (nn.Sequential(nn.Linear(6, 5)), VEC),
    "linear-mlp": lambda: (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), VEC),
    # BatchNorm folded
    "conv2d-bn": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4)), IMG),
    "conv1d-bn-relu": lambda: (nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), SIG),
    "linear-bn": lambda: (nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), VEC),
    # fused activations
    "conv2d-relu": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU()), IMG),
    "conv2d-relu6": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU6()), IMG),
    "conv2d-hardtanh": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Hardtanh(-0.5, 0.75)), IMG),
    "conv2d-identity": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Identity(), nn.Dropout(0.5)), IMG),
    "linear-relu6": lambda: (nn.Sequential(nn.Linear(6, 5), nn.ReLU6()), VEC),
    "linear-hardtanh": lambda: (nn.Sequential(nn.Linear(6, 5), nn.Hardtanh()), VEC),
    # standalone activations (act nodes)
    "maxpool-relu": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()), IMG),
    "relu-relu6": lambda: (nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.ReLU6()), VEC),
    "input-hardtanh": lambda: (nn.Sequential(nn.Hardtanh(-0.5, 0.5), nn.Conv2d(2, 3, 1)), IMG),
    # residual add
    "add-same-scale": lambda: (Residual(nn.Conv2d(2, 3, 3, padding=1), None), IMG),  # y + y
    "add-same-grid": lambda: (Residual(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(3, 1, 1), nn.ReLU()), IMG),
    "add-different-scales": lambda: (TwoBranches(), IMG),
    "add-conv-shortcut-relu6": lambda: (Residual(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1),
                                                 nn.ReLU6()), IMG),
    "add-input-shortcut": lambda: (Residual(nn.Identity(), nn.Conv1d(2, 2, 3, padding=1), nn.Hardtanh(-1, 1)), SIG),
    # pooling
    "maxpool1d": lambda: (nn.Sequential(nn.Conv1d(2, 3, 3), nn.MaxPool1d(2)), SIG),
    "maxpool1d-padded": lambda: (nn.Sequential(nn.Conv1d(2, 3, 3), nn.MaxPool1d(3, 2, padding=1)), SIG),
    "maxpool2d": lambda: (nn.Sequential(nn.Conv2d(2, 3, 2), nn.MaxPool2d(2)), IMG),
    "maxpool2d-padded": lambda: (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(3, 2, padding=1)), IMG),
    "maxpool2d-input": lambda: (nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2, 3, 1)), (2, 4, 4)),
    "avgpool1d": lambda: (nn.Sequential(nn.Conv1d(2, 3, 2), nn.AvgPool1d(2)), SIG),
    "avgpool1d-overlapping": lambda: (nn.Sequential(nn.Conv1d(2, 3, 3), nn.AvgPool1d(3, 1)), SIG),
    "avgpool2d": lambda: (nn.Sequential(nn.Conv2d(2, 3, 2), nn.AvgPool2d(2)), IMG),
    "avgpool2d-strided": lambda: (nn.Sequential(nn.Conv2d(2, 3, 1), nn.AvgPool2d(3, 2)), IMG),
    "adaptive-global": lambda: (nn.Sequential(nn.Conv2d(2, 3, 2), nn.AdaptiveAvgPool2d(1)), IMG),
    "adaptive-dividing": lambda: (nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 5))), IMG),
    "adaptive1d": lambda: (nn.Sequential(nn.Conv1d(2, 3, 3), nn.AdaptiveAvgPool1d(7)), SIG),
    # flatten
    "flatten-module": lambda: (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)), IMG),
    "flatten-function": lambda: (FunctionalHead(lambda y: torch.flatten(y, 1)), (2, 4, 4)),
    "flatten-method": lambda: (FunctionalHead(lambda y: y.flatten(1)), (2, 4, 4)),
    "flatten-view": lambda: (FunctionalHead(lambda y: y.view(y.size(0), -1)), (2, 4, 4)),
    "flatten-conv1d": lambda: (nn.Sequential(nn.Conv1d(2, 2, 3, stride=3), nn.Flatten(), nn.Linear(6, 2)), SIG),
    # a small network with everything at once
    "tiny-cnn": lambda: (nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        Residual(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 4, 1), nn.ReLU6()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4, 3)), (2, 4, 4)),
}


class TestLayers(ExactnessSuite):
    builders = BUILDERS
