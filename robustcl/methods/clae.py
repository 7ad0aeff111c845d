"""CLAE (Ho & Vasconcelos, "Contrastive Learning with Adversarial Examples", NeurIPS 2020, arXiv 2010.12050).

Attack: q' = PGD on q maximising NCE(z_b(q), z_a(q')) against the fixed target z_b(q).
Loss: NCE(z_b(p), z_b(q)) + adversarial_weight * NCE(z_b(q), z_a(q')), adversarial_weight = 1.
Branches: p, q through the benign BN branch, q' through the adversarial one. Both views are strong
by default as in CLAE (attack_view: weak makes q the weak view of docs/algorithm.md section 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from robustcl.config import AttackConfig, ConfigError
from robustcl.methods.method import Method, MethodConfig
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd, fixed_embedding
from robustcl.objectives import info_nce


@dataclass
class ClaeConfig(MethodConfig):
    name: str = "clae"
    attack: AttackConfig = field(default_factory=AttackConfig)
    attack_view: Literal["strong", "weak"] = "strong"  # the augmentation of q, the attacked view
    adversarial_weight: float = 1.0      # weight of the adversarial pair term NCE(z_b(q), z_a(q'))

    def validate(self) -> None:
        super().validate()
        if self.adversarial_weight < 0:
            raise ConfigError(f"config value method.adversarial_weight={self.adversarial_weight!r} must be >= 0")


class Clae(Method):
    """CLAE: the SimCLR pair plus a pair of q and its own adversarial example."""

    name = "clae"
    config_class = ClaeConfig
    cfg: ClaeConfig

    def attack_view(self) -> Literal["weak", "strong"]:
        """The augmentation of q, the attacked view (method.attack_view)."""
        return self.cfg.attack_view

    def attack(self, q: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """PGD on q maximising NCE(z_b(q), z_a(q')) (eval mode, parameters frozen)."""
        target = fixed_embedding(self, q, "benign", ctx)
        return eval_pgd(self, lambda x: info_nce(target, self.embed(x, "adversarial"), self.cfg.temperature),
                        q, self.cfg.attack, ctx)

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None) -> Terms:
        """"benign" = NCE(z_b(p), z_b(q)); "adversarial" = NCE(z_b(q), z_a(q')) (no SAM: `only` unused)."""
        z_p, z_q = self.embed(torch.cat([p, q]), "benign").chunk(2)
        tau = self.cfg.temperature
        return {"benign": info_nce(z_p, z_q, tau), "adversarial": info_nce(z_q, self.embed(q_adv, "adversarial"), tau)}

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p = draw_view("strong", images, ctx)
        q = draw_view(self.cfg.attack_view, images, ctx)
        q_adv = self.attack(q, ctx)
        return ctx.encoder_step(lambda only: self.loss_terms(p, q, q_adv, only),
                                {"benign": 1.0, "adversarial": self.cfg.adversarial_weight})
