"""The learning-rate schedule and the evaluation helpers on models with known answers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustcl.config import AttackConfig
from robustcl.evaluation import accuracy, pgd_accuracy, robustness_curve
from robustcl.splits import train_val_indices
from robustcl.train.pretrain import learning_rate


def test_learning_rate_warms_up_linearly_then_follows_cosine_to_the_floor():
    assert learning_rate(0, 100, 10, 0.5, 0.0) == pytest.approx(0.05)
    assert learning_rate(9, 100, 10, 0.5, 0.0) == pytest.approx(0.5)
    assert learning_rate(10, 100, 10, 0.5, 0.0) == pytest.approx(0.5)
    assert learning_rate(55, 100, 10, 0.5, 0.0) == pytest.approx(0.25)
    assert learning_rate(100, 100, 10, 0.5, 1e-3) == pytest.approx(1e-3)


def test_train_val_split_is_disjoint_complete_and_seeded():
    tr, va = train_val_indices(100, 20, 0)
    assert len(va) == 20 and len(tr) == 80
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    assert torch.equal(va, train_val_indices(100, 20, 0)[1])
    assert not torch.equal(va, train_val_indices(100, 20, 1)[1])


class Threshold(nn.Module):
    """Logits (x - 0.5, 0.5 - x) on a single pixel: class 0 iff x > 0.5; margin |x - 0.5|."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)[:, 0] - 0.5
        return torch.stack([v, -v], dim=1) * self.scale


def test_pgd_accuracy_equals_the_closed_form_robust_accuracy():
    # Pixel values 0.5 +- d: a point is robust at eps iff its margin d exceeds eps.
    d = torch.tensor([0.02, 0.06, 0.11, 0.2, 0.3])
    x = torch.cat([0.5 + d, 0.5 - d]).view(-1, 1, 1, 1)
    y = torch.cat([torch.zeros(5), torch.ones(5)]).long()
    model = Threshold().eval()
    assert accuracy(model, x, y) == 1.0
    for eps, expected in ((0.05, 0.8), (0.1, 0.6), (0.25, 0.2)):
        acc = pgd_accuracy(model, x, y, AttackConfig(eps, eps / 4, 20))
        assert acc == pytest.approx(expected)
    curve = robustness_curve(model, x, y, AttackConfig(0.1, 0.025, 20), [0.0, 0.05, 0.1, 0.25])
    assert [c["accuracy"] for c in curve] == pytest.approx([1.0, 0.8, 0.6, 0.2])


def test_evaluation_refuses_a_model_in_train_mode():
    with pytest.raises(RuntimeError, match="eval mode"):
        accuracy(Threshold().train(), torch.rand(2, 1, 1, 1), torch.zeros(2).long())
