"""MLPerf Tiny v0.5+ reference models (Banbury et al., 2021, arXiv:2106.07597), in PyTorch.

Layouts follow the Keras training code in github.com/mlcommons/tiny
(benchmark/training/*), including its conv biases in front of BatchNorm, so that the
parameter counts match the reference exactly. Keras reports BatchNorm moving statistics as
(non-trainable) parameters; PyTorch keeps them as buffers. Hence

    Keras "Trainable params" == sum(p.numel() for p in model.parameters())
    Keras "Total params"     == that + the running_mean/running_var elements.

Keras' padding="same" with stride 2 pads bottom/right only; the symmetric padding used here
gives the same output sizes and parameter counts (the grid shifts by one pixel).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mixprec.models.blocks import BasicBlock, conv_bn, linear_bn_relu


def resnet8(num_classes: int = 10, width: int = 16) -> nn.Module:
    """ResNet-8 for CIFAR-10 (image classification).

    Input (3, 32, 32). Source: mlcommons/tiny benchmark/training/image_classification/
    keras_model.py, ``resnet_v1_eembc`` with 16/32/64 filters. 78,186 trainable parameters
    (Keras total 78,666 with BatchNorm moving statistics).
    """
    return nn.Sequential(OrderedDict(
        stem=conv_bn(3, width, 3, bias=True),
        block1=BasicBlock(width, width, 1, bias=True),
        block2=BasicBlock(width, 2 * width, 2, bias=True),  # 32x32 -> 16x16
        block3=BasicBlock(2 * width, 4 * width, 2, bias=True),  # 16x16 -> 8x8
        pool=nn.AdaptiveAvgPool2d(1),  # Keras: AveragePooling2D(pool_size=8)
        flatten=nn.Flatten(),
        fc=nn.Linear(4 * width, num_classes),
    ))


def _depthwise_separable(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, with Keras' default biases."""
    return nn.Sequential(
        conv_bn(in_channels, in_channels, 3, stride, groups=in_channels, bias=True),
        conv_bn(in_channels, out_channels, 1, bias=True),
    )


def dscnn(num_classes: int = 12, filters: int = 64) -> nn.Module:
    """DS-CNN for keyword spotting on Speech Commands (12 classes).

    Input (1, 49, 10): 49 frames x 10 MFCCs. Source: mlcommons/tiny
    benchmark/training/keyword_spotting/keras_model.py (``ds_cnn``), after Zhang et al.,
    "Hello Edge" (arXiv:1711.07128). 23,756 trainable parameters (Keras total 24,908);
    the NXP eIQ model zoo lists the same 23,756 for this model.
    """
    return nn.Sequential(
        # Keras "same" with stride 2 pads rows 4/5 and columns 1/1; (5, 1) on both sides
        # gives the same 25x5 output.
        conv_bn(1, filters, (10, 4), 2, padding=(5, 1), bias=True),
        nn.Dropout(0.2),
        *[_depthwise_separable(filters, filters) for _ in range(4)],
        nn.Dropout(0.4),
        nn.AdaptiveAvgPool2d(1),  # Keras: AveragePooling2D(pool_size=(25, 5))
        nn.Flatten(),
        nn.Linear(filters, num_classes),
    )


# (depthwise stride, pointwise output channels at alpha=1) for the 13 separable blocks.
_MOBILENET_V1_BLOCKS = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512),
    (2, 1024), (1, 1024),
)


def mobilenet_v1(num_classes: int = 2, alpha: float = 0.25) -> nn.Module:
    """MobileNetV1 (Howard et al., 2017) with width multiplier ``alpha``, Keras biases included."""
    channels = int(32 * alpha)
    layers: list[nn.Module] = [conv_bn(3, channels, 3, 2, bias=True)]
    for stride, out in _MOBILENET_V1_BLOCKS:
        layers.append(_depthwise_separable(channels, int(out * alpha), stride))
        channels = int(out * alpha)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def mobilenetv1_025(num_classes: int = 2) -> nn.Module:
    """MobileNetV1 alpha=0.25 for Visual Wake Words (person / no person).

    Input (3, 96, 96). Source: mlcommons/tiny benchmark/training/visual_wake_words/
    vww_model.py (from SiliconLabs platform_ml_models eembc/Person_detection). 216,322
    trainable parameters; Keras total 221,794 (the figure the NXP eIQ model zoo lists).
    """
    return mobilenet_v1(num_classes, alpha=0.25)


def fc_autoencoder(
    input_dim: int = 640, hidden: int = 128, bottleneck: int = 8, depth: int = 4
) -> nn.Module:
    """Fully connected autoencoder for anomaly detection on ToyADMOS (ToyCar).

    Input (640,): 5 frames x 128 log-mel bins; output is the reconstruction (640,).
    Source: mlcommons/tiny benchmark/training/anomaly_detection/keras_model.py (DCASE 2020
    task 2 baseline): 4 x Dense(128)+BN+ReLU, Dense(8)+BN+ReLU, 4 x Dense(128)+BN+ReLU,
    Dense(640). 267,928 trainable parameters (Keras total 269,992).
    """
    encoder = [linear_bn_relu(input_dim, hidden)]
    encoder += [linear_bn_relu(hidden, hidden) for _ in range(depth - 1)]
    decoder = [linear_bn_relu(bottleneck, hidden)]
    decoder += [linear_bn_relu(hidden, hidden) for _ in range(depth - 1)]
    return nn.Sequential(
        *encoder,
        linear_bn_relu(hidden, bottleneck),
        *decoder,
        nn.Linear(hidden, input_dim),
    )
