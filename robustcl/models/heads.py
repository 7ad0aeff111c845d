"""Heads on top of encoder features: projection (contrastive), critic (benign-vs-adversarial), linear probe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear projector with L2-normalised output, for the contrastive loss."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=1)


class Critic(nn.Module):
    """Discriminator D(z) = sigmoid(logit) = P(z is benign); forward returns the logits, shape (N,)."""

    def __init__(self, in_dim: int = 128, hidden_dim: int = 0) -> None:
        super().__init__()
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                                nn.Linear(hidden_dim, 1))
        else:
            self.net = nn.Linear(in_dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (N,); apply sigmoid (or BCE-with-logits) for P(benign)."""
        return self.net(z).squeeze(-1)


class LinearHead(nn.Linear):
    """Linear classifier on encoder features (linear probing / fine-tuning)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__(in_dim, num_classes)
