"""Invariant regularisation IR = lambda1 SIR + lambda2 AIR (Xu, Zhang, Liu, Sugiyama & Kankanhalli, "Enhancing
Adversarial Contrastive Learning via Adversarial Invariant Regularization", NeurIPS 2023, arXiv 2305.00374;
code GodXuxilie/Enhancing_ACL_via_AIR, AIR.py), as a term any ACL-style method can add.

Inputs are the projections of one batch of N images: z_i, z_j of two natural (augmented) views through
the benign branch, z_o of the un-augmented image through the benign branch, and z_i', z_j' of the two
views' adversarial examples through the adversarial branch. Every "distribution" is over the N images of
the batch (the paper's p(. ; B)): for paired rows u_k, v_k,
    p_{u|v}(k) = softmax_k( cos(u_k, v_k) / tau ),
the softmax over the batch of each image's own pair similarity (tau = the contrastive temperature, 0.5).
    SIR = KL( p_{z_i|z_o} || p_{z_j|z_o} )
    AIR = KL( p_{z_i'|z_i} p_{z_i'|z_o} || p_{z_j'|z_j} p_{z_j'|z_o} )   (elementwise products, not renormalised)
with KL(P || Q) = sum_k P(k) log(P(k) / Q(k)). Both vanish when the two views coincide (z_i = z_j and
z_i' = z_j'); with z_i' = z_i and z_j' = z_j, p_{z|z} is uniform and AIR = SIR / N. Nothing is detached:
the gradient reaches all five embeddings, as in the authors' code.

Where robustcl differs from the authors' code (AIR.py, `AIR_Loss`):
- `form: authors` reproduces their `F.kl_div(P, log Q, log_target=True, reduction="sum")`, which is
  sum_k Q(k) (log Q(k) - P(k)): P is passed as probabilities where kl_div expects log-probabilities, so it
  is not a divergence (not 0 at P = Q, and it rewards a peaked Q). robustcl's default `form: kl` is the KL
  the paper names.
- Their loss is nat + adv + lambda1 SIR + lambda2 AIR with lambda1 = lambda2 = 0.5 (pretraining.py defaults,
  the RobustSSL benchmark's ACL_Methods/AIR_nips2023/run.sh for both ACL-IR and DynACL-IR); robustcl's ACL and
  DynACL weigh their two contrastive terms by 1/2 each (acl.py, dynacl.py), so the same balance is
  lambda1 = lambda2 = 0.25 here (the defaults): the authors' objective divided by 2.
- Under data parallelism each rank's softmax runs over its own batch (the authors train on one GPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from robustcl.config import ConfigError

AirForm = Literal["kl", "authors"]

__all__ = ["AirConfig", "AirForm", "batch_log_distribution", "invariant_regularization", "sir", "air"]


@dataclass
class AirConfig:
    """The IR term "air" of an ACL-style method: off by default; lambda1 (SIR) and lambda2 (AIR); the KL form."""
    enabled: bool = False   # adds the "air" term (lambda1 SIR + lambda2 AIR) to the method's loss
    lambda1: float = 0.25   # SIR weight: the authors' 0.5 on their unhalved nat + adv loss (module docstring)
    lambda2: float = 0.25   # AIR weight: likewise
    form: AirForm = "kl"    # authors: their kl_div call on probabilities (module docstring)

    def validate(self) -> None:
        for key in ("lambda1", "lambda2"):
            value = getattr(self, key)
            if value < 0:
                raise ConfigError(f"config value method.air.{key}={value!r} must be >= 0")
        if self.form not in get_args(AirForm):
            raise ConfigError(f"config value method.air.form={self.form!r} must be one of "
                              f"{', '.join(get_args(AirForm))}")

    def active(self) -> bool:
        """Whether the term is computed at all: enabled with a positive weight (else no extra forward either)."""
        return self.enabled and (self.lambda1 > 0 or self.lambda2 > 0)


def batch_log_distribution(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_{u|v}(k) = log_softmax over the batch k of cos(u_k, v_k) / tau, for (N, d) rows paired by index."""
    if u.shape != v.shape or u.dim() != 2:
        raise ValueError(f"need two (N, d) tensors of equal shape, got {tuple(u.shape)} and {tuple(v.shape)}")
    pair = (F.normalize(u.float(), dim=1) * F.normalize(v.float(), dim=1)).sum(1)
    return F.log_softmax(pair / temperature, dim=0)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, form: AirForm) -> torch.Tensor:
    """kl: sum_k P (log P - log Q); authors: sum_k Q (log Q - P) (their kl_div on probabilities)."""
    if form == "kl":
        return (log_p.exp() * (log_p - log_q)).sum()
    if form == "authors":
        return (log_q.exp() * (log_q - log_p.exp())).sum()
    raise ValueError(f"unknown AIR form {form!r}")


def sir(z_i: torch.Tensor, z_j: torch.Tensor, z_orig: torch.Tensor, temperature: float = 0.5,
        form: AirForm = "kl") -> torch.Tensor:
    """Standard invariant regularisation: KL(p_{z_i|z_o} || p_{z_j|z_o}) over the batch."""
    return _divergence(batch_log_distribution(z_i, z_orig, temperature),
                       batch_log_distribution(z_j, z_orig, temperature), form)


def air(z_i: torch.Tensor, z_j: torch.Tensor, z_orig: torch.Tensor, z_i_adv: torch.Tensor, z_j_adv: torch.Tensor,
        temperature: float = 0.5, form: AirForm = "kl") -> torch.Tensor:
    """Adversarial invariant regularisation: KL(p_{z_i'|z_i} p_{z_i'|z_o} || p_{z_j'|z_j} p_{z_j'|z_o})."""
    log_p = batch_log_distribution(z_i_adv, z_i, temperature) + batch_log_distribution(z_i_adv, z_orig, temperature)
    log_q = batch_log_distribution(z_j_adv, z_j, temperature) + batch_log_distribution(z_j_adv, z_orig, temperature)
    return _divergence(log_p, log_q, form)


def invariant_regularization(z_i: torch.Tensor, z_j: torch.Tensor, z_orig: torch.Tensor, z_i_adv: torch.Tensor,
                             z_j_adv: torch.Tensor, temperature: float, cfg: AirConfig) -> torch.Tensor:
    """IR = lambda1 SIR + lambda2 AIR (a part with weight 0 is not computed): the value of a method's "air" term.

    z_i, z_j: (N, d) benign-branch projections of two natural views; z_orig: of the un-augmented images (benign
    branch); z_i_adv, z_j_adv: adversarial-branch projections of the two views' adversarial examples; row k of
    each is image k. `temperature`: the method's contrastive tau.
    """
    total = torch.zeros((), device=z_i.device)
    if cfg.lambda1 > 0:
        total = total + cfg.lambda1 * sir(z_i, z_j, z_orig, temperature, cfg.form)
    if cfg.lambda2 > 0:
        total = total + cfg.lambda2 * air(z_i, z_j, z_orig, z_i_adv, z_j_adv, temperature, cfg.form)
    return total
