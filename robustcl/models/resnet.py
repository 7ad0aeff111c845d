"""ResNet-18 / ResNet-50 with dual batch-norm and a CIFAR or ImageNet stem; the branch is passed explicitly
through every block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .dual_bn import Branch, DualBatchNorm2d

Stem = Literal["cifar", "imagenet"]
STEMS: tuple[Stem, ...] = ("cifar", "imagenet")
CIFAR_STEM_MAX_SIDE = 64  # `auto` keeps the CIFAR stem up to this image side (px), the ImageNet stem above


def resolve_stem(stem: str | None, image_side: int | None) -> Stem:
    """The concrete stem for a `model.stem` value: auto (or None) picks cifar for <= 64 px images, else imagenet."""
    if stem in STEMS:
        return stem  # type: ignore[return-value]
    if stem not in (None, "auto"):
        raise ValueError(f"unknown stem {stem!r}; valid: auto, {', '.join(STEMS)}")
    if image_side is None:
        raise ValueError("stem auto needs the image side; pass it, or choose stem cifar or imagenet")
    return "cifar" if image_side <= CIFAR_STEM_MAX_SIDE else "imagenet"


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs as in standard ResNets; BN gamma 1, beta 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv3x3(in_planes: int, planes: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    """3x3 conv, padding 1 (DeACL's stem: 2), no bias (a BN follows)."""
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=padding, bias=False)


def conv1x1(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 conv, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus identity or 1x1 conv-BN shortcut; all BNs are dual.

    identity_shortcut=False is the authors' block (reference.projection_only_shortcut): a block whose
    shortcut would be the identity adds none, so its output is relu(bn2(conv2(...))) alone.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, dual_bn: bool, identity_shortcut: bool = True) -> None:
        super().__init__()
        self.identity_shortcut = identity_shortcut
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = DualBatchNorm2d(planes, dual_bn)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = DualBatchNorm2d(planes, dual_bn)
        self.downsample = stride != 1 or in_planes != planes
        if self.downsample:
            self.shortcut_conv = conv1x1(in_planes, planes, stride)
            self.shortcut_bn = DualBatchNorm2d(planes, dual_bn)

    @property
    def last_bn(self) -> DualBatchNorm2d:
        """The BN before the residual sum (zeroed by zero_init_residual)."""
        return self.bn2

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), branch))
        out = self.bn2(self.conv2(out), branch)
        if self.downsample:
            return F.relu(out + self.shortcut_bn(self.shortcut_conv(x), branch))
        return F.relu(out + x) if self.identity_shortcut else F.relu(out)


