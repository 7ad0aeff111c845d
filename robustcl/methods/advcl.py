"""AdvCL (Fan et al., "When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to
Finetuning?", NeurIPS 2021, arXiv 2111.01124), WITHOUT its ImageNet pseudo-label cross-entropy term.

Views, as in AdvCL's script: x = the weak view (pad-crop-flip), p and q = two strong views, and
HF(x) = the high-frequency component of x (see `high_frequency`). Attack: x' = PGD from x maximising
the 4-view loss against the fixed clean embeddings. Loss ("contrastive"): the multi-positive NT-Xent
over {z_a(x'), z_b(p), z_b(q), z_b(HF(x))}, positives = the other three views of the same image.
Branches: x' through the adversarial BN branch; p, q, HF(x) (and x for the critic) through the benign one.

The paper's add-on terms ("ours") are optional config (add_on_terms.AddOnTermsConfig, all off by default), so
"AdvCL + ours" is a preset: "benign" = benign_weight * NCE(z_b(p), z_b(q)) with SAM/ASAM on the terms
in sam.terms, and a critic D between z_b(x) and z_a(x') exactly as in gbrcl (in the attack,
3- or 4-step order, `divergence` picks the f-divergence).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robustcl.config import REFERENCE_SWITCHES_OFF, AttackConfig, ConfigError, ReferenceConfig
from robustcl.methods.add_on_terms import (AddOnTermsConfig, critic_attack_term, divergence_term,
                                           step_with_add_on_terms)
from robustcl.methods.method import Method
from robustcl.methods.step import StepContext, Terms
from robustcl.methods.step_inputs import draw_view, eval_pgd, fixed_embedding
from robustcl.objectives import info_nce, multi_positive_nce

SUPCON_BASE_TEMPERATURE = 0.07  # SupConLoss's default base temperature: its loss is scaled by tau / 0.07


def supcon_scale(tau: float, reference: ReferenceConfig) -> float:
    """The factor on AdvCL's contrastive and benign terms: tau / 0.07 under reference.advcl_supcon_scale, else 1.

    AdvCL's code (and the authors' AdvCL + ours) computes them with SupConLoss(temperature=tau), whose
    loss is -(tau / base_temperature) * mean log-probability, base_temperature 0.07 by default.
    """
    return tau / SUPCON_BASE_TEMPERATURE if reference.advcl_supcon_scale else 1.0


def high_frequency(x: torch.Tensor, radius: float, rescale: bool = True) -> torch.Tensor:
    """x minus its ideal FFT low-pass, re-normalised per image into [0, 1] (or, rescale=False, as is).

    Low-pass: keep the 2-D DFT coefficients whose integer frequency (ky, kx) has
    sqrt(ky^2 + kx^2) < radius (AdvCL's radial mask, radius 8 for 32 px), per channel. The high
    part x - low has zero mean and values of both signs, so each image is min-max scaled over all its
    channels and pixels to [0, 1] (a constant image maps to 0) to stay a valid encoder input.
    rescale=False returns the signed high part itself, which AdvCL's and the authors' code feed
    to the encoder (reference.advcl_raw_high_frequency).
    """
    x = x.float()
    h, w = x.shape[-2:]
    ky = torch.fft.fftfreq(h, d=1.0 / h, device=x.device)
    kx = torch.fft.fftfreq(w, d=1.0 / w, device=x.device)
    low_mask = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt() < radius
    high = x - torch.fft.ifft2(torch.fft.fft2(x) * low_mask).real
    if not rescale:
        return high
    flat = high.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (x.dim() - 1)
    return ((high - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape)).clamp(0.0, 1.0)


@dataclass
class AdvclConfig(AddOnTermsConfig):
    name: str = "advcl"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    hf_radius: float = 8.0   # HF(x) keeps the frequencies at or above this radius (integer DFT frequency units)

    def validate(self) -> None:
        super().validate()
        if self.hf_radius <= 0:
            raise ConfigError(f"config value method.hf_radius={self.hf_radius!r} must be > 0")


class Advcl(Method):
    """AdvCL's 4-view contrastive loss, optionally with the paper's benign term, SAM and critic."""

    name = "advcl"
    config_class = AdvclConfig
    cfg: AdvclConfig

    def attack(self, x: torch.Tensor, clean: torch.Tensor, ctx: StepContext,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """PGD from x maximising the 4-view loss (+ the critic's term) against fixed z_b of clean = [p; q; HF(x)].

        `targets` is that fixed embedding when the caller already has it (the 4-step order attacks twice).
        """
        if targets is None:
            targets = fixed_embedding(self, clean, "benign", ctx)
        z_p, z_q, z_h = targets.chunk(3)
        scale = supcon_scale(self.cfg.temperature, ctx.reference)

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            z = self.embed(x_adv, "adversarial")
            return scale * multi_positive_nce([z, z_p, z_q, z_h], self.cfg.temperature) + critic_attack_term(self, z)

        return eval_pgd(self, objective, x, self.cfg.attack, ctx)

    def loss_terms(self, x: torch.Tensor, clean: torch.Tensor, x_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None, reference: ReferenceConfig = REFERENCE_SWITCHES_OFF) -> Terms:
        """"contrastive" (4-view), "benign" = NCE(z_b(p), z_b(q)) if weighted, "divergence" if a critic.

        One benign-branch forward of [p; q; HF(x)] serves both terms in every pass (BN batch statistics
        over the three views together), whichever is weighted. reference.advcl_separate_forwards gives
        every view its own forward instead (own batch statistics), in the authors' order x, p, q, HF(x);
        reference.advcl_supcon_scale multiplies both terms by tau / 0.07 (`supcon_scale`).
        """
        want = lambda name: only is None or name in only  # noqa: E731
        tau, terms = self.cfg.temperature, {}
        scale = supcon_scale(tau, reference)
        need_benign = want("benign") and self.cfg.benign_weight > 0
        need_divergence = want("divergence") and self.critic is not None
        need_adv = want("contrastive") or need_divergence
        separate = reference.advcl_separate_forwards
        z_x = self.embed(x, "benign") if need_divergence and separate else None  # the authors forward x first
        z_adv = self.embed(x_adv, "adversarial") if need_adv else None
        if want("contrastive") or need_benign:
            if not separate:  # one benign forward of [p; q; HF(x)] in every pass
                z_p, z_q, z_h = self.embed(clean, "benign").chunk(3)
            else:  # SAM's benign-only pass forwards p and q alone, as the authors' does
                views = clean.chunk(3)
                z_p, z_q = self.embed(views[0], "benign"), self.embed(views[1], "benign")
                z_h = self.embed(views[2], "benign") if want("contrastive") else None
            if want("contrastive"):
                terms["contrastive"] = scale * multi_positive_nce([z_adv, z_p, z_q, z_h], tau)
            if need_benign:
                terms["benign"] = scale * info_nce(z_p, z_q, tau)
        if need_divergence:
            terms["divergence"] = divergence_term(self, z_x if z_x is not None else self.embed(x, "benign"), z_adv)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = draw_view("weak", images, ctx)
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        hf = high_frequency(x, self.cfg.hf_radius, rescale=not ctx.reference.advcl_raw_high_frequency)
        clean = ctx.prepare(torch.cat([p, q, hf]))
        targets = fixed_embedding(self, clean, "benign", ctx)
        return step_with_add_on_terms(self, lambda: self.attack(x, clean, ctx, targets), x,
                                      lambda x_adv, only: self.loss_terms(x, clean, x_adv, only, ctx.reference),
                                      {"contrastive": 1.0}, ctx)
