"""Integrity checks pass on an honest model and each fails on a model built to fool an evaluation."""
from __future__ import annotations

import torch
from torch import nn

from robustcl.config import AttackConfig
from robustcl.evaluation import accuracy, pgd_accuracy, robustness_curve
from robustcl.evaluation.integrity import (check_batch_independence, check_eps_zero, check_large_eps, check_monotone,
                                           run_integrity_checks)

ATTACK = AttackConfig(eps=0.1, alpha=0.025, steps=10)


def one_hot_images(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """10-pixel images: 0.8 at the class pixel, 0.2 elsewhere; the identity map classifies them."""
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))
    x = torch.full((n, 1, 1, 10), 0.2)
    x[torch.arange(n), 0, 0, y] = 0.8
    return x, y


class Identity(nn.Module):
    """Honest: logits are the pixels (a 0.3 margin each way, so eps 0.5 flips every image)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1)


class Rounding(Identity):
    """Masked: rounds its input, so the gradient is zero and PGD only takes its random start."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.round(x.flatten(1) * 4) / 4


class BatchCentred(Identity):
    """Depends on the other images of the batch (like BN left in train mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.scale * (flat - flat.mean(0, keepdim=True) + 0.01 * flat.mean())


class Flaky(Identity):
    """Not deterministic: every other call predicts a shifted class."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Flaky.calls += 1
        out = self.scale * x.flatten(1)
        return out.roll(1, dims=1) if Flaky.calls % 2 else out


def _full_checks(model: nn.Module) -> dict:
    x, y = one_hot_images()
    model.eval()
    clean = accuracy(model, x, y)
    robust = pgd_accuracy(model, x, y, ATTACK, generator=torch.Generator().manual_seed(0))
    curve = robustness_curve(model, x, y, ATTACK, [0.0, 0.05, 0.1, 0.2], known={0.0: clean, 0.1: robust})
    return run_integrity_checks(model, x, y, ATTACK, clean, robust, curve, num_classes=10)


def test_honest_model_passes_every_check():
    result = _full_checks(Identity())
    assert result["passed"], result
    assert len(result["checks"]) == 5


def test_rounding_model_fails_the_large_eps_check():
    result = _full_checks(Rounding())
    assert "large-eps-to-chance" in result["failed"]
    x, y = one_hot_images()
    assert not check_large_eps(Rounding().eval(), x, y, ATTACK, 10, 500, 0, _null).passed
    assert check_large_eps(Identity().eval(), x, y, ATTACK, 10, 500, 0, _null).passed


def _null():
    import contextlib
    return contextlib.nullcontext()


def test_batch_dependent_or_train_mode_model_fails_the_batch_check():
    x, _ = one_hot_images()
    assert not check_batch_independence(BatchCentred().eval(), x, _null).passed
    assert not check_batch_independence(Identity().train(), x, _null).passed
    assert check_batch_independence(Identity().eval(), x, _null).passed


def test_non_deterministic_model_fails_eps_zero():
    x, y = one_hot_images()
    model = Flaky().eval()
    clean = accuracy(model, x, y, batch_size=500)
    assert not check_eps_zero(model, x, y, clean, ATTACK, 500, _null).passed
    honest = Identity().eval()
    assert check_eps_zero(honest, x, y, accuracy(honest, x, y), ATTACK, 500, _null).passed


def test_monotonicity_allows_noise_but_not_a_rise():
    assert check_monotone([(0, 0.9), (0.05, 0.6), (0.1, 0.605), (0.2, 0.1)], "eps", 1000).passed
    failed = check_monotone([(0, 0.9), (0.05, 0.4), (0.1, 0.6)], "eps", 1000)
    assert not failed.passed and "rises from 0.400 at eps 0.05 to 0.600 at 0.1" in failed.detail
    assert not check_monotone([(0, 0.9), (5, 0.3), (20, 0.5)], "steps", 500).passed
