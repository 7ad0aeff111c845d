"""Dual batch-norm: separate benign / adversarial BN statistics behind shared conv weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Branch = Literal["benign", "adversarial"]
BRANCHES: tuple[Branch, ...] = ("benign", "adversarial")


def check_branch(branch: str) -> Branch:
    """Return `branch` unchanged, or raise ValueError naming the valid branches."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    return branch  # type: ignore[return-value]


def reported_branch(requested: str, headline: Branch, dual: bool) -> Branch:
    """The branch a reading through `requested` uses: "headline" -> `headline`, benign/adversarial as asked;
    an encoder with one BN (`dual` False) has only its benign statistics. The one branch resolution."""
    branch = headline if requested == "headline" else check_branch(requested)
    return branch if dual else "benign"


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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch over all ranks.

    `nn.SyncBatchNorm` refuses CPU tensors (torch 2.13: "SyncBatchNorm expected input tensor to be on
    GPU"), so this one is used on every device, one code path: two all-reduces per forward, the sum
    (with the element count) for the mean, then the sum of squared deviations for the biased
    variance, both through `robustcl.distributed.all_reduce_with_grad`, whose backward sums the
    gradient over ranks, so each rank receives d(sum_s L_s)/d(its input). Running statistics follow
    `nn.BatchNorm2d` (unbiased variance over the global count, momentum or cumulative average), so
    `frozen_bn_stats` (momentum 0) keeps them fixed. Eval mode, or a single process, is plain BatchNorm2d.
    Parameter and buffer names are BatchNorm2d's: checkpoints and exported encoders load either way.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size() == 1:
            return super().forward(x)
        from robustcl.distributed import all_reduce_with_grad as all_reduce

        self._check_input_dim(x)
        factor = self.momentum if self.momentum is not None else 0.0
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        shape = (1, -1, 1, 1)
        xf = x.float()
        dims = (0, 2, 3)
        local = torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // x.shape[1])])
        total = all_reduce(local)
        count = total[-1].detach()
        mean = total[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach().to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        return y.to(x.dtype)


def cross_rank_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` inside `module` (both branches of each DualBatchNorm2d) by a
    CrossRankBatchNorm2d holding the same Parameter and buffer objects; returns `module`.

    Call it before building optimisers (they then see the same parameters either way).
    """
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            bn = CrossRankBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            for key in ("weight", "bias"):
                setattr(bn, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(bn, key, getattr(child, key))
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            cross_rank_batch_norm(child)
    return module
