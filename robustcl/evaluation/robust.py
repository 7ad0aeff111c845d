"""Clean and PGD accuracy of a classifier `model(x) -> logits` in eval mode (pixel-space inputs)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustcl.config import AttackConfig
from robustcl.objectives import pgd
from robustcl.runs.progress import Tick

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


def cw_margin_objective(model: nn.Module, labels: torch.Tensor, autocast: Autocast = _no_autocast):
    """x -> summed Carlini-Wagner margin max_{j != y} z_j - z_y (positive iff misclassified).

    Unlike cross-entropy it does not saturate on confident predictions, so it still finds
    adversarial examples where a softmax's gradient vanishes.
    """
    def objective(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(x).float()
        true = logits.gather(1, labels[:, None]).squeeze(1)
        other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
        return (other - true).sum()
    return objective


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device):
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        yield x, labels[i:i + batch_size].to(device)


Perturb = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def correct_under(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, perturb: Perturb | None,
                  batch_size: int = 500, autocast: Autocast = _no_autocast, restarts: int = 1,
                  tick: Tick | None = None) -> torch.Tensor:
    """Per-image correctness (bool, on the CPU) on perturb(x, y) (on x itself when None); eval mode required.

    With `restarts` > 1 an image counts as robust only if it survives every restart; each restart
    attacks only the images still classified correctly (the per-example worst case). `tick(n)` follows each
    batch of n images (progress).
    """
    if model.training:
        raise RuntimeError("evaluation needs the model in eval mode (call model.eval())")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    device = next(model.parameters()).device
    flags = []  # kept on device: one transfer at the end
    for x, y in _batches(images, labels, batch_size, device):
        if perturb is None:
            with torch.no_grad(), autocast():
                flags.append(model(x).argmax(1) == y)
            if tick is not None:
                tick(len(y))
            continue
        alive = torch.ones_like(y, dtype=torch.bool)
        for _ in range(restarts):
            idx = alive.nonzero().squeeze(1)
            if restarts > 1 and idx.numel() == 0:
                break
            x_adv = perturb(x[idx], y[idx])
            with torch.no_grad(), autocast():
                alive[idx] = model(x_adv).argmax(1) == y[idx]
        flags.append(alive)
        if tick is not None:
            tick(len(y))
    return torch.cat(flags).cpu() if flags else torch.zeros(0, dtype=torch.bool)


def fraction(flags: torch.Tensor) -> float:
    """Accuracy from per-image flags (0 for no images)."""
    return int(flags.sum()) / max(1, len(flags))


def accuracy_under(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, perturb: Perturb | None,
                   batch_size: int = 500, autocast: Autocast = _no_autocast, restarts: int = 1,
                   tick: Tick | None = None) -> float:
    """Top-1 accuracy on perturb(x, y) (on x itself when None), worst over restarts; see correct_under."""
    return fraction(correct_under(model, images, labels, perturb, batch_size, autocast, restarts, tick))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             autocast: Autocast = _no_autocast, tick: Tick | None = None) -> float:
    """Clean top-1 accuracy (eval mode asserted)."""
    return accuracy_under(model, images, labels, None, batch_size, autocast, tick=tick)


def pgd_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                batch_size: int = 500, generator: torch.Generator | None = None,
                autocast: Autocast = _no_autocast, restarts: int = 1, tick: Tick | None = None) -> torch.Tensor:
    """Per-image robustness (bool) under L-inf PGD on the cross-entropy, worst over restarts (eval mode)."""
    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(ce_objective(model, y, autocast), x, attack.eps, attack.alpha, attack.steps,
                   attack.random_start, generator, modules=[model])

    return correct_under(model, images, labels, perturb, batch_size, autocast, restarts, tick)


def pgd_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                 batch_size: int = 500, generator: torch.Generator | None = None,
                 autocast: Autocast = _no_autocast, restarts: int = 1, tick: Tick | None = None) -> float:
    """Accuracy under L-inf PGD on the cross-entropy (parameters frozen, eval mode), worst over restarts."""
    return fraction(pgd_correct(model, images, labels, attack, batch_size, generator, autocast, restarts, tick))


def robustness_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                     eps_values: list[float], batch_size: int = 500, seed: int = 0,
                     autocast: Autocast = _no_autocast, known: dict[float, float] | None = None,
                     tick: Tick | None = None) -> list[dict[str, float]]:
    """PGD accuracy at each eps (step size scaled as alpha/eps of `attack`); eps=0 is clean accuracy.

    `known` maps eps values already measured with this very attack to their accuracy (not redone); `tick(n)`
    follows each batch of n images.
    """
    ratio = attack.alpha / attack.eps if attack.eps > 0 else 0.25
    out = []
    for eps in eps_values:
        if known is not None and eps in known:
            acc = known[eps]
        elif eps == 0:
            acc = accuracy(model, images, labels, batch_size, autocast, tick)
        else:
            cfg = AttackConfig(eps=eps, alpha=ratio * eps, steps=attack.steps, random_start=attack.random_start)
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
            acc = pgd_accuracy(model, images, labels, cfg, batch_size, gen, autocast, tick=tick)
        out.append({"eps": eps, "accuracy": acc})
    return out


def curve_images(values: list, known: dict | None, n: int) -> int:
    """Images a curve attacks: n for each of its points not already `known` (its progress part's total)."""
    return n * sum(1 for v in values if known is None or v not in known)


def steps_curve(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                steps_values: list[int], batch_size: int = 500, seed: int = 0, autocast: Autocast = _no_autocast,
                known: dict[int, float] | None = None, tick: Tick | None = None) -> list[dict[str, float]]:
    """PGD accuracy against the number of steps at the attack's eps and alpha (a converged attack flattens out).

    `known` maps step counts already measured with this very attack (same seed) to their accuracy; `tick(n)`
    follows each batch of n images.
    """
    out = []
    for steps in steps_values:
        if known is not None and steps in known:
            acc = known[steps]
        else:
            cfg = AttackConfig(eps=attack.eps, alpha=attack.alpha, steps=steps, random_start=attack.random_start)
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
            acc = pgd_accuracy(model, images, labels, cfg, batch_size, gen, autocast, tick=tick)
        out.append({"steps": steps, "accuracy": acc})
    return out
