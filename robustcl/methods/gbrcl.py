"""The paper's method (arXiv 2311.09671, docs/algorithm.md section 2): adversarial + benign InfoNCE, SAM on the
benign term, and a critic D that closes the divergence between benign and adversarial features.

One step, as in the paper:
  1. attack:  q' = PGD(q) maximising NCE(z_b(p), z_a(q')) + lambda_D * log(1 - D(z_a(q')))
  2. critic:  one step of D on L_D = 1/2 [BCE(D(z_b(q)), 1) + BCE(D(z_a(q')), 0)]
  3. encoder: minimise lambda_b NCE(z_b(p), z_b(q)) + NCE(z_b(p), z_a(q')) - lambda_D L_D
  4. with SAM/ASAM on the benign term (its gradient taken at theta + e).
The 4-step order regenerates q' after the critic step. Branches: p and q through the benign BN
branch, q' through the adversarial one.

Switches for the ablations: `divergence` (js | kl | reverse_kl | pearson | hellinger) replaces the
BCE terms by the f-GAN bound of that divergence (objectives/divergences.py; js is the BCE form:
the critic minimises L_D - log 2, the encoder's "divergence" term is log 2 - L_D, the attack term
log 2 + log(1 - D)); `attack_view` (weak | strong) picks the augmentation of q, the attacked view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from robustcl.config import AttackConfig
from robustcl.methods.add_on_terms import (AddOnTermsConfig, critic_attack_term, divergence_term,
                                           step_with_add_on_terms)
from robustcl.methods.method import Method
from robustcl.methods.sections import CriticConfig, SamConfig
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd, fixed_embedding
from robustcl.objectives import info_nce

__all__ = ["Gbrcl", "GbrclConfig"]


@dataclass
class GbrclConfig(AddOnTermsConfig):
    name: str = "gbrcl"
    benign_weight: float = 2.0
    sam: SamConfig = field(default_factory=lambda: SamConfig("asam", 1.0, ("benign",)))
    critic: CriticConfig = field(default_factory=CriticConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    attack_view: Literal["weak", "strong"] = "weak"  # the augmentation of q, the attacked view


class Gbrcl(Method):
    """Adversarial contrastive learning with benign InfoNCE, SAM and a divergence critic."""

    name = "gbrcl"
    config_class = GbrclConfig
    cfg: GbrclConfig

    def attack_view(self) -> Literal["weak", "strong"]:
        """The augmentation of q, the attacked view (method.attack_view)."""
        return self.cfg.attack_view

    def attack(self, p: torch.Tensor, q: torch.Tensor, ctx: StepContext,
               target: torch.Tensor | None = None) -> torch.Tensor:
        """Step 1: PGD on q in eval mode, parameters frozen, against the fixed target z_b(p).

        `target` is z_b(p) in eval mode when the caller already has it (the 4-step order attacks twice).
        """
        if target is None:
            target = fixed_embedding(self, p, "benign", ctx)

        def objective(x: torch.Tensor) -> torch.Tensor:
            z = self.embed(x, "adversarial")
            return info_nce(target, z, self.cfg.temperature) + critic_attack_term(self, z)

        return eval_pgd(self, objective, q, self.cfg.attack, ctx)

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None) -> Terms:
        """Step 3's named terms: benign NCE, adversarial NCE, and the divergence bound (js: log 2 - L_D).

        p and q always go through the benign branch together, whichever terms are wanted or weighted:
        every term then sees the same BN batch statistics (and running-statistic update) whether
        lambda_b is 0 or not, so each ablation rung changes one thing (and the adversarial-only rung
        is the authors' adv-only step, which forwards [p; q] too). SAM's pass at theta + e
        (`only=("benign",)`) recomputes the benign term over the same [p; q], as the authors' SAM
        does, with BN running statistics frozen by the caller.
        """
        want = lambda name: only is None or name in only  # noqa: E731
        tau, terms = self.cfg.temperature, {}
        need_benign = want("benign") and self.cfg.benign_weight > 0
        need_divergence = want("divergence") and self.critic is not None
        z_p, z_q = self.embed(torch.cat([p, q]), "benign").chunk(2)
        if need_benign:
            terms["benign"] = info_nce(z_p, z_q, tau)
        if want("adversarial") or need_divergence:
            z_adv = self.embed(q_adv, "adversarial")
            if want("adversarial"):
                terms["adversarial"] = info_nce(z_p, z_adv, tau)
            if need_divergence:
                terms["divergence"] = divergence_term(self, z_q, z_adv)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p = draw_view("strong", images, ctx)
        q = draw_view(self.cfg.attack_view, images, ctx)
        target = fixed_embedding(self, p, "benign", ctx)  # z_b(p): computed once, attacked against twice in 4-step
        return step_with_add_on_terms(self, lambda: self.attack(p, q, ctx, target), q,  # 1. attack, 2. critic (q, q')
                                      lambda q_adv, only: self.loss_terms(p, q, q_adv, only),  # 3. terms, 4. SAM
                                      {"adversarial": 1.0}, ctx)
