"""The optional sections of a method's config that the harness's defaults read: SAM (`SamConfig`) and the
critic D (`CriticConfig`).

A method's config dataclass declares them as fields named `sam` and `critic`; the default hooks of
`robustcl.methods.method.Method` (sam_config, critic_config, wants_critic) find them there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from robustcl.config import ConfigError


@dataclass
class SamConfig:
    """SAM on a subset of loss terms: mode off | sam | asam, radius rho, which named terms."""
    mode: Literal["off", "sam", "asam"] = "off"  # off, SAM (Foret et al. 2021), ASAM (scale-adaptive, Kwon et al.)
    rho: float = 1.0                    # radius of the weight perturbation e
    terms: tuple[str, ...] = ("benign",)  # the loss terms whose gradient is taken at theta + e (the rest at theta)

    def validate(self) -> None:
        if self.mode != "off" and self.rho <= 0:
            raise ConfigError(f"config value method.sam.rho={self.rho!r} must be > 0 when SAM is on")
        if self.mode != "off" and not self.terms:
            raise ConfigError("config value method.sam.terms is empty; name the loss terms SAM applies to")


@dataclass
class CriticConfig:
    """The critic D: on/off, weight lambda_D, its SGD optimiser, in the attack or not, step order."""
    enabled: bool = True                # train a critic D (it acts only with weight > 0)
    weight: float = 0.1                 # lambda_D: weight of the divergence term (in the attack too with in_attack)
    lr: float = 0.2                     # the critic's SGD learning rate
    momentum: float = 0.9               # the critic's SGD momentum
    weight_decay: float = 1e-4          # the critic's SGD weight decay
    in_attack: bool = True              # the attack also maximises lambda_D x the critic's term on z_a(x')
    order: Literal[3, 4] = 3            # 3: attack, critic, encoder steps; 4: attack again after the critic step

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config value method.critic.weight={self.weight!r} must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"config value method.critic.lr={self.lr!r} must be > 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"config value method.critic.momentum={self.momentum!r} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"config value method.critic.weight_decay={self.weight_decay!r} must be >= 0")


__all__ = ["CriticConfig", "SamConfig"]
