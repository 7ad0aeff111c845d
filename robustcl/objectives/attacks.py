"""L-inf PGD / FGSM-RS on any differentiable objective, with the model's parameters frozen.

`objective` maps a perturbed batch to a scalar to *maximise*; the same function serves training
(contrastive objectives) and evaluation (cross-entropy, CW margin). While attacking, every
parameter of the given modules has `requires_grad=False`, so autograd computes no parameter
gradient and stores nothing for one.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

Objective = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def frozen_parameters(*modules: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad=False on every parameter of `modules` (restored on exit)."""
    params = [p for m in modules for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip to the L-inf ball of radius eps around x and to the image box [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _check_budget(name: str, eps: float, alpha: float, steps: int) -> None:
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"{name} needs eps, alpha, steps >= 0, got eps={eps}, alpha={alpha}, steps={steps}")


def _ascend(objective: Objective, x_adv: torch.Tensor, steps: int,
            update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], modules: Iterable[nn.Module]) -> torch.Tensor:
    """`steps` times x' <- update(x', grad objective(x')), with the parameters of `modules` frozen."""
    with frozen_parameters(*modules), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
            x_adv = update(x_adv.detach(), grad)
    return x_adv


def pgd(objective: Objective, x: torch.Tensor, eps: float, alpha: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None,
        modules: Iterable[nn.Module] = (), clip_start: bool = True) -> torch.Tensor:
    """Projected gradient ascent in L-inf: x' <- Proj(x' + alpha * sign(grad objective(x'))).

    Starts from x + U(-eps, eps) when `random_start`, clipped to [0, 1] unless `clip_start` is False
    (the authors' PGD: the first gradient is then taken at a start that may leave the image box; every
    step's projection clips). Parameters of `modules` are frozen while attacking. With steps >= 1 the
    result is a detached tensor inside the eps-ball and [0, 1].
    """
    _check_budget("pgd", eps, alpha, steps)
    x = x.detach()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = x + (2 * noise - 1) * eps
        if clip_start:
            x_adv = x_adv.clamp_(0.0, 1.0)
    else:
        x_adv = x.clone()
    if eps == 0 or steps == 0:
        return x_adv
    return _ascend(objective, x_adv, steps, lambda z, g: _project(z + alpha * g.sign(), x, eps), modules)


def fgsm_rs(objective: Objective, x: torch.Tensor, eps: float, alpha: float | None = None,
            generator: torch.Generator | None = None, modules: Iterable[nn.Module] = (),
            clip_start: bool = True) -> torch.Tensor:
    """FGSM with random start (Wong et al. 2020): one PGD step of size alpha (default 1.25 eps)."""
    return pgd(objective, x, eps, 1.25 * eps if alpha is None else alpha, 1, True, generator, modules, clip_start)


def _l2_normalise(v: torch.Tensor) -> torch.Tensor:
    """Each sample of v scaled to unit L2 norm (zero stays zero)."""
    norms = v.flatten(1).norm(dim=1).clamp_min(1e-12)
    return v / norms.view(-1, *([1] * (v.dim() - 1)))


def _project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip each sample's perturbation to the L2 ball of radius eps, then to the image box [0, 1]."""
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta * factor).clamp_(0.0, 1.0)


def pgd_l2(objective: Objective, x: torch.Tensor, eps: float, alpha: float, steps: int,
           random_start: bool = True, generator: torch.Generator | None = None,
           modules: Iterable[nn.Module] = ()) -> torch.Tensor:
    """L2 PGD: x' <- Proj_{||x'-x||_2 <= eps}(x' + alpha * g / ||g||_2), parameters of `modules` frozen.

    The random start is uniform in direction with a radius drawn uniformly in [0, eps].
    """
    _check_budget("pgd_l2", eps, alpha, steps)
    x = x.detach()
    x_adv = x.clone()
    if random_start and eps > 0:
        direction = _l2_normalise(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype) * eps
        x_adv = (x + direction * radius.view(-1, *([1] * (x.dim() - 1)))).clamp_(0.0, 1.0)
    if eps == 0 or steps == 0:
        return x_adv
    return _ascend(objective, x_adv, steps, lambda z, g: _project_l2(z + alpha * _l2_normalise(g), x, eps), modules)
