"""Small models written the way public PyTorch code writes them (tutorials, keyword spotting,
residual nets, 1-D temporal nets, MLPs): the converter's corpus. Each entry: a builder and the
input shape (no batch dim)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TutorialNet(nn.Module):
    """The PyTorch 60-minute blitz CNN, on one channel: functional pooling, view by size, log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


class MnistExample(nn.Module):
    """pytorch/examples' MNIST net: dropout, torch.flatten, functional max pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class DSCNN(nn.Module):
    """A keyword-spotting DS-CNN (MLPerf Tiny style): padding='same', depthwise separable blocks,
    BatchNorm, in-place ReLU, a global mean."""

    def __init__(self, channels: int = 16, blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, (5, 3), stride=2, padding=(2, 1), bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        layers = []
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding="same", groups=channels, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                       nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, 12)

    def forward(self, x):
        x = self.body(self.stem(x))
        x = torch.mean(x, dim=(2, 3))
        return self.classifier(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock idiom: ``out += identity``, an empty Sequential shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = x.reshape(x.size(0), -1)
        return self.fc(x)


class TemporalConvNet(nn.Module):
    """A 1-D temporal conv net on (channels, time): 'same' padding, dilation, F.avg_pool1d, x.mean(-1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5, padding="same")
        self.conv2 = nn.Conv1d(8, 8, 3, padding="same", dilation=2)
        self.conv3 = nn.Conv1d(8, 16, 3, padding="valid")
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.avg_pool1d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.head(x.mean(-1))


class JetMLP(nn.Module):
    """An hls4ml-style jet tagger MLP with a softmax at the output."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 5)
        self.act = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.softmax(self.out(x))


class ImageMLP(nn.Module):
    """An MLP on images: x.view(-1, 28 * 28) as the tutorials write it, ReLU6, torch.add."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(14 * 14, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 14 * 14)
        h = F.relu6(self.fc1(x))
        h = F.relu(torch.add(h, self.fc2(h)))
        return self.fc3(h)


class SequentialCNN(nn.Module):
    """One nn.Sequential with nn.Flatten, adaptive pooling and Hardtanh."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(0.0, 4.0), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding="same"), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        return self.features(x)


class SqueezeHead(nn.Module):
    """A global pool kept as (C, 1, 1), squeezed twice, then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 12, 3, stride=2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1)
        return self.fc(x.squeeze(-1).squeeze(-1))




class DigitsTutorialNet(nn.Module):
    """The tutorial idiom on 8x8 digits: functional pooling, ``x.view(x.size(0), -1)`` right after a
    convolution (fails on channels-last memory), log_softmax."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return F.log_softmax(self.fc(x), dim=1)


class FunctionalLayers(nn.Module):
    """Layers written as functions over the model's own parameters."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.zeros(6))
        self.w2 = nn.Parameter(torch.randn(4, 6 * 2 * 2) * 0.2)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, stride=1, padding=1))
        x = F.avg_pool2d(x, 3)
        return F.linear(x.flatten(1), self.w2)


class LeNet5(nn.Module):
    """The classic LeNet-5: nn.Sequential features, average pooling, a classifier Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
                                        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGGBlocks(nn.Module):
    """VGG-style blocks built in a loop, F.relu and F.max_pool2d, x.reshape(x.shape[0], -1)."""

    def __init__(self, widths=(8, 16)):
        super().__init__()
        convs, cin = [], 3
        for w in widths:
            convs += [nn.Conv2d(cin, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)]
            cin = w
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i % 2 == 1:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
        return self.fc(x.reshape(x.shape[0], -1))


class MobileNetV1Tiny(nn.Module):
    """Depthwise separable blocks with BatchNorm and ReLU6, AdaptiveAvgPool2d then torch.flatten."""

    def __init__(self):
        super().__init__()

        def dw(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                 nn.ReLU6(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU6(inplace=True))

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(dw(8, 16, 1), dw(16, 32, 2), dw(32, 32, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class KWS1D(nn.Module):
    """A 1-D keyword-spotting CNN over MFCC frames: Conv1d + BatchNorm1d + MaxPool1d, a mean over time."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(10, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(32)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(32, 12)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.mean(x, dim=-1))


