"""Dual batch-norm: separate benign / adversarial BN statistics behind shared conv weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Branch = Literal["benign", "adversarial"]
BRANCHES: tuple[Branch, ...] = ("benign", "adversarial")


def check_branch(branch: str) -> Branch:
    """Return `branch` unchanged, or raise ValueError naming the valid branches."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    return branch  # type: ignore[return-value]


class DualBatchNorm2d(nn.Module):
    """BatchNorm2d with one independent BN per branch; `dual=False` keeps a single shared BN (SimCLR)."""

    def __init__(self, num_features: int, dual: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.dual = dual
        # The single-BN case stores its BN as `benign` so its weights load into a dual model's benign branch.
        self.benign = nn.BatchNorm2d(num_features)
        self.adversarial = nn.BatchNorm2d(num_features) if dual else None

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """Normalise `x` with the BN of `branch` (the only BN when not dual)."""
        check_branch(branch)
        if self.adversarial is not None and branch == "adversarial":
            return self.adversarial(x)
        return self.benign(x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dual={self.dual}"


def set_bn_momentum(module: nn.Module, momentum: float | None | list[float | None]) -> list[float | None]:
    """Set `momentum` on every BN in `module` (a list restores per-layer values); return the old momenta."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    values = momentum if isinstance(momentum, list) else [momentum] * len(bns)
    if len(values) != len(bns):
        raise ValueError(f"got {len(values)} momenta for {len(bns)} batch-norm layers")
    old = [bn.momentum for bn in bns]
    for bn, value in zip(bns, values):
        bn.momentum = value
    return old


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[nn.Module]:
    """Keep BN running stats fixed (momentum 0) while train-mode forwards still use batch stats, e.g. SAM's perturbed pass."""
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    # momentum=None (cumulative average) reads num_batches_tracked, which still counts up; restore it too.
    counts = [bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None for bn in bns]
    old = set_bn_momentum(module, 0.0)
    try:
        yield module
    finally:
        set_bn_momentum(module, old)
        for bn, count in zip(bns, counts):
            if count is not None:
                bn.num_batches_tracked.copy_(count)
