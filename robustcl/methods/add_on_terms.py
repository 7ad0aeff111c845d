"""The seed paper's add-on terms (arXiv 2311.09671, docs/algorithm.md section 2), composable onto any method's
loss: a benign InfoNCE term with weight lambda_b, SAM/ASAM on named terms, and a critic D that estimates
an f-divergence between benign and adversarial features (JS by default, where it is the BCE critic of
docs/algorithm.md section 2), as a "divergence" term with weight lambda_D.

`AddOnTermsConfig` holds their settings (all off by default); a method's config extends it instead of
`MethodConfig` to accept them. `step_with_add_on_terms` is the paper's step order around any method's
attack and loss terms (attack, critic update, encoder step with the add-on weights);
`critic_attack_term`, `critic_update` and `divergence_term` are the critic's three parts. gbrcl has
them on by default; advcl, ainfonce and dynacl accept them as optional config, so "AdvCL + ours" is a
preset, not another file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from robustcl.config import ConfigError
from robustcl.methods.method import Method, MethodConfig
from robustcl.methods.sections import CriticConfig, SamConfig
from robustcl.methods.step import StepContext, Terms, phase
from robustcl.objectives import Divergence, f_divergence_attack_term, f_divergence_bound
from robustcl.objectives.divergences import f_critic_accuracy


@dataclass
class AddOnTermsConfig(MethodConfig):
    """The paper's add-on terms, all off by default: benign weight, SAM section, critic and its divergence."""
    benign_weight: float = 0.0          # lambda_b: weight of the benign InfoNCE term NCE(z_b(p), z_b(q)) (0: off)
    sam: SamConfig = field(default_factory=SamConfig)
    critic: CriticConfig = field(default_factory=lambda: CriticConfig(enabled=False))
    divergence: Divergence = "js"      # the f-divergence the critic bounds between benign and adversarial features

    def validate(self) -> None:
        super().validate()
        if self.benign_weight < 0:
            raise ConfigError(f"config value method.benign_weight={self.benign_weight!r} must be >= 0")
        if self.sam.mode != "off" and self.benign_weight == 0 and set(self.sam.terms) <= {"benign"}:
            raise ConfigError("config value method.sam.terms=['benign'] names a term that method.benign_weight=0 "
                              "removes; set method.sam.mode=off or name other terms")


def add_on_weights(cfg: AddOnTermsConfig, main: dict[str, float]) -> dict[str, float]:
    """Loss weights: the method's own terms plus lambda_b for "benign" and lambda_D for "divergence"."""
    return {**main, "benign": cfg.benign_weight, "divergence": cfg.critic.weight}


def critic_attack_term(method: Method, z_adv: torch.Tensor) -> torch.Tensor | float:
    """lambda_D * the divergence's attack term on D(z_a(x')) when the critic is in the attack, else 0."""
    cfg: AddOnTermsConfig = method.cfg  # type: ignore[assignment]
    if method.critic is None or not cfg.critic.in_attack:
        return 0.0
    return cfg.critic.weight * f_divergence_attack_term(cfg.divergence, method.critic(z_adv))


def critic_update(method: Method, x_benign: torch.Tensor, x_adv: torch.Tensor,
                  ctx: StepContext) -> dict[str, torch.Tensor]:
    """One optimiser step of D maximising the divergence bound on detached eval-mode z_b(x), z_a(x')."""
    cfg: AddOnTermsConfig = method.cfg  # type: ignore[assignment]
    assert method.critic is not None
    with phase("critic"):
        with method.evaluating(), torch.no_grad(), ctx.autocast():
            z_b, z_a = method.embed(x_benign, "benign"), method.embed(x_adv, "adversarial")
        logits_b, logits_a = method.critic(z_b.float()), method.critic(z_a.float())
        loss = -f_divergence_bound(cfg.divergence, logits_b, logits_a)  # js: L_D - log 2
        ctx.critic_step(loss)
    return {"critic_loss": loss.detach(),
            "critic_acc": f_critic_accuracy(cfg.divergence, logits_b, logits_a).detach()}


def divergence_term(method: Method, z_benign: torch.Tensor, z_adv: torch.Tensor) -> torch.Tensor:
    """The encoder's "divergence" term: the critic's bound on D_f(benign || adversarial) (js: log 2 - L_D)."""
    cfg: AddOnTermsConfig = method.cfg  # type: ignore[assignment]
    assert method.critic is not None
    return f_divergence_bound(cfg.divergence, method.critic(z_benign), method.critic(z_adv))


def step_with_add_on_terms(method: Method, attack: Callable[[], torch.Tensor], x_benign: torch.Tensor,
                           terms_fn: Callable[[torch.Tensor, tuple[str, ...] | None], Terms],
                           main_weights: dict[str, float], ctx: StepContext) -> dict[str, torch.Tensor]:
    """The paper's step order around any method's attack and loss terms (docs/algorithm.md section 2).

    1. attack -> x'; 2. one critic step on (x_benign, x') if there is a critic (the 4-step order then
    attacks again); 3 + 4. the encoder step on terms_fn(x', only) with lambda_b / lambda_D weights and
    SAM on the configured terms.
    """
    cfg: AddOnTermsConfig = method.cfg  # type: ignore[assignment]
    x_adv = attack()                                                       # 1. attack
    stats: dict[str, torch.Tensor] = {}
    if method.critic is not None:
        stats = critic_update(method, x_benign, x_adv, ctx)                # 2. critic step
        if cfg.critic.order == 4:
            x_adv = attack()                                               #    4-step: new x'
    terms = ctx.encoder_step(lambda only: terms_fn(x_adv, only), add_on_weights(cfg, main_weights))  # 3 + 4
    return {**terms, **stats}


__all__ = ["AddOnTermsConfig", "add_on_weights", "critic_attack_term", "critic_update", "divergence_term",
           "step_with_add_on_terms"]
