"""Sharpness of a loss: max over a SAM or ASAM ball of L(theta + e) - L(theta), by projected gradient ascent.

SAM ball: ||e||_2 <= rho. ASAM ball: ||T^-1 e||_2 <= rho with T = |theta| (elementwise, taken at the
unperturbed theta), as in `robustcl.objectives.SAM(adaptive=True)`. With the change of variables
e = T u the ASAM ball is the plain ball ||u|| <= rho, and dL/du = T * dL/de, so both are one loop:

    u_0 = 0;  u_{k+1} = Proj_{||u|| <= rho}(u_k + rho * T g_k / ||T g_k||),  g_k = grad L(theta + T u_k).

The first step is exactly the SAM/ASAM perturbation rho T^2 g / ||T g|| of the training step. Every
iterate is feasible, so the largest L(theta + e_k) - L(theta) seen is a lower bound on the true
maximum; for a convex L each step does not decrease L (projected gradient ascent on a convex set),
and for L(theta) = 1/2 theta^T A theta + b^T theta with A = aI the first step already attains the
maximum rho ||g|| + a rho^2 / 2. theta is restored exactly (from a saved copy) afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# loss_and_grad(need_grad) -> (L at the current parameters, dL/dparam per parameter or None when not needed)
LossAndGrad = Callable[[bool], tuple[float, list[torch.Tensor] | None]]


@dataclass(frozen=True)
class SharpnessResult:
    """Ascent of one radius: the SAM-step increase, the largest increase seen, every step's increase."""
    rho: float
    sam_step: float
    max: float
    steps: tuple[float, ...]
    perturbation_norm: float  # ||T^-1 e|| of the best iterate (<= rho)

    def as_dict(self) -> dict[str, float | list[float]]:
        """JSON-ready form."""
        return {"rho": self.rho, "sam_step": self.sam_step, "max": self.max, "steps": list(self.steps),
                "perturbation_norm": self.perturbation_norm}


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of a list of tensors, accumulated in float64."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors]))


def ball_sharpness(loss_and_grad: LossAndGrad, params: Sequence[torch.nn.Parameter], rho: float, steps: int,
                   adaptive: bool, base: tuple[float, list[torch.Tensor]] | None = None) -> SharpnessResult:
    """Max of L(theta + e) - L(theta) over the SAM (adaptive=False) or ASAM ball of radius rho, K ascent steps.

    `base` is (L(theta), grad L(theta)) when the caller already has it (shared across radii).
    """
    if rho <= 0 or steps < 1:
        raise ValueError(f"sharpness needs rho > 0 and steps >= 1, got rho={rho}, steps={steps}")
    params = list(params)
    base_value, grad = base if base is not None else loss_and_grad(True)
    assert grad is not None
    saved = [p.detach().clone() for p in params]
    scale = [s.abs() if adaptive else torch.ones_like(s) for s in saved]
    u = [torch.zeros_like(s) for s in saved]
    increases: list[float] = []
    best, best_norm = -float("inf"), 0.0
    try:
        for k in range(steps):
            direction = [t * g for t, g in zip(scale, grad)]
            norm = _norm(direction)
            if norm == 0:  # flat (or frozen) at this iterate: no ascent direction
                break
            u = [ui + (rho / norm).to(ui.dtype) * d for ui, d in zip(u, direction)]
            u_norm = _norm(u)
            if u_norm > rho:
                u = [ui * (rho / u_norm).to(ui.dtype) for ui in u]
            with torch.no_grad():
                for p, s, t, ui in zip(params, saved, scale, u):
                    p.copy_(s + t * ui)
            value, grad = loss_and_grad(k < steps - 1)
            increases.append(value - base_value)
            if increases[-1] > best:
                best, best_norm = increases[-1], float(_norm(u))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    if not increases:
        return SharpnessResult(rho, 0.0, 0.0, (), 0.0)
    return SharpnessResult(rho, increases[0], best, tuple(increases), best_norm)


def sharpness_per_rho(loss_and_grad: LossAndGrad, params: Sequence[torch.nn.Parameter], rhos: Sequence[float],
                      steps: int, adaptive: bool) -> tuple[float, list[SharpnessResult]]:
    """L(theta) and one `ball_sharpness` per radius, sharing the gradient at theta."""
    base = loss_and_grad(True)
    assert base[1] is not None
    return base[0], [ball_sharpness(loss_and_grad, params, rho, steps, adaptive, (base[0], base[1])) for rho in rhos]
