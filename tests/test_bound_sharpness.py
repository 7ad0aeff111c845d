"""Sharpness by projected gradient ascent against the exact maximum of a quadratic over the SAM and ASAM balls."""
from __future__ import annotations

import math

import pytest
import torch

from robustcl.bound.sharpness import ball_sharpness, sharpness_per_rho
from robustcl.objectives import SAM


def quadratic(a: torch.Tensor, b: torch.Tensor, theta: torch.nn.Parameter):
    """loss_and_grad of L(theta) = 1/2 theta^T A theta + b^T theta (float64, exact gradient)."""
    def loss_and_grad(need_grad: bool):
        th = theta.detach()
        value = 0.5 * th @ a @ th + b @ th
        grad = [a @ th + b] if need_grad else None
        return value.item(), grad
    return loss_and_grad


def trust_region_max(g: torch.Tensor, a: torch.Tensor, rho: float) -> float:
    """max_{||u|| <= rho} g^T u + 1/2 u^T A u for PSD A: u = (lam I - A)^-1 g with lam > lam_max, ||u|| = rho."""
    evals, evecs = torch.linalg.eigh(a)
    c = evecs.T @ g

    def norm(lam: float) -> float:
        return float(torch.linalg.vector_norm(c / (lam - evals)))

    lo = float(evals.max()) + 1e-12
    hi = lo + float(torch.linalg.vector_norm(g)) / rho + 1.0
    for _ in range(200):  # ||u(lam)|| decreases in lam: bisection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    u = evecs @ (c / (0.5 * (lo + hi) - evals))
    return float(g @ u + 0.5 * u @ a @ u)


def random_psd(n: int, seed: int) -> torch.Tensor:
    m = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return m @ m.T / n


def test_isotropic_quadratic_sam_ball_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    a_scalar = 0.7
    loss = quadratic(a_scalar * torch.eye(6, dtype=torch.float64), b, theta)
    g = (a_scalar * theta + b).detach()
    before = theta.detach().clone()
    for rho in (0.05, 0.3, 1.0):
        r = ball_sharpness(loss, [theta], rho, steps=4, adaptive=False)
        exact = rho * float(g.norm()) + a_scalar * rho ** 2 / 2
        assert r.sam_step == pytest.approx(exact, rel=1e-12)  # the SAM step is already the maximiser
        assert r.max == pytest.approx(exact, rel=1e-12)
        assert r.perturbation_norm == pytest.approx(rho, rel=1e-12)
    assert torch.equal(theta.detach(), before)  # theta restored exactly


@pytest.mark.parametrize("rho", [0.05, 0.2])
def test_general_psd_quadratic_sam_ball_matches_the_trust_region_maximum(rho):
    gen = torch.Generator().manual_seed(1)
    a = random_psd(8, 2)
    theta = torch.nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    g = (a @ theta + b).detach()
    exact = trust_region_max(g, a, rho)
    r = ball_sharpness(quadratic(a, b, theta), [theta], rho, steps=30, adaptive=False)
    assert r.max == pytest.approx(exact, rel=1e-6)
    assert r.sam_step < exact  # the first (SAM) step alone is not the maximiser when A is not isotropic
    assert all(v <= exact + 1e-12 for v in r.steps)  # every iterate is inside the ball
    assert all(b2 >= b1 - 1e-15 for b1, b2 in zip(r.steps, r.steps[1:]))  # convex L: ascent never decreases


def test_asam_ball_is_the_trust_region_in_scaled_coordinates_and_starts_with_the_training_step():
    gen = torch.Generator().manual_seed(3)
    a = random_psd(8, 4)
    theta = torch.nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    t = theta.detach().abs()
    g = (a @ theta + b).detach()
    rho = 0.1
    # ||e / T|| <= rho with e = T u: max_u (T g)^T u + 1/2 u^T (T A T) u over ||u|| <= rho
    exact = trust_region_max(t * g, t[:, None] * a * t[None, :], rho)
    r = ball_sharpness(quadratic(a, b, theta), [theta], rho, steps=40, adaptive=True)
    assert r.max == pytest.approx(exact, rel=1e-6)
    # the first iterate is SAM(adaptive=True)'s perturbation rho T^2 g / ||T g||, as in training
    # (SAM takes the norm in fp32, hence 1e-6 rather than machine precision)
    e = SAM([theta], rho, adaptive=True, eps=0.0).perturbation([g])[0]
    first = float(g @ e + 0.5 * e @ a @ e)
    assert r.sam_step == pytest.approx(first, rel=1e-6)
    assert r.sam_step == pytest.approx(rho * float((t * g).norm()) + 0.5 * float(e @ a @ e), rel=1e-6)
    sam_ball = ball_sharpness(quadratic(a, b, theta), [theta], rho, steps=40, adaptive=False)
    assert not math.isclose(sam_ball.max, r.max, rel_tol=1e-3)  # the two balls differ


def test_zero_gradient_and_bad_arguments():
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    flat = quadratic(torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), theta)
    r = ball_sharpness(flat, [theta], 0.5, steps=3, adaptive=False)
    assert (r.max, r.steps) == (0.0, ())
    with pytest.raises(ValueError, match="rho > 0"):
        ball_sharpness(flat, [theta], 0.0, steps=3, adaptive=False)


def test_sharpness_per_rho_shares_the_base_gradient_and_grows_with_rho():
    gen = torch.Generator().manual_seed(5)
    a = random_psd(5, 6)
    theta = torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    base, results = sharpness_per_rho(quadratic(a, b, theta), [theta], [0.01, 0.1, 0.5], 10, adaptive=False)
    th = theta.detach()
    assert base == pytest.approx(float(0.5 * th @ a @ th + b @ th), rel=1e-15)
    assert [r.rho for r in results] == [0.01, 0.1, 0.5]
    assert results[0].max < results[1].max < results[2].max