class DropoutMLP(nn.Module):
    """An MLP with functional dropout tied to self.training and a hardtanh."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32)
        self.l2 = nn.Linear(32, 16)
        self.l3 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.dropout(F.relu(self.l1(x)), p=0.2, training=self.training)
        x = F.hardtanh(self.l2(x), min_val=0.0, max_val=2.0)
        return self.l3(x)


class ResBlock1D(nn.Module):
    """A residual 1-D block: torch.add of two branches, then ReLU; a strided conv downsampling."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(2, 8, 5, padding=2)
        self.a = nn.Conv1d(8, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 3, padding=1)
        self.down = nn.Conv1d(8, 16, 3, stride=2)
        self.head = nn.Linear(16 * 7, 4)

    def forward(self, x):
        x = F.relu(self.inp(x))
        y = self.b(F.relu(self.a(x)))
        x = F.relu(torch.add(x, y))
        x = F.relu(self.down(x))
        return self.head(x.view(x.size(0), -1))


class LogSoftmaxHead(nn.Module):
    """A CNN ending in nn.LogSoftmax, as models trained with nn.NLLLoss are written."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.out = nn.Linear(4 * 3 * 3, 10)
        self.log_softmax = nn.LogSoftmax(dim=1)

    def forward(self, x):
        return self.log_softmax(self.out(self.body(x)))


class PaddedConvNet(nn.Module):
    """Padding written as a layer: nn.ZeroPad2d before a valid convolution, F.pad before another."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv1(self.pad(x)))
        x = F.relu(self.conv2(F.pad(x, (1, 1, 1, 1))))
        return self.fc(F.adaptive_avg_pool2d(x, (1, 1)).flatten(1))


class KerasSamePooling(nn.Module):
    """A Keras port: 'same' max pooling of an odd map written as nn.ZeroPad2d((0, 1, 0, 1)) before
    nn.MaxPool2d(2), as TensorFlow pads it (after, on the right and the bottom)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)),
                                      nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class TwoStageResNet(nn.Module):
    """Residual stages from a list of BasicBlocks (nn.Sequential of blocks), x.mean([2, 3])."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean([2, 3]))


