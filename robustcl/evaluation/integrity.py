"""Checks that catch evaluations which can fool you (gradient masking, train-mode BN, weak attacks).

Run with every evaluation; a failed check marks the result as suspect in results.json and the
report. Tolerances allow sampling noise: an attack with random starts can differ by a few images.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from robustcl.config import AttackConfig
from robustcl.evaluation.robust import Autocast, _no_autocast, ce_objective, pgd_accuracy
from robustcl.objectives import pgd
from robustcl.runs.progress import SILENT, Progress, Tick

LARGE_EPS = 0.5  # half the pixel range: any honest classifier should fall to chance or below


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0  # what the check cost (its attacks included): reported so a slow evaluation can be read


def timed_check(run: Callable[[], Check]) -> Check:
    """Run one check and record its wall time in it."""
    t0 = time.perf_counter()
    check = run()
    check.seconds = time.perf_counter() - t0
    return check


def part_check(parts: Progress, name: str, total: int, run: Callable[[Tick], Check]) -> Check:
    """One check as a progress part ("check <name>", `total` images; `run` gets the part's tick), timed."""
    with parts.part(f"check {name}", total) as part:
        return timed_check(lambda: run(part.update))


def noise_tolerance(n: int) -> float:
    """Allowed slack between two attack runs on n images: 2 images or 1%, whichever is larger."""
    return max(2.0 / max(n, 1), 0.01)


def check_eps_zero(model: nn.Module, images, labels, clean: float, attack: AttackConfig, batch_size: int,
                   autocast: Autocast, tick: Tick | None = None) -> Check:
    """PGD with eps = 0 must reproduce clean accuracy exactly (a deterministic model in eval mode)."""
    zero = AttackConfig(eps=0.0, alpha=attack.alpha, steps=attack.steps, random_start=attack.random_start)
    acc = pgd_accuracy(model, images, labels, zero, batch_size, autocast=autocast, tick=tick)
    return Check("eps-zero-equals-clean", acc == clean, f"PGD at eps 0: {acc:.4f}, clean: {clean:.4f}")


def check_monotone(values: list[tuple[float, float]], what: str, n: int) -> Check:
    """Accuracy must not rise (beyond noise) as eps or attack strength grows; values are (x, acc)."""
    tol = noise_tolerance(n)
    rises = [(a, b) for (a, b) in zip(values, values[1:]) if b[1] > a[1] + tol]
    detail = ", ".join(f"{x:g}: {acc:.3f}" for x, acc in values)
    if rises:
        (x0, a0), (x1, a1) = rises[0]
        detail = f"accuracy rises from {a0:.3f} at {what} {x0:g} to {a1:.3f} at {x1:g} (tolerance {tol:.3f}); {detail}"
    return Check(f"non-increasing-in-{what}", not rises, detail)


def check_large_eps(model, images, labels, attack: AttackConfig, num_classes: int, batch_size: int,
                    seed: int, autocast: Autocast, tick: Tick | None = None) -> Check:
    """At eps = 0.5 an honest classifier falls to chance or below; more means masked gradients."""
    big = AttackConfig(eps=LARGE_EPS, alpha=LARGE_EPS * attack.alpha / attack.eps, steps=attack.steps,
                       random_start=True)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    acc = pgd_accuracy(model, images, labels, big, batch_size, gen, autocast, tick=tick)
    limit = 1.0 / num_classes + noise_tolerance(len(images)) + 0.05
    return Check("large-eps-to-chance", acc <= limit,
                 f"PGD-{attack.steps} at eps {LARGE_EPS}: {acc:.3f} (chance {1 / num_classes:.3f}, limit {limit:.3f})")


BATCH_CHECK_IMAGES = 8  # check_batch_independence's k: it reads 2k images, then their first k again


@torch.no_grad()
def check_batch_independence(model: nn.Module, images, autocast: Autocast, k: int = BATCH_CHECK_IMAGES) -> Check:
    """Eval mode, and each image's logits do not depend on the other images in its batch."""
    if model.training:
        return Check("eval-mode-batch-independent", False, "the model is in train mode")
    device = next(model.parameters()).device
    x = images[: max(2 * k, 2)].to(device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    with autocast():
        together = model(x)[:k].float()
        alone = model(x[:k]).float()
    diff = (together - alone).abs().max().item()
    ok = diff <= 1e-3 * max(1.0, together.abs().max().item())
    return Check("eval-mode-batch-independent", ok, f"max logit change when batch-mates change: {diff:.2e}")


def check_autoattack_below_pgd(autoattack: float, pgd: float, n: int, steps: int) -> Check:
    """AutoAttack is the stronger attack: its accuracy must not exceed PGD's beyond sampling noise."""
    tol = noise_tolerance(n)
    return Check("autoattack-at-most-pgd", autoattack <= pgd + tol,
                 f"AutoAttack {autoattack:.3f} vs PGD-{steps} {pgd:.3f} (tolerance {tol:.3f})")


def check_square_vs_whitebox(after: dict[str, float], n: int) -> Check:
    """Square (black-box) must not break many points that the white-box attacks left standing (masking)."""
    white = [after[k] for k in ("apgd-ce", "apgd-t", "fab-t") if k in after]
    if "square" not in after or not white:
        return Check("square-not-beating-white-box", True, "AutoAttack stopped before Square (no robust points left)")
    gain, tol = min(white) - after["square"], noise_tolerance(n)
    return Check("square-not-beating-white-box", gain <= tol,
                 f"Square lowered accuracy after the white-box attacks by {gain:.3f} (tolerance {tol:.3f})")


SQUARE_QUERIES = 1000
SQUARE_MAX_IMAGES = 200


def square_survivors(model: nn.Module, images, labels, attack: AttackConfig, batch_size: int, seed: int,
                     autocast: Autocast) -> Check:
    """Square (official code, 1000 queries) on up to 200 images that survive the white-box attacks: it
    should break almost none.

    Run with every evaluation that has no AutoAttack. The white-box attacks are PGD on the
    cross-entropy and PGD on the CW margin (same budget): Square uses a margin loss, so against
    cross-entropy PGD alone it would flag a merely weak loss rather than masked gradients. A
    black-box attack succeeding where both gradient attacks failed is the signature of masking.
    """
    from robustcl.evaluation.autoattack import square_attack
    from robustcl.evaluation.robust import cw_margin_objective

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    x = images[:SQUARE_MAX_IMAGES].to(device)
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    y = labels[:SQUARE_MAX_IMAGES].to(device)
    alive = torch.ones_like(y, dtype=torch.bool)
    for objective in (ce_objective, cw_margin_objective):
        idx = alive.nonzero().squeeze(1)
        x_adv = pgd(objective(model, y[idx], autocast), x[idx], attack.eps, attack.alpha, attack.steps,
                    attack.random_start, gen, modules=[model])
        with torch.no_grad(), autocast():
            alive[idx] = model(x_adv).argmax(1) == y[idx]
    what = f"PGD-{attack.steps} (cross-entropy and CW margin)"
    if not alive.any():
        return Check("square-not-beating-white-box", True, f"no image of {len(y)} survives {what}")
    x_sq = square_attack(model, x[alive], y[alive], attack.eps, SQUARE_QUERIES, seed)
    with torch.no_grad(), autocast():
        broken = int((model(x_sq).argmax(1) != y[alive]).sum())
    rate, tol = broken / len(y), noise_tolerance(len(y))
    return Check("square-not-beating-white-box", rate <= tol,
                 f"Square-{SQUARE_QUERIES} broke {broken} of the {int(alive.sum())} images that survived "
                 f"{what} (of {len(y)}; {rate:.3f} vs tolerance {tol:.3f})")


def run_integrity_checks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: AttackConfig,
                         clean: float, robust: float, curve: list[dict[str, float]], num_classes: int,
                         batch_size: int = 500, seed: int = 0,
                         autocast: Autocast = _no_autocast, parts: Progress = SILENT) -> dict[str, Any]:
    """All checks for one evaluated model, each a part of `parts`; returns {'passed', 'failed', 'checks'} for
    results.json."""
    n = len(images)
    weak = AttackConfig(eps=attack.eps, alpha=attack.alpha, steps=max(1, attack.steps // 4),
                        random_start=attack.random_start)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def monotone_in_steps(tick: Tick) -> Check:
        weak_acc = pgd_accuracy(model, images, labels, weak, batch_size, gen, autocast, tick=tick)
        return check_monotone([(0, clean), (weak.steps, weak_acc), (attack.steps, robust)], "steps", n)

    checks = [part_check(parts, name, total, run) for name, total, run in (
        ("eval-mode-batch-independent", min(n, 2 * BATCH_CHECK_IMAGES),
         lambda tick: check_batch_independence(model, images, autocast)),
        ("eps-zero-equals-clean", n, lambda tick: check_eps_zero(model, images, labels, clean, attack, batch_size,
                                                                   autocast, tick)),
        ("non-increasing-in-eps", 0, lambda tick: check_monotone([(c["eps"], c["accuracy"]) for c in curve], "eps", n)),
        ("non-increasing-in-steps", n, monotone_in_steps),
        ("large-eps-to-chance", n, lambda tick: check_large_eps(model, images, labels, attack, num_classes, batch_size,
                                                                seed, autocast, tick)),
    )]
    failed = [c.name for c in checks if not c.passed]
    return {"passed": not failed, "failed": failed, "checks": [asdict(c) for c in checks]}


__all__ = ["SQUARE_MAX_IMAGES", "Check", "check_autoattack_below_pgd", "check_square_vs_whitebox", "part_check",
           "run_integrity_checks", "square_survivors", "timed_check"]
