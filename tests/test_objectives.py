"""InfoNCE, PGD/FGSM-RS, the critic's losses and SAM/ASAM against their definitions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustcl.objectives import SAM, critic_loss, divergence_attack_term, fgsm_rs, frozen_parameters, info_nce, pgd


def nt_xent_reference(u: torch.Tensor, v: torch.Tensor, tau: float) -> torch.Tensor:
    """Row-by-row NT-Xent: -log exp(s_i,pos/tau) / sum_{k != i} exp(s_ik/tau), averaged over 2N rows."""
    z = F.normalize(torch.cat([u, v]).double(), dim=1)
    n = u.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[k]) / tau for k in range(2 * n) if k != i]
        total += -(torch.dot(z[i], z[pos]) / tau - torch.logsumexp(torch.stack(sims), 0))
    return total / (2 * n)


def test_info_nce_matches_row_by_row_definition():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert info_nce(u, v, 0.5).item() == pytest.approx(nt_xent_reference(u, v, 0.5).item(), rel=1e-5)
    assert info_nce(u, v, 0.2).item() == pytest.approx(nt_xent_reference(u, v, 0.2).item(), rel=1e-5)


def test_info_nce_hand_computed_two_pairs():
    # Orthonormal pairs u1=v1=e1, u2=v2=e2: each row sees its twin at sim 1 and two others at sim 0.
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -(2.0 - math.log(math.exp(2.0) + 2.0))  # tau = 0.5
    assert info_nce(u, u.clone(), 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert info_nce(u, v).item() == pytest.approx(info_nce(v, u).item(), rel=1e-6)
    assert info_nce(3 * u, v).item() == pytest.approx(info_nce(u, v).item(), rel=1e-6)


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        info_nce(torch.randn(4, 3), torch.randn(5, 3))


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * self.w).sum(1)


def test_pgd_reaches_closed_form_maximum_of_linear_objective():
    # max_{|d|<=eps, x+d in [0,1]} w.(x+d) is attained at clip(x + eps*sign(w), 0, 1).
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 1, 3, 3, generator=g)
    model = Linear(torch.randn(9, generator=g))
    eps = 0.1
    x_adv = pgd(lambda z: model(z).sum(), x, eps, alpha=0.04, steps=10, generator=g, modules=[model])
    expected = (x + eps * model.w.detach().sign().view(1, 1, 3, 3)).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_pgd_never_leaves_eps_ball_or_image_box():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, 4, 4, generator=g)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    y = torch.randint(0, 5, (16,), generator=g)
    obj = lambda z: F.cross_entropy(net(z), y, reduction="sum")  # noqa: E731
    for eps in (0.0, 0.03, 0.3):
        x_adv = pgd(obj, x, eps, alpha=0.1, steps=5, generator=g, modules=[net])
        assert (x_adv - x).abs().max() <= eps + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_pgd_computes_no_parameter_gradients_and_restores_flags():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    net[1].bias.requires_grad_(False)  # a deliberately frozen parameter must stay frozen
    seen = []

    def obj(z):
        seen.append([p.requires_grad for p in net.parameters()])
        return net(z).sum()

    pgd(obj, torch.rand(2, 3, 2, 2), 0.1, 0.05, 3, modules=[net])
    assert all(not any(flags) for flags in seen)
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == [True, False]


def test_frozen_parameters_restores_on_error():
    net = nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with frozen_parameters(net):
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in net.parameters())


def test_fgsm_rs_is_one_step_of_1_25_eps_from_random_start():
    x = torch.full((1, 1, 1, 4), 0.5)
    model = Linear(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = fgsm_rs(lambda z: model(z).sum(), x, eps=0.1, generator=g1, modules=[model])
    start = (x + (2 * torch.rand(x.shape, generator=g2) - 1) * 0.1)
    expected = torch.min(torch.max(start + 0.125 * model.w.detach().sign().view_as(x), x - 0.1), x + 0.1)
    assert torch.allclose(out, expected, atol=1e-7)


def test_pgd_rejects_negative_eps():
    with pytest.raises(ValueError, match="eps"):
        pgd(lambda z: z.sum(), torch.rand(1, 1, 2, 2), -0.1, 0.1, 1)


def test_critic_loss_equals_bce_form():
    lb, la = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([-0.4, 0.8])
    expected = 0.5 * (F.binary_cross_entropy(torch.sigmoid(lb), torch.ones(3))
                      + F.binary_cross_entropy(torch.sigmoid(la), torch.zeros(2)))
    assert critic_loss(lb, la).item() == pytest.approx(expected.item(), rel=1e-6)
    assert divergence_attack_term(la).item() == pytest.approx(torch.log(1 - torch.sigmoid(la)).mean().item(), rel=1e-6)


def test_optimal_critic_loss_gives_jensen_shannon():
    # Discrete p_b, p_a on 3 points as equally weighted samples; D* = p_b / (p_b + p_a).
    # At the optimum L_D = log 2 - JS(p_b || p_a).
    pb, pa = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    m = 0.5 * (pb + pa)
    js = 0.5 * (pb * (pb / m).log()).sum() + 0.5 * (pa * (pa / m).log()).sum()
    logit = (pb / pa).log()  # logit of D*
    xb = torch.repeat_interleave(torch.arange(3), (pb * 10).round().long())
    xa = torch.repeat_interleave(torch.arange(3), (pa * 10).round().long())
    assert critic_loss(logit[xb], logit[xa]).item() == pytest.approx(math.log(2) - js.item(), rel=1e-6)


def test_sam_and_asam_perturbation_formula():
    p = [nn.Parameter(torch.tensor([2.0, -1.0])), nn.Parameter(torch.tensor([0.5]))]
    g = [torch.tensor([0.3, 0.4]), torch.tensor([-1.2])]
    flat_g, flat_p = torch.cat(g), torch.cat([q.detach() for q in p])
    e_sam = torch.cat(SAM(p, rho=0.5).perturbation(g))
    assert torch.allclose(e_sam, 0.5 * flat_g / flat_g.norm())
    e_asam = torch.cat(SAM(p, rho=0.5, adaptive=True).perturbation(g))
    assert torch.allclose(e_asam, 0.5 * flat_p ** 2 * flat_g / (flat_p.abs() * flat_g).norm())
    assert (e_asam / flat_p.abs()).norm().item() == pytest.approx(0.5, rel=1e-6)  # on the ||e/T|| = rho sphere


def test_sam_ascend_descend_restores_exactly():
    p = [nn.Parameter(torch.randn(5))]
    before = p[0].detach().clone()
    sam = SAM(p, rho=0.1, adaptive=True)
    sam.ascend([torch.randn(5)])
    assert not torch.equal(p[0].detach(), before)
    sam.descend()
    assert torch.equal(p[0].detach(), before)
    with pytest.raises(RuntimeError):
        sam.descend()
