"""On a linear classifier the worst-case perturbation has a closed form; the attacks must reach it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustcl.config import AttackConfig
from robustcl.evaluation import accuracy, pgd_accuracy
from robustcl.evaluation.robust import accuracy_under, ce_objective, cw_margin_objective
from robustcl.objectives import pgd, pgd_l2

W, B = torch.tensor([1.0, -2.0]), 0.3


class Linear2D(nn.Module):
    """Two-class logits (w.x + b, 0) on 2-pixel images."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(W.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.w + B
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def data(n: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points inside [0.3, 0.7]^2 (so eps <= 0.2 never meets the box), labelled by the classifier."""
    x = 0.3 + 0.4 * torch.rand(n, 2, generator=torch.Generator().manual_seed(0))
    margin = x @ W + B
    keep = margin.abs() > 1e-3
    x, margin = x[keep], margin[keep]
    y = (margin <= 0).long()
    return x.view(-1, 1, 1, 2), y, margin.abs()


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1])
def test_linf_pgd_reaches_the_exact_robust_accuracy(eps):
    x, y, margin = data()
    exact = (margin > eps * W.abs().sum()).float().mean().item()  # L-inf: dual norm is L1
    model = Linear2D().eval()
    assert accuracy(model, x, y) == 1.0
    assert pgd_accuracy(model, x, y, AttackConfig(eps, eps / 4, 20)) == pytest.approx(exact)

    def cw(xb, yb):
        return pgd(cw_margin_objective(model, yb), xb, eps, eps / 4, 20, modules=[model])

    assert accuracy_under(model, x, y, cw) == pytest.approx(exact)


@pytest.mark.parametrize("eps", [0.02, 0.05, 0.1])
def test_l2_pgd_reaches_the_exact_robust_accuracy(eps):
    x, y, margin = data()
    exact = (margin > eps * W.norm()).float().mean().item()  # L2: dual norm is L2
    model = Linear2D().eval()

    def l2(xb, yb):
        return pgd_l2(ce_objective(model, yb), xb, eps, eps / 4, 20, modules=[model])

    assert accuracy_under(model, x, y, l2) == pytest.approx(exact)


def test_l2_pgd_stays_in_the_ball_and_box():
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    y = torch.randint(0, 3, (16,))
    x_adv = pgd_l2(ce_objective(net, y), x, 0.5, 0.2, 10, modules=[net])
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_cw_margin_is_positive_exactly_on_misclassified_points():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.1, 0.3, -1.0]])
    model = nn.Identity()
    obj = cw_margin_objective(model, torch.tensor([0, 0]))
    assert obj(logits).item() == pytest.approx((1.0 - 2.0) + (0.3 - 0.1))
