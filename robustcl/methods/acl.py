"""ACL, dual stream (Jiang et al., "Robust Pre-Training by Adversarial Contrastive Learning", NeurIPS 2020,
arXiv 2010.13337): a clean and an adversarial SimCLR pair, each through its own BN branch.

Both views p, q are strong. Attack: (p', q') = PGD on both views jointly, maximising
NCE(z_a(p'), z_a(q')). Loss: 1/2 [NCE(z_b(p), z_b(q)) + NCE(z_a(p'), z_a(q'))].
Branches: p, q through the benign BN branch; p', q' through the adversarial one.

`air` (objectives/air.py, off by default) adds the term "air" = lambda1 SIR + lambda2 AIR of Xu et al.
(NeurIPS 2023, arXiv 2305.00374) on z_b(p), z_b(q), z_b(x) (x the un-augmented image, its own forward)
and z_a(p'), z_a(q'): "ACL-IR" / "ACL-AIR" of the RobustSSL benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robustcl.config import AttackConfig
from robustcl.methods.method import Method, MethodConfig
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd
from robustcl.objectives import info_nce
from robustcl.objectives.air import AirConfig, invariant_regularization
from robustcl.views import to_unit


@dataclass
class AclConfig(MethodConfig):
    name: str = "acl"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    air: AirConfig = field(default_factory=AirConfig)


class Acl(Method):
    """Dual-stream ACL: benign pair and jointly attacked pair, averaged."""

    name = "acl"
    config_class = AclConfig
    cfg: AclConfig

    def attack(self, p: torch.Tensor, q: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """PGD on the stacked pair [p; q] maximising NCE(z_a(p'), z_a(q')) (eval mode, parameters frozen)."""
        def objective(x: torch.Tensor) -> torch.Tensor:
            z_p, z_q = self.embed(x, "adversarial").chunk(2)
            return info_nce(z_p, z_q, self.cfg.temperature)

        p_adv, q_adv = eval_pgd(self, objective, torch.cat([p, q]), self.cfg.attack, ctx).chunk(2)
        return p_adv, q_adv

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, p_adv: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None, x_orig: torch.Tensor | None = None) -> Terms:
        """"benign" = NCE(z_b(p), z_b(q)), "adversarial" = NCE(z_a(p'), z_a(q')); each weighted 1/2.

        "air" (with `x_orig`, the un-augmented images, when `air` is active) = IR on the same embeddings plus
        z_b(x_orig) from a forward of its own, so the other terms are computed exactly as without it.
        """
        want = lambda name: only is None or name in only  # noqa: E731
        terms, tau = {}, self.cfg.temperature
        need_air = want("air") and self.cfg.air.active() and x_orig is not None
        if want("benign") or need_air:
            z_b = self.embed(torch.cat([p, q]), "benign").chunk(2)
            if want("benign"):
                terms["benign"] = info_nce(*z_b, tau)
        if want("adversarial") or need_air:
            z_a = self.embed(torch.cat([p_adv, q_adv]), "adversarial").chunk(2)
            if want("adversarial"):
                terms["adversarial"] = info_nce(*z_a, tau)
        if need_air:
            terms["air"] = invariant_regularization(*z_b, self.embed(x_orig, "benign"), *z_a, tau, self.cfg.air)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        p_adv, q_adv = self.attack(p, q, ctx)
        x_orig = ctx.prepare(to_unit(images)) if self.cfg.air.active() else None
        return ctx.encoder_step(lambda only: self.loss_terms(p, q, p_adv, q_adv, only, x_orig),
                                {"benign": 0.5, "adversarial": 0.5, "air": 1.0})
