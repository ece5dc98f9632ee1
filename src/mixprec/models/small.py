"""Small models for quick experiments: 8x8 digits, MNIST LeNet-5 and the jet-tagging MLP."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mixprec.models.blocks import conv_bn


def digits_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A small CNN for scikit-learn's 8x8 digits.

    Input (1, 8, 8), pixel values scaled to [0, 1]. Our own design (no published reference):
    conv(w) -> conv(2w) -> maxpool -> conv(2w) -> global average pool -> linear.
    14,458 parameters at ``width=16``. Adam (lr 3e-3, cosine, batch 32) for 30 epochs reaches
    99.2-99.7% test accuracy (stratified 80/20 split, seed 0) in about 20 s on two CPU cores,
    which makes it the end-to-end smoke model of the library.
    """
    w1, w2 = width, 2 * width
    return nn.Sequential(OrderedDict(
        conv1=conv_bn(1, w1, 3),
        conv2=conv_bn(w1, w2, 3),
        pool=nn.MaxPool2d(2),  # 8x8 -> 4x4
        conv3=conv_bn(w2, w2, 3),
        gap=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(w2, num_classes),
    ))


def lenet5(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """LeNet-5 (LeCun et al., 1998) for MNIST with modern ReLU activations.

    Input (1, 28, 28). conv 6@5x5 (pad 2) -> maxpool -> conv 16@5x5 -> maxpool ->
    fc 120 -> fc 84 -> fc num_classes: 61,706 parameters, the classic count.
    Max pooling replaces the original trainable subsampling (same parameter count as
    average pooling, and the converter passes it through without requantization).
    ``width`` scales every hidden layer (6, 16, 120, 84 channels/units at 1.0; at least one each):
    the way to shrink the model to a memory budget at a fixed precision.
    """
    c1, c2, f1, f2 = (max(1, round(n * width)) for n in (6, 16, 120, 84))
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, c1, 5, padding=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),  # 28x28 -> 14x14
        conv2=nn.Conv2d(c1, c2, 5),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),  # 10x10 -> 5x5
        flatten=nn.Flatten(),
        fc1=nn.Linear(c2 * 5 * 5, f1),
        relu3=nn.ReLU(),
        fc2=nn.Linear(f1, f2),
        relu4=nn.ReLU(),
        fc3=nn.Linear(f2, num_classes),
    ))


def jet_mlp(num_classes: int = 5) -> nn.Module:
    """Jet-tagging MLP 16-64-32-32-5 with ReLU (4,389 parameters).

    Input (16,) high-level jet features. The hls4ml jet-substructure benchmark model
    (Duarte et al., JINST 13 P07027, 2018), used by HGQ (Sun et al., 2024) and QKeras.
    """
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(16, 64),
        relu1=nn.ReLU(),
        fc2=nn.Linear(64, 32),
        relu2=nn.ReLU(),
        fc3=nn.Linear(32, 32),
        relu3=nn.ReLU(),
        fc4=nn.Linear(32, num_classes),
    ))


def _image_mlp(pixels: int, hidden: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list = [("flatten", nn.Flatten())]
    width = pixels
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def mnist_mlp(num_classes: int = 10) -> nn.Module:
    """MNIST MLP 784-64-32-10 with ReLU (52,650 parameters) on the (1, 28, 28) image: the FPGA
    comparison model of HGQ2 / hls4ml users."""
    return _image_mlp(28 * 28, (64, 32), num_classes)


def digits_mlp(num_classes: int = 10) -> nn.Module:
    """Digits MLP 64-32-32-10 with ReLU (3,466 parameters) on the (1, 8, 8) image."""
    return _image_mlp(8 * 8, (32, 32), num_classes)
