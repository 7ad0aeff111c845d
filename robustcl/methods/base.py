"""What every method shares: its modules, its config schema, and the optimisation context.

A method is an `nn.Module` holding the encoder f, the projection head g and (optionally) the
critic D. Its `training_step` reads like the paper's algorithm and delegates the mechanics
(autocast, SAM on a subset of terms, optimiser steps) to `StepContext`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Literal

import torch
from torch import nn

from robustcl.config import AttackConfig, ConfigError
from robustcl.distributed import Distributed
from robustcl.models import Branch, Critic, Encoder, ProjectionHead, frozen_bn_stats
from robustcl.objectives import SAM, frozen_parameters
from robustcl.views import StrongViewConfig, WeakViewConfig

Terms = dict[str, torch.Tensor]


@dataclass
class SamConfig:
    """SAM on a subset of loss terms: mode off | sam | asam, radius rho, which named terms."""
    mode: Literal["off", "sam", "asam"] = "off"
    rho: float = 1.0
    terms: tuple[str, ...] = ("benign",)

    def validate(self) -> None:
        if self.mode != "off" and self.rho <= 0:
            raise ConfigError(f"config value method.sam.rho={self.rho!r} must be > 0 when SAM is on")
        if self.mode != "off" and not self.terms:
            raise ConfigError("config value method.sam.terms is empty; name the loss terms SAM applies to")


@dataclass
class MethodConfig:
    """Fields every method has; each method extends it with its own."""
    name: str = ""
    temperature: float = 0.5

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"config value method.temperature={self.temperature!r} must be > 0")
        attack = getattr(self, "attack", None)  # every attacking method's `attack` section
        if isinstance(attack, AttackConfig):
            attack.validate("method.attack")


class StepContext:
    """Optimisation mechanics for one phase-1 step: autocast, SAM, the two optimisers, cross-rank gradients.

    With a `distributed` job of several ranks, every optimiser step is preceded by the mean
    all-reduce of its parameters' gradients (coalesced; see `robustcl.distributed` for why the mean
    of per-rank gradients is the single-process gradient of the global batch), so parameters stay
    identical on every rank. A single process (the default) does no communication at all.
    """

    def __init__(self, method: "Method", optimizer: torch.optim.Optimizer,
                 critic_optimizer: torch.optim.Optimizer | None, sam: SAM | None,
                 sam_terms: tuple[str, ...], generator: torch.Generator, autocast: Callable[[], contextlib.AbstractContextManager],
                 strong: StrongViewConfig = StrongViewConfig(), weak: WeakViewConfig = WeakViewConfig(),
                 channels_last: bool = False, distributed: Distributed | None = None) -> None:
        self.distributed = distributed if distributed is not None else Distributed()
        self.method = method
        self.strong = strong
        self.weak = weak
        self.optimizer = optimizer
        self.critic_optimizer = critic_optimizer
        self.sam = sam
        self.sam_terms = sam_terms
        self.generator = generator
        self.autocast = autocast
        self.channels_last = channels_last

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the memory format the run asked for."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def critic_step(self, loss: torch.Tensor) -> None:
        """One optimiser step of D on its own loss (its gradient averaged over ranks first)."""
        assert self.critic_optimizer is not None
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.distributed.all_reduce_grads(optimizer_params(self.critic_optimizer))
        self.critic_optimizer.step()

    def encoder_step(self, terms_fn: Callable[[tuple[str, ...] | None], Terms],
                     weights: dict[str, float]) -> Terms:
        """Minimise sum_k w_k * term_k over f and g (D frozen); SAM on `sam_terms` when enabled.

        `terms_fn(None)` computes every term at the current parameters; `terms_fn(names)` only the
        named ones (used for the SAM pass at theta + e, with BN running statistics frozen).
        Across ranks, SAM's ascent direction is the ALL-REDUCED gradient of the sharp terms (that of
        the global batch), so e is the same on every rank and the step equals the single-process one;
        a rank-local e would save one all-reduce but perturb each rank differently. The accumulated
        gradient is averaged over ranks once, just before the optimiser step.
        """
        method, opt = self.method, self.optimizer
        method.train()
        opt.zero_grad(set_to_none=True)
        critic = [method.critic] if method.critic is not None else []
        with frozen_parameters(*critic), phase("encoder_step"):
            with self.autocast():
                terms = terms_fn(None)
            if self.sam is None:
                weighted_sum(terms, weights).backward()
            else:
                sharp_names = tuple(k for k in self.sam_terms if k in terms)
                if not sharp_names:
                    raise ConfigError(f"method.sam.terms={list(self.sam_terms)} names none of this method's loss "
                                      f"terms ({', '.join(terms)}); name one of them or set method.sam.mode=off")
                sharp = weighted_sum({k: terms[k] for k in sharp_names}, weights)
                rest = weighted_sum({k: v for k, v in terms.items() if k not in sharp_names}, weights)
                grads = torch.autograd.grad(sharp, self.sam.params, retain_graph=rest.requires_grad,
                                            allow_unused=True)
                self.distributed.all_reduce_mean_(grads)  # the global batch's ascent direction
                if rest.requires_grad:
                    rest.backward()
                with phase("sam_second_pass"):
                    self.sam.ascend(grads)
                    with frozen_bn_stats(method), self.autocast():
                        perturbed = terms_fn(sharp_names)
                    weighted_sum(perturbed, weights).backward()
                    self.sam.descend()
        self.distributed.all_reduce_grads(optimizer_params(opt))
        opt.step()
        return {k: v.detach() for k, v in terms.items()}


PHASES: tuple[str, ...] = ("views", "attack", "critic", "encoder_step", "sam_second_pass")


def phase(name: str) -> torch.profiler.record_function:
    """A named profiler range for one part of the step (free when no profiler runs); `robustcl bench` sums them."""
    assert name in PHASES, name
    return torch.profiler.record_function(f"robustcl::{name}")


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter an optimiser steps, in param-group order (the same order on every rank)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def weighted_sum(terms: Terms, weights: dict[str, float]) -> torch.Tensor:
    """sum_k w_k * term_k (a zero tensor without grad when `terms` is empty)."""
    total: torch.Tensor | None = None
    for name, value in terms.items():
        part = weights.get(name, 1.0) * value
        total = part if total is None else total + part
    return total if total is not None else torch.zeros(())


class Method(nn.Module):
    """Base of every phase-1 method: f (encoder), g (projection head), optional D (critic)."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    dual_bn: ClassVar[bool] = True
    headline_branch: ClassVar[Branch] = "adversarial"

    def __init__(self, cfg: MethodConfig, encoder: Encoder, projector: ProjectionHead,
                 critic: Critic | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.projector = projector
        self.critic = critic

    @classmethod
    def wants_critic(cls, cfg: MethodConfig) -> bool:
        """Whether this configuration needs a critic D."""
        return False

    def sam_config(self) -> SamConfig:
        """The SAM settings of this method (off unless the method's config has a `sam` section)."""
        return getattr(self.cfg, "sam", SamConfig())

    def embed(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """z = g(f_branch(x)), L2-normalised."""
        return self.projector(self.encoder(x, branch))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of f and g (what the encoder optimiser and SAM update)."""
        return [p for m in (self.encoder, self.projector) for p in m.parameters()]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for f, g and D inside the block; the previous modes are restored after."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.train(mode)

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One phase-1 optimisation step on a uint8 batch; returns detached metrics."""
        raise NotImplementedError


def attack_field(**overrides: float) -> AttackConfig:
    """A dataclass default for a method's attack section."""
    return field(default_factory=lambda: AttackConfig(**overrides))  # type: ignore[return-value]
