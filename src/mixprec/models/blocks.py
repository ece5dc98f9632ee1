"""Building blocks shared by the reference models.

Every block is made only of the layers the fx converter understands (conv, BatchNorm right
after it, ReLU/ReLU6, pooling, ``a + b``), so any model assembled from them converts as is.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Activation = Callable[[], nn.Module]


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    *,
    groups: int = 1,
    padding: int | tuple[int, int] | None = None,
    bias: bool = False,
    act: Activation | None = nn.ReLU,
) -> nn.Sequential:
    """Conv2d -> BatchNorm2d -> activation (``act=None`` leaves the output linear).

    Padding defaults to ``kernel_size // 2``: "same" for stride 1 and odd kernels. For stride 2
    on even inputs this pads symmetrically where Keras' "same" pads only bottom/right; the
    output size and parameter count are identical, only the sampling grid shifts by one pixel.
    """
    if padding is None:
        padding = _half(kernel_size)
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def linear_bn_relu(in_features: int, out_features: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU, the unit of the MLPerf Tiny autoencoder."""
    return nn.Sequential(
        nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU()
    )


def _half(kernel_size: int | tuple[int, ...]) -> int | tuple[int, ...]:
    if isinstance(kernel_size, int):
        return kernel_size // 2
    return tuple(k // 2 for k in kernel_size)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise kxk -> 1x1 linear projection (+ skip).

    With ``expand_ratio=1`` the expansion is left out, which is also EfficientNet's
    depthwise-separable block (timm ``DepthwiseSeparableConv`` without SE). The skip is only
    taken when shapes allow it (stride 1 and equal channels), decided once at build time so
    the traced graph is static.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        kernel_size: int = 3,
        act: Activation = nn.ReLU6,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_channels, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, kernel_size, stride, groups=hidden, act=act))
        layers.append(conv_bn(hidden, out_channels, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


class BasicBlock(nn.Module):
    """ResNet v1 basic block: two 3x3 convs, a shortcut, the add, then ReLU.

    The shortcut is the identity, or a 1x1 strided conv when the shape changes. Following
    the MLPerf Tiny Keras reference that projection conv has a bias and no BatchNorm.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, bias: bool = False
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_channels, out_channels, 3, stride, bias=bias),
            conv_bn(out_channels, out_channels, 3, bias=bias, act=None),
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))
