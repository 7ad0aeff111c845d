"""Small CPU-sized conv encoder for 28x28 / 32x32 images, with dual batch-norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dual_bn import Branch, DualBatchNorm2d
from .resnet import init_weights


class ConvNet(nn.Module):
    """conv3x3-BN-ReLU x len(widths), stride 2 from the second layer on, global avg pool -> (N, widths[-1])."""

    def __init__(self, in_channels: int = 3, dual_bn: bool = True,
                 widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must be non-empty")
        self.in_channels = in_channels
        self.dual_bn = dual_bn
        self.feature_dim = widths[-1]
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False)
            for i, (c_in, c_out) in enumerate(zip(chans[:-1], chans[1:])))
        self.bns = nn.ModuleList(DualBatchNorm2d(c, dual_bn) for c in widths)
        init_weights(self)

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """Raw (unnormalised) pooled features of the already mean/std-normalised input."""
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x), branch))
        return x.mean(dim=(2, 3))
