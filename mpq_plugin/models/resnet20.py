"""CIFAR ResNet-20 (He et al., 2016, §4.2): 3 stages x 3 basic blocks, 16/32/64 channels.

Two shortcut variants, because the papers we reproduce disagree:

* ``shortcut="A"`` (learned-range code, Uhlich et al.): identity shortcuts; where the shape
  changes, stride 2 subsampling plus zero padding of the new channels (no parameters).
  19 convs without bias + FC (640 weights + 10 biases) = 268,346 quantized parameters.
* ``shortcut="B"`` (CSQ code): a 1x1 conv + BN projection where the shape changes, as a
  submodule called ``downsample`` (so a ``.*downsample.*`` pattern keeps it float, as CSQ does).

Every nonlinearity is its own ``nn.ReLU`` module (``relu`` after the stem, ``relu1`` after
``bn1`` and ``relu2`` after the residual addition in each block): 19 activation points, the
places where the learned-range paper quantizes activations, reachable with forward hooks.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels up to ``out_planes``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_planes} -> {out_planes})")
        self.stride = stride
        self.pad_front = (out_planes - in_planes) // 2
        self.pad_back = out_planes - in_planes - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))  # pads dim 1 (channels)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = PadShortcut(in_planes, planes, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + residual)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 for 32x32 inputs (other sizes work: global average pooling)."""

    def __init__(self, num_classes: int = 10, shortcut: str = "A", depth: int = 20) -> None:
        super().__init__()
        shortcut = shortcut.upper() if isinstance(shortcut, str) else shortcut
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r}; use 'A' (zero padding) or 'B' (1x1 conv + BN)")
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth={depth} is not 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.shortcut = shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, shortcut: str = "A") -> ResNet20:
    """CIFAR ResNet-20; ``shortcut="A"`` (learned-range paper) or ``"B"`` (CSQ).

    Example:
        >>> m = resnet20()
        >>> m(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNet20(num_classes=num_classes, shortcut=shortcut, depth=20)
