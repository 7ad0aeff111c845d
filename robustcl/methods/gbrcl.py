"""The paper's method (arXiv 2311.09671, SPEC section 2): adversarial + benign InfoNCE, SAM on the
benign term, and a critic D that closes the divergence between benign and adversarial features.

One step, as in the paper:
  1. attack:  q' = PGD(q) maximising NCE(z_b(p), z_a(q')) + lambda_D * log(1 - D(z_a(q')))
  2. critic:  one step of D on L_D = 1/2 [BCE(D(z_b(q)), 1) + BCE(D(z_a(q')), 0)]
  3. encoder: minimise lambda_b NCE(z_b(p), z_b(q)) + NCE(z_b(p), z_a(q')) - lambda_D L_D
  4. with SAM/ASAM on the benign term (its gradient taken at theta + e).
The 4-step order regenerates q' after the critic step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from robustcl.config import AttackConfig, ConfigError
from robustcl.methods.base import Method, MethodConfig, SamConfig, StepContext, Terms
from robustcl.objectives import critic_loss, divergence_attack_term, info_nce, pgd
from robustcl.objectives.critic import critic_accuracy
from robustcl.views import strong_view, weak_view


@dataclass
class CriticConfig:
    """The critic D: on/off, weight lambda_D, its SGD optimiser, in the attack or not, step order."""
    enabled: bool = True
    weight: float = 0.1
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    in_attack: bool = True
    order: Literal[3, 4] = 3

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config value method.critic.weight={self.weight!r} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"config value method.critic.lr={self.lr!r} must be > 0")


@dataclass
class GbrclConfig(MethodConfig):
    name: str = "gbrcl"
    benign_weight: float = 2.0
    attack: AttackConfig = field(default_factory=AttackConfig)
    sam: SamConfig = field(default_factory=lambda: SamConfig("asam", 1.0, ("benign",)))
    critic: CriticConfig = field(default_factory=CriticConfig)

    def validate(self) -> None:
        super().validate()
        if self.benign_weight < 0:
            raise ConfigError(f"config value method.benign_weight={self.benign_weight!r} must be >= 0")
        self.attack.validate("method.attack")


class Gbrcl(Method):
    """Adversarial contrastive learning with benign InfoNCE, SAM and a divergence critic."""

    name = "gbrcl"
    config_class = GbrclConfig
    cfg: GbrclConfig

    @classmethod
    def wants_critic(cls, cfg: GbrclConfig) -> bool:  # type: ignore[override]
        return cfg.critic.enabled and cfg.critic.weight > 0

    def attack(self, p: torch.Tensor, q: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Step 1: PGD on q in eval mode, parameters frozen, against the fixed target z_b(p)."""
        a, c = self.cfg.attack, self.cfg.critic
        use_critic = self.critic is not None and c.in_attack
        with self.evaluating(), torch.no_grad(), ctx.autocast():
            target = self.embed(p, "benign")

        def objective(x: torch.Tensor) -> torch.Tensor:
            with ctx.autocast():
                z = self.embed(x, "adversarial")
                value = info_nce(target, z, self.cfg.temperature)
                if use_critic:
                    value = value + c.weight * divergence_attack_term(self.critic(z))
            return value

        with self.evaluating():
            return pgd(objective, q, a.eps, a.alpha, a.steps, a.random_start, ctx.generator, modules=[self])

    def critic_update(self, q: torch.Tensor, q_adv: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Step 2: one optimiser step of D on detached eval-mode features of q and q'."""
        with self.evaluating(), torch.no_grad(), ctx.autocast():
            z_b, z_a = self.embed(q, "benign"), self.embed(q_adv, "adversarial")
        logits_b, logits_a = self.critic(z_b.float()), self.critic(z_a.float())
        loss = critic_loss(logits_b, logits_a)
        ctx.critic_step(loss)
        return {"critic_loss": loss.detach(), "critic_acc": critic_accuracy(logits_b, logits_a).detach()}

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None) -> Terms:
        """Step 3's named terms: benign NCE, adversarial NCE, and -L_D (the divergence term)."""
        want = lambda name: only is None or name in only  # noqa: E731
        tau, terms = self.cfg.temperature, {}
        need_benign = want("benign") and self.cfg.benign_weight > 0
        if need_benign:  # one benign-branch forward for p and q (BN statistics over both views)
            z_p, z_q = self.embed(torch.cat([p, q]), "benign").chunk(2)
        elif want("adversarial"):
            z_p = self.embed(p, "benign")
        if need_benign:
            terms["benign"] = info_nce(z_p, z_q, tau)
        if want("adversarial") or want("divergence"):
            z_adv = self.embed(q_adv, "adversarial")
            if want("adversarial"):
                terms["adversarial"] = info_nce(z_p, z_adv, tau)
            if want("divergence") and self.critic is not None:
                if not need_benign:
                    z_q = self.embed(q, "benign")
                terms["divergence"] = -critic_loss(self.critic(z_q), self.critic(z_adv))
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        p = ctx.prepare(strong_view(images, ctx.generator, ctx.strong))
        q = ctx.prepare(weak_view(images, ctx.generator, ctx.weak))
        q_adv = self.attack(p, q, ctx)                                   # 1. attack
        stats: dict[str, torch.Tensor] = {}
        if self.critic is not None:
            stats = self.critic_update(q, q_adv, ctx)                    # 2. critic step
            if self.cfg.critic.order == 4:
                q_adv = self.attack(p, q, ctx)                           #    4-step: new q'
        weights = {"benign": self.cfg.benign_weight, "adversarial": 1.0,
                   "divergence": self.cfg.critic.weight}
        terms = ctx.encoder_step(lambda only: self.loss_terms(p, q, q_adv, only), weights)  # 3 + 4. SAM
        return {**terms, **stats}
