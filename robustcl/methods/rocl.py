"""RoCL (Kim et al., "Adversarial Self-Supervised Contrastive Learning", NeurIPS 2020, arXiv 2006.07589).

Attack: q' = PGD on q maximising NCE(z_b(p), z_a(q')) against the fixed target z_b(p).
Loss: three-positive NT-Xent over {z_b(p), z_b(q), z_a(q')} (each row's positives: the other two
views of its image) + regularizer_weight * NCE(z_b(p), z_a(q')), regularizer_weight = 1/256.
Branches: p, q through the benign BN branch, q' through the adversarial one. Both views are strong
by default as in RoCL (attack_view: weak makes q the weak view of docs/algorithm.md section 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from robustcl.config import AttackConfig, ConfigError
from robustcl.methods.method import Method, MethodConfig
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd, fixed_embedding
from robustcl.objectives import info_nce, multi_positive_nce


@dataclass
class RoclConfig(MethodConfig):
    name: str = "rocl"
    attack: AttackConfig = field(default_factory=AttackConfig)
    attack_view: Literal["strong", "weak"] = "strong"  # the augmentation of q, the attacked view
    regularizer_weight: float = 1 / 256  # weight of the pair regulariser NCE(z_b(p), z_a(q'))

    def validate(self) -> None:
        super().validate()
        if self.regularizer_weight < 0:
            raise ConfigError(f"config value method.regularizer_weight={self.regularizer_weight!r} must be >= 0")


class Rocl(Method):
    """RoCL: instance-wise attack on q, three-positive contrastive loss plus a small pair regulariser."""

    name = "rocl"
    config_class = RoclConfig
    cfg: RoclConfig

    def attack_view(self) -> Literal["weak", "strong"]:
        """The augmentation of q, the attacked view (method.attack_view)."""
        return self.cfg.attack_view

    def attack(self, p: torch.Tensor, q: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """PGD on q maximising NCE(z_b(p), z_a(q')) (eval mode, parameters frozen)."""
        target = fixed_embedding(self, p, "benign", ctx)
        return eval_pgd(self, lambda x: info_nce(target, self.embed(x, "adversarial"), self.cfg.temperature),
                        q, self.cfg.attack, ctx)

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None) -> Terms:
        """"contrastive" = 3-positive NT-Xent over {p, q, q'}; "regularizer" = NCE(z_b(p), z_a(q')).

        RoCL has no SAM, so `only` is unused.
        """
        z_p, z_q = self.embed(torch.cat([p, q]), "benign").chunk(2)
        z_adv = self.embed(q_adv, "adversarial")
        tau = self.cfg.temperature
        return {"contrastive": multi_positive_nce([z_p, z_q, z_adv], tau), "regularizer": info_nce(z_p, z_adv, tau)}

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p = draw_view("strong", images, ctx)
        q = draw_view(self.cfg.attack_view, images, ctx)
        q_adv = self.attack(p, q, ctx)
        return ctx.encoder_step(lambda only: self.loss_terms(p, q, q_adv, only),
                                {"contrastive": 1.0, "regularizer": self.cfg.regularizer_weight})
