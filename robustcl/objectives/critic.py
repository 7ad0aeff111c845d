"""The critic D and its losses; D outputs a logit and D(z) = sigmoid(logit) = P(z is benign).

All BCE terms are written with softplus on logits (exact and stable):
BCE(D(z), 1) = softplus(-logit), BCE(D(z), 0) = softplus(logit), log(1 - D(z)) = -softplus(logit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def critic_loss(benign_logits: torch.Tensor, adversarial_logits: torch.Tensor) -> torch.Tensor:
    """L_D = 1/2 [BCE(D(z_b), 1) + BCE(D(z_a), 0)], each averaged over the batch (fp32)."""
    return 0.5 * (F.softplus(-benign_logits.float()).mean() + F.softplus(adversarial_logits.float()).mean())


def divergence_attack_term(adversarial_logits: torch.Tensor) -> torch.Tensor:
    """mean log(1 - D(z_a)) = -BCE(D(z_a), 0): the attacker maximises it to look adversarial to D."""
    return -F.softplus(adversarial_logits.float()).mean()


def critic_accuracy(benign_logits: torch.Tensor, adversarial_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of features D classifies correctly (benign: logit > 0, adversarial: logit < 0)."""
    correct = (benign_logits > 0).float().sum() + (adversarial_logits < 0).float().sum()
    return correct / (benign_logits.numel() + adversarial_logits.numel())
