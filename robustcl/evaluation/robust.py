"""Clean and PGD accuracy of a classifier `model(x) -> logits` in eval mode (pixel-space inputs)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustcl.config import AttackConfig
from robustcl.objectives import pgd

Autocast = Callable[[], contextlib.AbstractContextManager]


def _no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def ce_objective(model: nn.Module, labels: torch.Tensor, autocast: Autocast = _no_autocast):
    """x -> summed cross-entropy of model(x) against `labels` (the untargeted PGD objective)."""
    def objective(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(x)
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    return objective


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, labels[i:i + batch_size].to(device)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             autocast: Autocast = _no_autocast) -> float:
    """Clean top-1 accuracy; the model must be in eval mode (asserted)."""
    if model.training:
        raise RuntimeError("evaluation needs the model in eval mode (call model.eval())")
    device = next(model.parameters()).device
    correct = 0
    for x, y in _batches(images, labels, batch_size, device):
        with autocast():
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / max(1, len(images))


def pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                 batch_size: int = 500, generator: torch.Generator | None = None,
                 autocast: Autocast = _no_autocast) -> float:
    """Accuracy under L-inf PGD on the cross-entropy (parameters frozen, eval mode)."""
    if model.training:
        raise RuntimeError("evaluation needs the model in eval mode (call model.eval())")
    device = next(model.parameters()).device
    correct = 0
    for x, y in _batches(images, labels, batch_size, device):
        x_adv = pgd(ce_objective(model, y, autocast), x, attack.eps, attack.alpha, attack.steps,
                    attack.random_start, generator, modules=[model])
        with torch.no_grad(), autocast():
            correct += (model(x_adv).argmax(1) == y).sum().item()
    return correct / max(1, len(images))


def robustness_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                     eps_values: list[float], batch_size: int = 500, seed: int = 0,
                     autocast: Autocast = _no_autocast, known: dict[float, float] | None = None) -> list[dict[str, float]]:
    """PGD accuracy at each eps (step size scaled as alpha/eps of `attack`); eps=0 is clean accuracy.

    `known` maps eps values already measured with this very attack to their accuracy (not redone).
    """
    ratio = attack.alpha / attack.eps if attack.eps > 0 else 0.25
    out = []
    for eps in eps_values:
        if known is not None and eps in known:
            acc = known[eps]
        elif eps == 0:
            acc = accuracy(model, images, labels, batch_size, autocast)
        else:
            cfg = AttackConfig(eps=eps, alpha=ratio * eps, steps=attack.steps, random_start=attack.random_start)
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
            acc = pgd_accuracy(model, images, labels, cfg, batch_size, gen, autocast)
        out.append({"eps": eps, "accuracy": acc})
    return out
