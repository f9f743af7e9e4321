"""Small float models shared by the graph, inspection and benchmark code (written by hand)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (64, 32, 32, 10)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(nn.functional.hardtanh(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 style (CIFAR stem): ``blocks`` BasicBlocks per stage, four stages.

    A float ResNet: every conv after the stem reads a relu output, so under ``Recipe.bnn()`` its
    sign is +1 everywhere (prepare warns). Binary training uses :class:`BiRealResNet`.
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 16,
                 in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stage = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            stage += [BasicBlock(cout, cout) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet18(width: int = 16, classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), width=width, classes=classes)


class BiRealBlock(nn.Module):
    """Bi-Real Net block (Liu et al. 2018): ``x -> conv -> bn -> + x`` for each of two 3x3 convs.

    Under ``Recipe.bnn()`` each conv reads the sign of a real-valued sum (a batch norm output plus
    the shortcut), which takes both signs; no relu sits in front of a binary conv. Downsampling
    shortcuts are ``avg_pool(2) -> 1x1 conv -> bn`` as in Bi-Real Net.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            pool = nn.AvgPool2d(stride) if stride != 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)) + self.shortcut(x)
        return self.bn2(self.conv2(out)) + out


class BiRealResNet(nn.Module):
    """Bi-Real-style ResNet-18 (CIFAR stem): float stem ``conv -> bn`` (no relu), ``blocks``
    :class:`BiRealBlock` per stage, four stages, float head ``relu -> avg pool -> fc`` (larq
    zoo's Bi-Real Net places the relu there). Same convs and widths as :class:`ResNet`."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), width: int = 16,
                 in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stage = [BiRealBlock(cin, cout, 1 if i == 0 else 2)]
            stage += [BiRealBlock(cout, cout) for _ in range(n - 1)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1)
        return self.fc(x)


def bireal_resnet18(width: int = 16, classes: int = 10) -> BiRealResNet:
    return BiRealResNet((2, 2, 2, 2), width=width, classes=classes)


class TorchvisionBasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock as written there: one in-place ReLU module used twice,
    ``out += identity``; the block input (a relu output) feeds both conv1 and the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    """A small torchvision-style ResNet (stem ``conv -> bn -> relu -> max pool``, two stages of
    :class:`TorchvisionBasicBlock`, ``avg pool -> flatten -> fc``), without torchvision."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(TorchvisionBasicBlock(width, width),
                                    TorchvisionBasicBlock(width, width))
        self.layer2 = nn.Sequential(TorchvisionBasicBlock(width, 2 * width, 2),
                                    TorchvisionBasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Twice(nn.Module):
    """One Linear module called twice (shared weights, two call sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.fc(x))