class Inception(nn.Module):
    """A GoogLeNet-style inception block: four branches (1x1; 1x1 then 3x3; 1x1 then 5x5; max pool
    then 1x1) joined by torch.cat along channels, BatchNorm and ReLU in each."""

    def __init__(self, cin: int = 8):
        super().__init__()

        def unit(i, o, k):
            return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.stem = unit(3, cin, 3)
        self.branch1 = unit(cin, 4, 1)
        self.branch3 = nn.Sequential(unit(cin, 4, 1), unit(4, 6, 3))
        self.branch5 = nn.Sequential(unit(cin, 2, 1), unit(2, 3, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), unit(cin, 3, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        outputs = [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)]
        x = torch.cat(outputs, 1)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class DenseBlock(nn.Module):
    """DenseNet's idiom: each layer's output concatenated to its input (``torch.cat([x, out], 1)``)."""

    def __init__(self, growth: int = 4, layers: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(6 + i * growth, growth, 3, padding=1), nn.ReLU()) for i in range(layers))
        self.fc = nn.Linear((6 + layers * growth) * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        x = F.avg_pool2d(x, 2)
        return self.fc(x.view(x.size(0), -1))


class TwoTowerMLP(nn.Module):
    """Two MLP towers over one feature vector, joined by torch.cat on the feature dim (dim=-1)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(12, 16)
        self.deep = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(torch.cat((F.relu(self.wide(x)), self.deep(x)), dim=-1))


class MobileNetV3Block(nn.Module):
    """MobileNetV3's idiom without squeeze-excitation: Hardswish stem, an inverted residual block
    (expand, depthwise, project) with ``inplace`` Hardswish, Hardsigmoid-free head with dropout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(inplace=True))
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16),
                                       nn.Hardswish(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class LeakyKWS(nn.Module):
    """A keyword-spotting CNN with LeakyReLU (F.leaky_relu with a slope), as audio models often use."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, (5, 3), padding=(2, 1))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = F.max_pool2d(x, 2)
        x = F.leaky_relu(self.conv2(x), negative_slope=0.2)
        return self.fc(torch.mean(x, dim=(2, 3)))


class TanhMLP(nn.Module):
    """A classic tanh / sigmoid MLP (the pre-ReLU tutorials' activations), GELU in the middle."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 12), nn.Linear(12, 4)

    def forward(self, x):
        x = torch.tanh(self.fc1(x))
        x = F.gelu(self.fc2(x))
        x = torch.sigmoid(self.fc3(x))
        return self.out(x)


class SiLUConvNet(nn.Module):
    """EfficientNet-style SiLU (nn.SiLU and F.silu) after BatchNorm'd convolutions."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.head = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = F.silu(self.conv2(self.conv1(x)))
        return self.head(x.flatten(1))


class SEBlock(nn.Module):
    """The SENet reference block: squeeze (adaptive pool, view), excite (two linears, sigmoid), scale."""

    def __init__(self, channel: int, reduction: int = 4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(channel // reduction, channel, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y


class SEResNet(nn.Module):
    """A residual block with squeeze-and-excitation before the sum (SE-ResNet), on digits-sized input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.se = SEBlock(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.se(self.conv(x))
        out += x
        out = F.relu(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class MobileNetV3SE(nn.Module):
    """MobileNetV3's bneck with torchvision's SqueezeExcitation idiom: Hardswish, the scale from
    F.adaptive_avg_pool2d kept (C, 1, 1) through 1x1 convolutions, a Hardsigmoid gate, ``scale * x``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.project = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x)
        scale = F.adaptive_avg_pool2d(y, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        y = self.project(scale * y)
        x = x + y
        return self.head(x.mean((2, 3)))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's basic unit: channel split with ``chunk``, a depthwise branch, ``torch.cat``, and a
    channel shuffle written as slices (``x[:, ::2]`` has no integer kernel; the halves are re-joined)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        out = torch.cat((out[:, 4:], out[:, :4]), dim=1)
        return self.fc(out.mean([2, 3]))


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class OptionABlock(nn.Module):
    """The CIFAR ResNet's basic block as the widely copied ResNet-20/32/56 code writes it: bias-free
    convs, ``out += shortcut(x)``, and when the shape changes the parameter-free "option A" shortcut,
    a lambda that keeps every other position and pads zero channels on both sides."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4),
                                                        "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNetA(nn.Module):
    """A three-stage CIFAR ResNet with option-A shortcuts, the final pooling sized by ``out.size()[3]``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = OptionABlock(8, 8)
        self.layer2 = OptionABlock(8, 16, stride=2)
        self.layer3 = OptionABlock(16, 32, stride=2)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


CORPUS = {
    "tutorial-net": (TutorialNet, (1, 28, 28)),
    "mnist-example": (MnistExample, (1, 16, 16)),
    "ds-cnn": (DSCNN, (1, 20, 10)),
    "tiny-resnet": (TinyResNet, (3, 16, 16)),
    "temporal-conv": (TemporalConvNet, (3, 32)),
    "jet-mlp-softmax": (JetMLP, (16,)),
    "image-mlp": (ImageMLP, (1, 14, 14)),
    "sequential-cnn": (SequentialCNN, (3, 8, 8)),
    "squeeze-head": (SqueezeHead, (2, 9, 9)),
    "functional-layers": (FunctionalLayers, (2, 6, 6)),
    "lenet5": (LeNet5, (1, 28, 28)),
    "vgg-blocks": (VGGBlocks, (3, 8, 8)),
    "mobilenet-v1-tiny": (MobileNetV1Tiny, (3, 16, 16)),
    "kws-1d": (KWS1D, (10, 20)),
    "dropout-mlp": (DropoutMLP, (20,)),
    "resblock-1d": (ResBlock1D, (2, 16)),
    "log-softmax-head": (LogSoftmaxHead, (1, 8, 8)),
    "padded-conv": (PaddedConvNet, (1, 6, 6)),
    "two-stage-resnet": (TwoStageResNet, (3, 8, 8)),
    "inception": (Inception, (3, 8, 8)),
    "dense-block": (DenseBlock, (1, 8, 8)),
    "two-tower-mlp": (TwoTowerMLP, (12,)),
    "mobilenet-v3-block": (MobileNetV3Block, (3, 16, 16)),
    "leaky-kws": (LeakyKWS, (1, 16, 10)),
    "tanh-mlp": (TanhMLP, (16,)),
    "silu-convnet": (SiLUConvNet, (1, 8, 8)),
    "se-resnet": (SEResNet, (1, 8, 8)),
    "mobilenet-v3-se": (MobileNetV3SE, (1, 8, 8)),
    "shuffle-unit": (ShuffleUnit, (1, 8, 8)),
    "cifar-resnet-option-a": (CifarResNetA, (3, 16, 16)),
    "keras-same-pooling": (KerasSamePooling, (1, 7, 7)),
}


class FailsInTraining(nn.Module):
    """Traces (eval mode), then fails in its own forward once training starts."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if self.training:
            x = x.view(-1, 65)
        return self.fc(x.flatten(1))
