"""ImageNet-scale mobile networks: MobileNetV2 and EfficientNet-Lite0.

Both are built from the same inverted-residual block with ReLU6 and no squeeze-excitation,
so they convert with the plain conv/BN/ReLU6/add converter. Weights are random: no
pretrained checkpoints are loaded.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mixprec.models.blocks import InvertedResidual, conv_bn


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10%.

    The torchvision/TF-slim rule, kept exact so width multipliers give the same shapes.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _with_classifier(
    features: nn.Sequential, channels: int, num_classes: int, dropout: float
) -> nn.Sequential:
    # Dropout sits between the pooled features and the classifier, as in both references.
    return nn.Sequential(OrderedDict(
        features=features,
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        dropout=nn.Dropout(dropout),
        classifier=nn.Linear(channels, num_classes),
    ))


# (expand ratio t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_MOBILENET_V2_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 (Sandler et al., 2018, arXiv:1801.04381), ReLU6, inverted residuals.

    Input (3, 224, 224). Layer-for-layer the torchvision ``mobilenet_v2`` definition
    (same parameter shapes, 3,504,872 parameters at width 1.0 and 1000 classes).
    """
    channels = _make_divisible(32 * width_mult)
    last_channels = _make_divisible(1280 * max(1.0, width_mult))
    layers: list[nn.Module] = [conv_bn(3, channels, 3, 2, act=nn.ReLU6)]
    for t, c, n, s in _MOBILENET_V2_STAGES:
        out = _make_divisible(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
            channels = out
    layers.append(conv_bn(channels, last_channels, 1, act=nn.ReLU6))
    return _with_classifier(nn.Sequential(*layers), last_channels, num_classes, dropout=0.2)


# (expand ratio, kernel, first stride, output channels, repeats): timm's efficientnet_lite0
# arch_def ds_r1_k3_s1_e1_c16, ir_r2_k3_s2_e6_c24, ir_r2_k5_s2_e6_c40, ir_r3_k3_s2_e6_c80,
# ir_r3_k5_s1_e6_c112, ir_r4_k5_s2_e6_c192, ir_r1_k3_s1_e6_c320.
_EFFICIENTNET_LITE0_STAGES = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0: EfficientNet-B0 without SE, ReLU6, fixed 32-ch stem and 1280-ch head.

    Input (3, 224, 224). Source: TensorFlow TPU efficientnet/lite (2020) as defined in timm
    ``efficientnet_lite0`` (symmetric padding, the non-"tf_" variant): 4,652,008
    parameters at 1000 classes, the figure timm reports for that model.
    """
    channels = 32
    layers: list[nn.Module] = [conv_bn(3, channels, 3, 2, act=nn.ReLU6)]
    for expand, kernel, stride, out, repeats in _EFFICIENTNET_LITE0_STAGES:
        for i in range(repeats):
            layers.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand, kernel))
            channels = out
    layers.append(conv_bn(channels, 1280, 1, act=nn.ReLU6))
    return _with_classifier(nn.Sequential(*layers), 1280, num_classes, dropout=0.2)
