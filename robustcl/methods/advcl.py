"""AdvCL (Fan et al., "When Does Contrastive Learning Preserve Adversarial Robustness from Pretraining to
Finetuning?", NeurIPS 2021, arXiv 2111.01124), WITHOUT its ImageNet pseudo-label cross-entropy term.

Views, as in AdvCL's script: x = the weak view (pad-crop-flip), p and q = two strong views, and
HF(x) = the high-frequency component of x (see `high_frequency`). Attack: x' = PGD from x maximising
the 4-view loss against the fixed clean embeddings. Loss ("contrastive"): the multi-positive NT-Xent
over {z_a(x'), z_b(p), z_b(q), z_b(HF(x))}, positives = the other three views of the same image.
Branches: x' through the adversarial BN branch; p, q, HF(x) (and x for the critic) through the benign one.

The paper's "ours" components are optional config (components.OursConfig, all off by default), so
"AdvCL + ours" is a preset: "benign" = benign_weight * NCE(z_b(p), z_b(q)) with SAM/ASAM on the terms
in sam.terms, and a critic D between z_b(x) and z_a(x') exactly as in gbrcl (in the attack,
3- or 4-step order, `divergence` picks the f-divergence).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robustcl.config import AttackConfig, ConfigError
from robustcl.methods.base import Method, StepContext, Terms
from robustcl.methods.components import (OursConfig, critic_attack_term, divergence_term, draw_view, eval_pgd,
                                         fixed_embedding, ours_step, uses_critic)
from robustcl.objectives import info_nce, multi_positive_nce


def high_frequency(x: torch.Tensor, radius: float) -> torch.Tensor:
    """x minus its ideal FFT low-pass, re-normalised per image into [0, 1].

    Low-pass: keep the 2-D DFT coefficients whose integer frequency (ky, kx) has
    sqrt(ky^2 + kx^2) < radius (AdvCL's radial mask, radius 8 for 32 px), per channel. The high
    part x - low has zero mean and values of both signs, so each image is min-max scaled over all its
    channels and pixels to [0, 1] (a constant image maps to 0) to stay a valid encoder input.
    """
    x = x.float()
    h, w = x.shape[-2:]
    ky = torch.fft.fftfreq(h, d=1.0 / h, device=x.device)
    kx = torch.fft.fftfreq(w, d=1.0 / w, device=x.device)
    low_mask = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt() < radius
    high = x - torch.fft.ifft2(torch.fft.fft2(x) * low_mask).real
    flat = high.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (x.dim() - 1)
    return ((high - lo.view(shape)) / (hi - lo).clamp_min(1e-12).view(shape)).clamp(0.0, 1.0)


@dataclass
class AdvclConfig(OursConfig):
    name: str = "advcl"
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(steps=5))
    hf_radius: float = 8.0

    def validate(self) -> None:
        super().validate()
        if self.hf_radius <= 0:
            raise ConfigError(f"config value method.hf_radius={self.hf_radius!r} must be > 0")


class Advcl(Method):
    """AdvCL's 4-view contrastive loss, optionally with the paper's benign term, SAM and critic."""

    name = "advcl"
    config_class = AdvclConfig
    cfg: AdvclConfig

    @classmethod
    def wants_critic(cls, cfg: AdvclConfig) -> bool:  # type: ignore[override]
        return uses_critic(cfg)

    def attack(self, x: torch.Tensor, clean: torch.Tensor, ctx: StepContext,
               targets: torch.Tensor | None = None) -> torch.Tensor:
        """PGD from x maximising the 4-view loss (+ the critic's term) against fixed z_b of clean = [p; q; HF(x)].

        `targets` is that fixed embedding when the caller already has it (the 4-step order attacks twice).
        """
        if targets is None:
            targets = fixed_embedding(self, clean, "benign", ctx)
        z_p, z_q, z_h = targets.chunk(3)

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            z = self.embed(x_adv, "adversarial")
            return multi_positive_nce([z, z_p, z_q, z_h], self.cfg.temperature) + critic_attack_term(self, z)

        return eval_pgd(self, objective, x, self.cfg.attack, ctx)

    def loss_terms(self, x: torch.Tensor, clean: torch.Tensor, x_adv: torch.Tensor,
                   only: tuple[str, ...] | None = None) -> Terms:
        """"contrastive" (4-view), "benign" = NCE(z_b(p), z_b(q)) if weighted, "divergence" if a critic."""
        want = lambda name: only is None or name in only  # noqa: E731
        tau, terms = self.cfg.temperature, {}
        need_benign = want("benign") and self.cfg.benign_weight > 0
        need_adv = want("contrastive") or (want("divergence") and self.critic is not None)
        z_adv = self.embed(x_adv, "adversarial") if need_adv else None
        if want("contrastive") or need_benign:  # one benign forward of [p; q; HF(x)] in every pass
            z_p, z_q, z_h = self.embed(clean, "benign").chunk(3)
            if want("contrastive"):
                terms["contrastive"] = multi_positive_nce([z_adv, z_p, z_q, z_h], tau)
            if need_benign:
                terms["benign"] = info_nce(z_p, z_q, tau)
        if want("divergence") and self.critic is not None:
            terms["divergence"] = divergence_term(self, self.embed(x, "benign"), z_adv)
        return terms

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = draw_view("weak", images, ctx)
        p, q = draw_view("strong", images, ctx), draw_view("strong", images, ctx)
        clean = ctx.prepare(torch.cat([p, q, high_frequency(x, self.cfg.hf_radius)]))
        targets = fixed_embedding(self, clean, "benign", ctx)
        return ours_step(self, lambda: self.attack(x, clean, ctx, targets), x,
                         lambda x_adv, only: self.loss_terms(x, clean, x_adv, only), {"contrastive": 1.0}, ctx)
