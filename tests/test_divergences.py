"""f-divergence bounds (f-GAN form): table consistency, JS = log 2 - L_D, and the bound on known Gaussians."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.objectives import (DIVERGENCES, critic_loss, divergence_attack_term, f_divergence_attack_term,
                                 f_divergence_bound)
from robustcl.objectives.divergences import TABLE, gaussian_divergence, gaussian_log_pdf

P, Q = (0.5, 1.0), (0.0, 1.25)  # N(mu, sd): sd_q > sd_p keeps p/q bounded, so every divergence is finite


def test_js_bound_is_log2_minus_the_bce_critic_loss():
    g = torch.Generator().manual_seed(0)
    lb, la = 3 * torch.randn(64, generator=g), 3 * torch.randn(80, generator=g)
    bce = 0.5 * (F.binary_cross_entropy(torch.sigmoid(lb), torch.ones(64))
                 + F.binary_cross_entropy(torch.sigmoid(la), torch.zeros(80)))
    bound = f_divergence_bound("js", lb, la)
    assert bound.item() == pytest.approx(math.log(2) - bce.item(), abs=1e-5)
    assert bound.item() == pytest.approx(math.log(2) - critic_loss(lb, la).item(), abs=1e-6)
    chance = f_divergence_bound("js", torch.zeros(5), torch.zeros(7))  # D = 1/2 everywhere: no signal
    assert chance.item() == pytest.approx(0.0, abs=1e-7)


def test_js_attack_term_is_the_spec_term_plus_log2_with_the_same_gradient():
    la = torch.randn(32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ours = f_divergence_attack_term("js", la)
    spec = divergence_attack_term(la)  # mean log(1 - D(z_a))
    assert ours.item() == pytest.approx(spec.item() + math.log(2), abs=1e-6)
    (g_ours,) = torch.autograd.grad(ours, la)
    (g_spec,) = torch.autograd.grad(divergence_attack_term(la), la)
    assert torch.allclose(g_ours, g_spec, atol=1e-7)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_table_rows_are_consistent(name):
    row = TABLE[name]
    v = torch.linspace(-3, 3, 13, dtype=torch.float64)
    t = row.activation(v)
    assert torch.allclose(row.conjugate_of_activation(v), row.conjugate(t), atol=1e-10)
    # f* is the convex conjugate: f*(t) = sup_u t u - f(u), checked on a fine grid of u
    u = torch.logspace(-6, 6, 200_001, dtype=torch.float64)
    for t_k in t[3:10]:  # logits in [-1.5, 1.5]: the maximiser lies well inside the grid
        assert (t_k * u - row.f(u)).max().item() == pytest.approx(row.conjugate(t_k).item(), abs=1e-6)
    log_u = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert torch.allclose(row.activation(row.optimal_logit(log_u)), row.f_prime(log_u.exp()), atol=1e-10)
    one = torch.ones((), dtype=torch.float64)
    assert row.f(one).item() == pytest.approx(0.0, abs=1e-12)
    threshold = torch.tensor(row.threshold, dtype=torch.float64)
    assert row.activation(threshold).item() == pytest.approx(row.f_prime(one).item())


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gaussian_closed_forms_match_quadrature(name):
    x = torch.linspace(-15, 15, 300_001, dtype=torch.float64)
    log_p, log_q = gaussian_log_pdf(x, *P), gaussian_log_pdf(x, *Q)
    integrand = log_q.exp() * TABLE[name].f((log_p - log_q).exp())
    assert gaussian_divergence(name, *P, *Q) == pytest.approx(torch.trapezoid(integrand, x).item(), rel=1e-6)


def quantile_samples(mu: float, sd: float, n: int = 200_000) -> torch.Tensor:
    """n evenly spaced quantiles of N(mu, sd^2): averages over them are accurate expectations."""
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return mu + sd * torch.special.ndtri(levels)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_bound_is_below_the_divergence_and_tight_at_the_optimal_critic(name):
    true = gaussian_divergence(name, *P, *Q)
    xp, xq = quantile_samples(*P), quantile_samples(*Q)
    log_ratio = lambda x: gaussian_log_pdf(x, *P) - gaussian_log_pdf(x, *Q)  # noqa: E731
    optimal = lambda x: TABLE[name].optimal_logit(log_ratio(x))  # noqa: E731  T*(x) = f'(p(x)/q(x))
    tight = f_divergence_bound(name, optimal(xp), optimal(xq)).item()
    assert tight == pytest.approx(true, abs=2e-3, rel=5e-3)   # stated tolerance: 0.5% (quadrature of 2e5 quantiles)
    critics = [lambda x: 0.7 * optimal(x), lambda x: optimal(x) + 0.5 * torch.sin(3 * x),
               lambda x: torch.zeros_like(x), lambda x: 0.3 * x - 0.2]
    for critic in critics:
        assert f_divergence_bound(name, critic(xp), critic(xq)).item() <= true + 1e-4
        assert f_divergence_bound(name, critic(xp), critic(xq)).item() < tight


def test_unknown_divergence_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown divergence 'tv'"):
        f_divergence_bound("tv", torch.zeros(2), torch.zeros(2))
