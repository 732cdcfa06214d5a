"""Tiny deterministic networks and batches for tests, docs and notebooks.

They exercise the cases that break activation tools on real backbones (in-place ReLU reused
inside a residual block, dilation, modules returning tuples) in milliseconds.

Examples:
    >>> import featlab.testing as ft
    >>> net = ft.TinyResNet()
    >>> net(ft.random_images(2, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


def random_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A reproducible float batch ``[n, 3, size, size]`` with values in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _init(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


class TinyCNN(nn.Module):
    """A plain CNN: two conv-bn-relu stages (stride 2 each), global pool, linear classifier."""

    def __init__(self, num_classes: int = 10, seed: int = 0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        _init(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyResNet(nn.Module):
    """A stem and two torchvision ``BasicBlock``s: the in-place ``out += identity`` and the reused
    in-place ``relu`` of a real ResNet, at toy size."""

    def __init__(self, num_classes: int = 10, seed: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        _init(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DilatedNet(nn.Module):
    """Three 3x3 convolutions with dilation 1, 2, 4 (stride 1): receptive field 1+2+4+8 = 15."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, dilation=1),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2),
            nn.Conv2d(4, 4, 3, padding=4, dilation=4),
        )
        _init(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class TwoHeads(nn.Module):
    """A module returning a tuple, as detection/segmentation heads often do."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 2, 1)
        _init(self, seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


class WithTupleBlock(nn.Module):
    """A network containing a submodule (``heads``) whose output is a tuple."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.heads = TwoHeads(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.heads(x)
        return a.sum(1, keepdim=True) + b.sum(1, keepdim=True)
