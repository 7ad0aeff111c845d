"""ACL, dual stream (Jiang et al., "Robust Pre-Training by Adversarial Contrastive Learning", NeurIPS 2020,
arXiv 2010.13337): a clean and an adversarial SimCLR pair, each through its own BN branch.

Both views p, q are strong. Attack: (p', q') = PGD on both views jointly, maximising
NCE(z_a(p'), z_a(q')). Loss: 1/2 [NCE(z_b(p), z_b(q)) + NCE(z_a(p'), z_a(q'))].
Branches: p, q through the benign BN branch; p', q' through the adversarial one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robustcl.config import AttackConfig
from robustcl.methods.base import Method, MethodConfig, StepContext, Terms
from robustcl.methods.components import draw_view, eval_pgd
from robustcl.objectives import info_nce


@dataclass
class AclConfig(MethodConfig):
    name: str = "acl"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))


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
                   only: tuple[str, ...] | None = None) -> Terms:
        """"benign" = NCE(z_b(p), z_b(q)), "adversarial" = NCE(z_a(p'), z_a(q')); each weighted 1/2."""
        terms, tau = {}, self.cfg.temperature
        if only is None or "benign" in only:
            terms["benign"] = info_nce(*self.embed(torch.cat([p, q]), "benign").chunk(2), tau)
        if only is None or "adversarial" in only:
            terms["adversarial"] = info_nce(*self.embed(torch.cat([p_adv, q_adv]), "adversarial").chunk(2), tau)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        p_adv, q_adv = self.attack(p, q, ctx)
        return ctx.encoder_step(lambda only: self.loss_terms(p, q, p_adv, q_adv, only),
                                {"benign": 0.5, "adversarial": 0.5})
