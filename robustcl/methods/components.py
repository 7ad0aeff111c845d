"""Pieces several methods share: the paper's additions ("ours", docs/algorithm.md section 2) and the PGD-in-eval-mode helper
(or, in free mode, the carried perturbation and the replayed views).

The additions are a benign InfoNCE term with weight lambda_b, SAM/ASAM on named terms, and a critic D
that estimates an f-divergence between benign and adversarial features (JS by default, where it is
the BCE critic of docs/algorithm.md section 2). gbrcl has them on by default; advcl accepts them as optional config, so
"AdvCL + ours" is a preset, not another file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from robustcl.config import AttackConfig, ConfigError
from robustcl.methods.method import Method, MethodConfig
from robustcl.methods.sections import CriticConfig, SamConfig
from robustcl.methods.step import StepContext, Terms, phase
from robustcl.objectives import Divergence, f_divergence_attack_term, f_divergence_bound, fgsm_rs, pgd
from robustcl.objectives.divergences import f_critic_accuracy
from robustcl.views import strong_view, weak_view


@dataclass
class OursConfig(MethodConfig):
    """The paper's additions, all off by default: benign weight, SAM section, critic and its divergence."""
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


def ours_weights(cfg: OursConfig, main: dict[str, float]) -> dict[str, float]:
    """Loss weights: the method's own terms plus lambda_b for "benign" and lambda_D for "divergence"."""
    return {**main, "benign": cfg.benign_weight, "divergence": cfg.critic.weight}


def critic_attack_term(method: Method, z_adv: torch.Tensor) -> torch.Tensor | float:
    """lambda_D * the divergence's attack term on D(z_a(x')) when the critic is in the attack, else 0."""
    cfg: OursConfig = method.cfg  # type: ignore[assignment]
    if method.critic is None or not cfg.critic.in_attack:
        return 0.0
    return cfg.critic.weight * f_divergence_attack_term(cfg.divergence, method.critic(z_adv))


def critic_update(method: Method, x_benign: torch.Tensor, x_adv: torch.Tensor,
                  ctx: StepContext) -> dict[str, torch.Tensor]:
    """One optimiser step of D maximising the divergence bound on detached eval-mode z_b(x), z_a(x')."""
    cfg: OursConfig = method.cfg  # type: ignore[assignment]
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
    cfg: OursConfig = method.cfg  # type: ignore[assignment]
    assert method.critic is not None
    return f_divergence_bound(cfg.divergence, method.critic(z_benign), method.critic(z_adv))


def ours_step(method: Method, attack: Callable[[], torch.Tensor], x_benign: torch.Tensor,
              terms_fn: Callable[[torch.Tensor, tuple[str, ...] | None], Terms], main_weights: dict[str, float],
              ctx: StepContext) -> dict[str, torch.Tensor]:
    """The paper's step order around any method's attack and loss terms (docs/algorithm.md section 2).

    1. attack -> x'; 2. one critic step on (x_benign, x') if there is a critic (the 4-step order then
    attacks again); 3 + 4. the encoder step on terms_fn(x', only) with lambda_b / lambda_D weights and
    SAM on the configured terms.
    """
    cfg: OursConfig = method.cfg  # type: ignore[assignment]
    x_adv = attack()                                                       # 1. attack
    stats: dict[str, torch.Tensor] = {}
    if method.critic is not None:
        stats = critic_update(method, x_benign, x_adv, ctx)                # 2. critic step
        if cfg.critic.order == 4:
            x_adv = attack()                                               #    4-step: new x'
    terms = ctx.encoder_step(lambda only: terms_fn(x_adv, only), ours_weights(cfg, main_weights))  # 3 + 4
    return {**terms, **stats}


def fixed_embedding(method: Method, x: torch.Tensor, branch: str, ctx: StepContext) -> torch.Tensor:
    """g(f_branch(x)) in eval mode without gradients: an attack's fixed target.

    In free mode (`ctx.free`) no attack objective is ever evaluated, so no forward is spent on it:
    the target is a data-less meta tensor of the embedding's shape (any use of its values fails loudly).
    """
    if ctx.free is not None:
        return torch.empty((x.shape[0], method.projector.out_dim), device="meta")
    with method.evaluating(), torch.no_grad(), ctx.autocast():
        return method.embed(x, branch)  # type: ignore[arg-type]


def eval_pgd(method: Method, objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             attack: AttackConfig, ctx: StepContext) -> torch.Tensor:
    """PGD (or FGSM-RS) maximising `objective` (run under autocast) from x, eval mode, parameters frozen.

    Mode free attacks nothing here: it returns (x + delta_k).clamp(0, 1), this step's k-th carried
    perturbation (`robustcl.methods.free_replay.FreeReplay`), whose gradient the encoder step's own backward
    computes; `objective` is not evaluated. The same x twice in a step gives the same tensor.
    """
    if attack.mode == "free":
        assert ctx.free is not None, "method.attack.mode=free needs a StepContext built for that method"
        return ctx.free.perturb(x)

    def wrapped(x_adv: torch.Tensor) -> torch.Tensor:
        with ctx.autocast():
            return objective(x_adv)

    clip_start = not ctx.reference.unclipped_start  # reference: the authors' start, x + U(-eps, eps) unclipped
    with method.evaluating(), phase("attack"):
        if attack.mode == "fgsm-rs":
            return fgsm_rs(wrapped, x, attack.eps, None, ctx.generator, modules=[method], clip_start=clip_start)
        return pgd(wrapped, x, attack.eps, attack.alpha, attack.steps, attack.random_start, ctx.generator,
                   modules=[method], clip_start=clip_start)


def draw_view(kind: Literal["strong", "weak"], images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """The strong (SimCLR) or weak (pad-crop-flip) view of a uint8 batch, from the run's generator.

    In free mode the j-th view of a step is drawn on a batch's first replay and the same tensor is
    returned on the other replays (the generator is not advanced), so the carried perturbations keep
    attacking the same images.
    """
    def draw() -> torch.Tensor:
        with phase("views"):
            if kind == "strong":
                return ctx.prepare(strong_view(images, ctx.generator, ctx.strong))
            return ctx.prepare(weak_view(images, ctx.generator, ctx.weak))

    return draw() if ctx.free is None else ctx.free.view(draw)
