"""TRADES (Zhang et al. 2019) for adversarial full fine-tuning: CE(f(x), y) + beta * KL(f(x) || f(x')).

x' maximises KL(p(x) || p(x')) in the L-inf eps-ball, starting at x + 0.001 N(0, 1) as in the
reference code; the attack runs with parameters frozen, the loss back-propagates through both terms.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from robustcl.objectives.attacks import _ascend, _check_budget, _project


def kl_clean_adv(logits_clean: torch.Tensor, logits_adv: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(logits_clean) || softmax(logits_adv)), in fp32; `sum` or `batchmean`."""
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                    reduction=reduction)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, labels: torch.Tensor,
                beta: float) -> torch.Tensor:
    """The TRADES objective: mean CE on clean logits + beta * mean KL(clean || adversarial)."""
    return F.cross_entropy(logits_clean.float(), labels) + beta * kl_clean_adv(logits_clean, logits_adv)


def trades_attack(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, alpha: float,
                  steps: int, generator: torch.Generator | None = None,
                  modules: Iterable[nn.Module] = ()) -> torch.Tensor:
    """x' = argmax over the eps-ball of KL(p(x) || p(x')) by sign-gradient ascent (TRADES's inner problem)."""
    _check_budget("trades_attack", eps, alpha, steps)
    x = x.detach()
    with torch.no_grad():
        target = model(x).float()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + 0.001 * noise).clamp_(0.0, 1.0)
    if eps == 0 or steps == 0:
        return x.clone()

    def objective(z: torch.Tensor) -> torch.Tensor:
        return kl_clean_adv(target, model(z), reduction="sum")

    return _ascend(objective, x_adv, steps, lambda z, g: _project(z + alpha * g.sign(), x, eps), modules)
