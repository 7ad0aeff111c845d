"""DynACL and DynACL++ (Luo, Wang & Wang, "Rethinking the Effect of Data Augmentation in Adversarial Contrastive
Learning", ICLR 2023, arXiv 2303.01289; code PKU-ML/DYNACL).

DynACL is dual-stream ACL (acl.py) under two schedules of the epoch e (0-based, T epochs, period K):
- augmentation strength s(e) = 1 - floor(e / K) * K / T (K = 50, T = 1000 in the authors' code), applied to
  the strong view (`strong_view_at`): colour-jitter strengths, jitter probability, grayscale probability
  and blur probability times s, crop scale (1 - (1 - c) s, c_max) with (c, c_max) the full-strength range
  ((0.1, 1) in the authors' code); flip and aspect ratios unchanged. Set on ctx.strong in `on_epoch_start`.
- loss L = (1 - w)/2 NCE(z_b(p), z_b(q)) + (1 + w)/2 NCE(z_a(p'), z_a(q')), w(e) = lambda (1 - s(e)),
  lambda = 2/3 (`dynamic_weights`): from ACL's equal halves towards the adversarial term.
Attack, as ACL: (p', q') = PGD-5 (eps 8/255, alpha 2/255) on both strong views jointly, maximising
NCE(z_a(p'), z_a(q')). Branches: p, q through the benign BN branch; p', q' through the adversarial one.

"DynACL + ours" (add_on_terms.AddOnTermsConfig, all off by default, composed as advcl composes it): "benign" =
benign_weight * NCE(z_b(p), z_b(q)) (the NCE of DynACL's own "natural" term, computed once, so SAM on
"benign" sharpens only the added part), and a critic D between z_b([p; q]) and z_a([p'; q']).

`air` (objectives/air.py, off by default) adds the term "air" = lambda1 SIR + lambda2 AIR of Xu et al. (NeurIPS
2023, arXiv 2305.00374) on z_b(p), z_b(q), z_b(x) (x the un-augmented image, its own forward), z_a(p'),
z_a(q'): DynACL-AIR (its ++ with the LP-AFF below: DynACL-AIR++), as the authors add IR to DynACL (AIR.py).

DynACL++ (LP-AFF, phase-2 code: robustcl/train/lp_aff.py, which robustcl's finetune runs before its protocols
when finetune.postprocess.name is lp-aff): pseudo-labels = k-means (k = 10, `kmeans`) of the benign-branch
features of the phase-2 training images; a linear head probed on them with the encoder frozen (10 epochs,
lr 0.01), then encoder and head adversarially fine-tuned on them with TRADES (25 epochs, lr 0.1, x0.1 at
epochs 10 and 20) through the reported branch. Every protocol (SLF, ALF, AFF) then starts from that encoder.

Where robustcl differs from the authors' code:
- PKU-ML/DYNACL's train_DynACL.py sends the second view of each pair through a no-gradient momentum copy of
  the encoder (EMA 0.99, `resnet18_momentum(swap=True)`) and exports that copy; robustcl trains one dual-BN
  encoder, as the RobustSSL benchmark's DynACL re-implementations do (RCS's DynACL.py, AIR's --DynAug).
- There w uses the 1-based epoch // K, so it steps one epoch before s does at each stage boundary; robustcl
  uses w = lambda (1 - s(e)) of the same epoch, as those re-implementations do.
- LARS (lr 5.0, weight decay 1e-6) and a 3-layer BN projection head there; robustcl's SGD and 2-layer head.
- Their view has no blur (the presets set views.strong.blur_p 0); a view with blur anneals its probability
  like the other colour operations (our generalisation).
- A `period` below one epoch (CPU-sized presets) is followed step by step through `on_step_end`: exact,
  except on the first step of a fit resumed inside an epoch, which runs at the strength of the epoch's start
  (no hook runs before a step; one is requested from the method API).
- LP-AFF: k-means on robustcl's unit-norm features with k-means++ seeding (kmeans_pytorch: random seeding,
  raw features); a head of k outputs (the authors': the dataset's class count); TRADES from x + 0.001 N(0, 1)
  (robustcl's trades_attack; the authors' starts at x); the phase-2 training split only (not its
  validation images).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from robustcl.config import AttackConfig, ConfigError
from robustcl.methods.add_on_terms import (AddOnTermsConfig, critic_attack_term, divergence_term,
                                           step_with_add_on_terms)
from robustcl.methods.method import Method
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd
from robustcl.objectives import info_nce
from robustcl.objectives.air import AirConfig, invariant_regularization
from robustcl.views import StrongViewConfig, to_unit

__all__ = ["Dynacl", "DynaclConfig", "augmentation_strength", "dynamic_weights", "strong_view_at"]

_FLOOR_TOLERANCE = 1e-9  # floor(e / K) of float epochs: 0.15 / 0.05 is 2.9999999999999996 in binary


# ------------------------------------------------------------------------------ the two schedules
def augmentation_strength(epoch: float, total_epochs: float, period: float) -> float:
    """s = 1 - floor(epoch / period) * period / total_epochs, at least 0: strong (1) to weak in steps."""
    if total_epochs <= 0 or period <= 0 or epoch < 0:
        raise ValueError(f"need epoch >= 0, total_epochs > 0, period > 0; got {epoch}, {total_epochs}, {period}")
    stage = math.floor(epoch / period + _FLOOR_TOLERANCE)
    return max(0.0, 1.0 - stage * period / total_epochs)


def dynamic_weights(epoch: float, total_epochs: float, period: float, lam: float) -> dict[str, float]:
    """The loss weights at `epoch`: natural (1 - w)/2 and adversarial (1 + w)/2, w = lam (1 - s(epoch))."""
    w = lam * (1.0 - augmentation_strength(epoch, total_epochs, period))
    return {"natural": (1.0 - w) / 2, "adversarial": (1.0 + w) / 2}


def strong_view_at(strength: float, full: StrongViewConfig) -> StrongViewConfig:
    """The strong view at `strength` s: jitter, its probability, grayscale and blur probabilities x s; crop scale
    from c + (1 - c)(1 - s) = 1 - (1 - c) s (c: the full-strength minimum), so s = 1 is `full` exactly."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    lo, hi = full.crop_scale
    return dataclasses.replace(
        full, crop_scale=(min(hi, lo + (1.0 - lo) * (1.0 - strength)), hi),
        jitter=tuple(j * strength for j in full.jitter),  # type: ignore[arg-type]
        jitter_p=full.jitter_p * strength, gray_p=full.gray_p * strength, blur_p=full.blur_p * strength)


