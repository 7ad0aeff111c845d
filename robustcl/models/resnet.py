"""CIFAR-style ResNet-18 with dual batch-norm; the branch is passed explicitly through every block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dual_bn import Branch, DualBatchNorm2d


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs as in standard CIFAR ResNets; BN gamma 1, beta 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv, padding 1, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus identity or 1x1 conv-BN shortcut; all BNs are dual."""

    def __init__(self, in_planes: int, planes: int, stride: int, dual_bn: bool) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = DualBatchNorm2d(planes, dual_bn)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = DualBatchNorm2d(planes, dual_bn)
        self.downsample = stride != 1 or in_planes != planes
        if self.downsample:
            self.shortcut_conv = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            self.shortcut_bn = DualBatchNorm2d(planes, dual_bn)

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), branch))
        out = self.bn2(self.conv2(out), branch)
        shortcut = self.shortcut_bn(self.shortcut_conv(x), branch) if self.downsample else x
        return F.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, [2,2,2,2] blocks, global avg pool -> (N, 512)."""

    def __init__(self, in_channels: int = 3, dual_bn: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.dual_bn = dual_bn
        self.feature_dim = 512
        self.conv1 = conv3x3(in_channels, 64)
        self.bn1 = DualBatchNorm2d(64, dual_bn)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.ModuleList([BasicBlock(in_planes, planes, stride, dual_bn),
                                         BasicBlock(planes, planes, 1, dual_bn)]))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        init_weights(self)

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """Raw (unnormalised) pooled features of the already mean/std-normalised input."""
        x = F.relu(self.bn1(self.conv1(x), branch))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, branch)
        return x.mean(dim=(2, 3))
