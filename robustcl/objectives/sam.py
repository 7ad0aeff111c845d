"""SAM / ASAM perturbation that can be applied to a chosen subset of loss terms.

Foret et al. (SAM) and Kwon et al. (ASAM): with T = |theta| (ASAM) or T = 1 (SAM),
    e = rho * T^2 * g / ||T * g||,
where g is the gradient of the sharpness-aware terms at theta. The caller evaluates those terms'
gradient at theta + e, adds the other terms' gradient taken at theta, undoes e, and lets the base
optimiser step. `ascend` / `descend` keep that sequence explicit in the training step.
"""
from __future__ import annotations

from typing import Sequence

import torch


class SAM:
    """Holds rho, the adaptive switch, and the current perturbation e (one per parameter)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], rho: float, adaptive: bool = False,
                 eps: float = 1e-12) -> None:
        if rho <= 0:
            raise ValueError(f"SAM rho must be > 0, got {rho}")
        self.params = list(params)
        self.rho = rho
        self.adaptive = adaptive
        self.eps = eps
        self._saved: list[torch.Tensor] | None = None

    @torch.no_grad()
    def perturbation(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """e = rho * T^2 g / ||T g|| for the given gradients (None counts as zero), in fp32 norms."""
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        scaled = [(p.abs() * g if self.adaptive else g) for p, g in zip(self.params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
        scale = self.rho / (norm + self.eps)
        return [((p.abs() if self.adaptive else 1.0) * s * scale).to(p.dtype) for p, s in zip(self.params, scaled)]

    @torch.no_grad()
    def ascend(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Move theta to theta + e computed from `grads`."""
        if self._saved is not None:
            raise RuntimeError("SAM.ascend called twice without descend")
        self._saved = [p.detach().clone() for p in self.params]
        torch._foreach_add_(self.params, self.perturbation(grads))

    @torch.no_grad()
    def descend(self) -> None:
        """Restore theta exactly (a saved copy, not theta + e - e); accumulated .grad stays."""
        if self._saved is None:
            raise RuntimeError("SAM.descend called before ascend")
        torch._foreach_copy_(self.params, self._saved)
        self._saved = None