class Bottleneck(nn.Module):
    """1x1 (reduce) - 3x3 (stride here, torchvision v1.5) - 1x1 (expand x4) conv-BN, plus shortcut; all BNs dual.

    identity_shortcut=False: no residual path where the shortcut would be the identity (as BasicBlock).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, dual_bn: bool, identity_shortcut: bool = True) -> None:
        super().__init__()
        self.identity_shortcut = identity_shortcut
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = DualBatchNorm2d(planes, dual_bn)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = DualBatchNorm2d(planes, dual_bn)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = DualBatchNorm2d(out_planes, dual_bn)
        self.downsample = stride != 1 or in_planes != out_planes
        if self.downsample:
            self.shortcut_conv = conv1x1(in_planes, out_planes, stride)
            self.shortcut_bn = DualBatchNorm2d(out_planes, dual_bn)

    @property
    def last_bn(self) -> DualBatchNorm2d:
        """The BN before the residual sum (zeroed by zero_init_residual)."""
        return self.bn3

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), branch))
        out = F.relu(self.bn2(self.conv2(out), branch))
        out = self.bn3(self.conv3(out), branch)
        if self.downsample:
            return F.relu(out + self.shortcut_bn(self.shortcut_conv(x), branch))
        return F.relu(out + x) if self.identity_shortcut else F.relu(out)


class ResNet(nn.Module):
    """Dual-BN ResNet trunk: stem, four stages (64, 128, 256, 512 planes x block expansion), global avg pool.

    stem "cifar": 3x3 stride-1 conv, no max-pool (for <= 64 px images); "imagenet": 7x7 stride-2 conv and a
    3x3 stride-2 max-pool (for larger images; 224 px -> a 7x7 final map). zero_init_residual (off by
    default, as in torchvision) starts each block's last BN gamma (both branches) at 0, so blocks begin
    as identities. Parameter names match the earlier CIFAR-only ResNet18, so its checkpoints still load.
    identity_shortcut=False builds the authors' blocks (no residual path where the shortcut would be the
    identity; the parameters are the same, so the state dicts are interchangeable). stem_padding 2 (CIFAR
    stem only) is DeACL's stem: a 34x34 map after conv1 on 32x32 images, 5x5 at layer4; the weights are the
    same shapes either way, so only the file's metadata (or the layout read) can say which.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], in_channels: int = 3,
                 dual_bn: bool = True, stem: Stem = "cifar", zero_init_residual: bool = False,
                 identity_shortcut: bool = True, stem_padding: int = 1) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)} (resolve auto with resolve_stem)")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four block counts >= 1, got {tuple(layers)}")
        self.in_channels = in_channels
        self.dual_bn = dual_bn
        self.stem: Stem = stem
        self.identity_shortcut = identity_shortcut
        if stem_padding not in (1, 2) or (stem == "imagenet" and stem_padding != 1):
            raise ValueError(f"stem_padding must be 1 or 2 (2 only with the cifar stem), got {stem_padding}")
        self.stem_padding = stem_padding
        self.feature_dim = 512 * block.expansion
        self.conv1 = (conv3x3(in_channels, 64, padding=stem_padding) if stem == "cifar"
                      else nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False))
        self.bn1 = DualBatchNorm2d(64, dual_bn)
        stages, in_planes = [], 64
        for planes, stride, count in zip((64, 128, 256, 512), (1, 2, 2, 2), layers):
            blocks = [block(in_planes, planes, stride, dual_bn, identity_shortcut)]
            in_planes = planes * block.expansion
            blocks += [block(in_planes, planes, 1, dual_bn, identity_shortcut) for _ in range(count - 1)]
            stages.append(nn.ModuleList(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    for bn in (m.last_bn.benign, m.last_bn.adversarial):
                        if bn is not None:
                            nn.init.zeros_(bn.weight)

    def feature_map(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """The last stage's (N, feature_dim, h, w) map before pooling, for inspecting the downsampling."""
        x = F.relu(self.bn1(self.conv1(x), branch))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, branch)
        return x

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """Raw (unnormalised) pooled features of the already mean/std-normalised input."""
        return self.feature_map(x, branch).mean(dim=(2, 3))

    def extra_repr(self) -> str:
        skip = "" if self.identity_shortcut else ", identity_shortcut=False"
        pad = "" if self.stem_padding == 1 else f", stem_padding={self.stem_padding}"
        return f"stem={self.stem}, dual_bn={self.dual_bn}, feature_dim={self.feature_dim}{skip}{pad}"


class ResNet18(ResNet):
    """ResNet-18: BasicBlocks [2,2,2,2] -> (N, 512); CIFAR stem by default (32x32 inputs)."""

    def __init__(self, in_channels: int = 3, dual_bn: bool = True, stem: Stem = "cifar",
                 zero_init_residual: bool = False, identity_shortcut: bool = True, stem_padding: int = 1) -> None:
        super().__init__(BasicBlock, (2, 2, 2, 2), in_channels, dual_bn, stem, zero_init_residual, identity_shortcut,
                         stem_padding)


class ResNet50(ResNet):
    """ResNet-50 (torchvision v1.5 layout): Bottlenecks [3,4,6,3] -> (N, 2048); CIFAR stem unless stem="imagenet"."""

    def __init__(self, in_channels: int = 3, dual_bn: bool = True, stem: Stem = "cifar",
                 zero_init_residual: bool = False, identity_shortcut: bool = True, stem_padding: int = 1) -> None:
        super().__init__(Bottleneck, (3, 4, 6, 3), in_channels, dual_bn, stem, zero_init_residual, identity_shortcut,
                         stem_padding)
