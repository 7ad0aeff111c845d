"""Encoder wrapper (in-model normalisation + L2-normalised features), builders and a fixed-branch adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .convnet import ConvNet
from .dual_bn import Branch, check_branch
from .resnet import ResNet18, ResNet50

BACKBONES: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "resnet50": ResNet50, "convnet": ConvNet}


class Encoder(nn.Module):
    """Normalises [0,1] pixels with per-channel mean/std inside the model, so attacks work in pixel space."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 l2_normalise: bool = True) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std lengths differ: {len(mean)} vs {len(std)}")
        in_channels = getattr(backbone, "in_channels", len(mean))
        if len(mean) != in_channels:
            raise ValueError(f"got {len(mean)} mean/std values for a {in_channels}-channel backbone")
        self.backbone = backbone
        self.feature_dim: int = backbone.feature_dim
        self.dual_bn: bool = backbone.dual_bn
        self.l2_normalise = l2_normalise  # False: the raw pooled features (a published protocol that reads them so)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, branch: Branch = "benign") -> torch.Tensor:
        """Unit-L2-norm features (N, feature_dim) of images `x` in [0,1], through the BN of `branch`
        (the raw pooled features when built with l2_normalise=False)."""
        features = self.backbone((x - self.mean) / self.std, branch)
        return F.normalize(features, dim=1) if self.l2_normalise else features


class BranchModel(nn.Module):
    """head(encoder(x, branch)) with the branch fixed, for third-party attack code that calls model(x)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, branch: Branch) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.branch: Branch = check_branch(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x, self.branch))


def build_backbone(arch: str, in_channels: int, dual_bn: bool, **kwargs) -> nn.Module:
    """Backbone by name: "resnet18", "resnet50" or "convnet"; kwargs go to its constructor (ConvNet widths, ResNet stem)."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; valid: {tuple(BACKBONES)}")
    return BACKBONES[arch](in_channels=in_channels, dual_bn=dual_bn, **kwargs)


def build_encoder(arch: str, in_channels: int, mean: Sequence[float], std: Sequence[float],
                  dual_bn: bool = True, l2_normalise: bool = True, **kwargs) -> Encoder:
    """Encoder around build_backbone(arch, ...) with the dataset's mean/std."""
    return Encoder(build_backbone(arch, in_channels, dual_bn, **kwargs), mean, std, l2_normalise)