# ------------------------------------------------------------------------------------- the method
@dataclass
class DynaclConfig(AddOnTermsConfig):
    """DynACL: ACL's attack and branches, the strength schedule (period K epochs) and lambda; the "ours" fields off."""
    name: str = "dynacl"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    period: float = 50.0          # K: the strength drops every K epochs (the authors' reload frequency)
    weight_lambda: float = 2 / 3  # lambda of w = lambda (1 - s)
    anneal: bool = True           # false: s = 1 and w = 0 throughout, i.e. ACL (the authors' run without --DynAug)
    air: AirConfig = field(default_factory=AirConfig)  # the IR term "air" (DynACL-AIR), off by default

    def validate(self) -> None:
        super().validate()
        if self.period <= 0:
            raise ConfigError(f"config value method.period={self.period!r} must be > 0 (epochs)")
        if not 0 <= self.weight_lambda <= 1:
            raise ConfigError(f"config value method.weight_lambda={self.weight_lambda!r} must be in [0, 1] "
                              "(above 1 the natural term's weight (1 - w)/2 turns negative)")


class Dynacl(Method):
    """Dual-stream ACL with the annealed strong view and the dynamic benign/adversarial weighting."""

    name = "dynacl"
    config_class = DynaclConfig
    cfg: DynaclConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strength, self.weights = 1.0, dynamic_weights(0, 1, 1, 0.0)  # the next step's schedule
        self._last = (self.strength, self.weights["adversarial"])          # the last step's (logged)
        self._total_epochs: float | None = None
        self._full: StrongViewConfig | None = None    # the run's full-strength strong view
        self._applied: StrongViewConfig | None = None  # the view this method last put on ctx.strong

    # -------------------------------------------------------------- the schedule hooks
    def schedule_at(self, epoch: float, total_epochs: float, ctx: StepContext) -> None:
        """Set the strength, the loss weights and ctx.strong for (fractional) `epoch` of `total_epochs`."""
        if ctx.strong is not self._applied or self._full is None:  # a fresh context holds the full-strength view
            self._full = ctx.strong
        c = self.cfg
        self.strength = augmentation_strength(epoch, total_epochs, c.period) if c.anneal else 1.0
        self.weights = dynamic_weights(epoch, total_epochs, c.period, c.weight_lambda if c.anneal else 0.0)
        self._applied = ctx.strong = strong_view_at(self.strength, self._full)

    def on_epoch_start(self, epoch: int, total_epochs: float, ctx: StepContext) -> None:
        """Every epoch boundary and the first step of every fit: the schedule of `epoch`."""
        self._total_epochs = total_epochs
        self.schedule_at(epoch, total_epochs, ctx)

    def on_step_end(self, step: int, total_steps: int, ctx: StepContext) -> None:
        """A period under one epoch: the next step's schedule at its fractional epoch step / steps_per_epoch."""
        if self._total_epochs is not None and self.cfg.period < 1:
            self.schedule_at(step * self._total_epochs / total_steps, self._total_epochs, ctx)

    def epoch_metrics(self) -> dict[str, float]:
        """The strength and adversarial weight the last step trained with (logged with its metrics)."""
        return {"strength": self._last[0], "adversarial_weight": self._last[1]}

    # ---------------------------------------------------------------------- the step
    def attack(self, p: torch.Tensor, q: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[p'; q'] = PGD on [p; q] maximising NCE(z_a(p'), z_a(q')) (+ the critic's term), eval mode, frozen."""
        def objective(x: torch.Tensor) -> torch.Tensor:
            z = self.embed(x, "adversarial")
            return info_nce(*z.chunk(2), self.cfg.temperature) + critic_attack_term(self, z)

        return eval_pgd(self, objective, torch.cat([p, q]), self.cfg.attack, ctx)

    def loss_terms(self, p: torch.Tensor, q: torch.Tensor, p_adv: torch.Tensor, q_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None, x_orig: torch.Tensor | None = None) -> Terms:
        """"natural" = NCE(z_b(p), z_b(q)), "adversarial" = NCE(z_a(p'), z_a(q')); "benign" (the same NCE)
        if benign_weight > 0; "divergence" between z_b([p; q]) and z_a([p'; q']) with a critic; "air" (with
        `x_orig`, the un-augmented images, when `air` is active) = IR, z_b(x_orig) from a forward of its own."""
        want = lambda name: only is None or name in only  # noqa: E731
        tau, terms = self.cfg.temperature, {}
        need_benign = want("benign") and self.cfg.benign_weight > 0
        need_divergence = want("divergence") and self.critic is not None
        need_air = want("air") and self.cfg.air.active() and x_orig is not None
        if want("natural") or need_benign or need_divergence or need_air:
            z_b = self.embed(torch.cat([p, q]), "benign")
            nce_b = info_nce(*z_b.chunk(2), tau)
            if want("natural"):
                terms["natural"] = nce_b
            if need_benign:
                terms["benign"] = nce_b
        if want("adversarial") or need_divergence or need_air:
            z_a = self.embed(torch.cat([p_adv, q_adv]), "adversarial")
            if want("adversarial"):
                terms["adversarial"] = info_nce(*z_a.chunk(2), tau)
            if need_divergence:
                terms["divergence"] = divergence_term(self, z_b, z_a)
        if need_air:
            terms["air"] = invariant_regularization(*z_b.chunk(2), self.embed(x_orig, "benign"), *z_a.chunk(2), tau,
                                                    self.cfg.air)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._last = (self.strength, self.weights["adversarial"])
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        x_orig = ctx.prepare(to_unit(images)) if self.cfg.air.active() else None
        return step_with_add_on_terms(self, lambda: self.attack(p, q, ctx), torch.cat([p, q]),
                                      lambda x_adv, only: self.loss_terms(p, q, *x_adv.chunk(2), only=only,
                                                                          x_orig=x_orig),
                                      {**self.weights, "air": 1.0}, ctx)
