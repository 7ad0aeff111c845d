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

from robustcl.config import OFF, AttackConfig, ConfigError, ReferenceConfig
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


class FreeReplay:
    """Free adversarial training's state (Shafahi et al. 2019, method.attack.mode=free), held by a StepContext.

    Replay r (0 <= r < replays) of a batch is one optimiser step. Within a step, the k-th distinct
    input x handed to `perturb` gets perturbation buffer delta_k: x's shape, zero when first made (or
    when the input's shape changes), carried across steps and batches, never reset. `perturb` returns
    x' = (x + delta_k).clamp(0, 1) as a leaf that requires grad, so the encoder step's one backward
    also fills x'.grad; `end_step` (after the optimiser step) then does
    delta_k <- clip_[-eps, eps](delta_k + eps * sign(g)), g = x'.grad where 0 <= x + delta_k <= 1, else 0
    (the gradient through the clamp, as autograd would give it). x' is a leaf, not a function of
    delta_k, so a second backward through it (SAM's pass at theta + e) needs no retained graph.
    The same input tensor handed twice in a step (gbrcl's 4-step order attacks q again after the
    critic step) gets the same x': no delta moves between the two calls. `view` replays the views:
    the j-th view of a step is drawn on replay 0 and returned unchanged on replays 1..m-1, so the
    deltas keep attacking the same images. Each rank of a data-parallel job keeps its own deltas for
    its own shard (never all-reduced).
    """

    def __init__(self, replays: int, eps: float) -> None:
        self.replays, self.eps = replays, eps
        self.replay = 0
        self.deltas: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = []
        self._inputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # this step's (x, x') pairs, k-th: delta_k
        self._view_calls = 0

    def view(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """This step's next view: drawn by `draw` on the batch's first replay, the cached one after."""
        j, self._view_calls = self._view_calls, self._view_calls + 1
        if j == len(self.views):
            self.views.append(draw())
        return self.views[j]

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """x' = (x + delta_k).clamp(0, 1), a leaf requiring grad, for this step's k-th distinct input x."""
        for seen, out in self._inputs:
            if seen is x:
                return out
        k = len(self._inputs)
        if k == len(self.deltas):
            self.deltas.append(torch.zeros_like(x))  # first use: zero
        elif (self.deltas[k].shape, self.deltas[k].device, self.deltas[k].dtype) != (x.shape, x.device, x.dtype):
            self.deltas[k] = torch.zeros_like(x)  # a batch of another shape starts from zero
        out = (x.detach() + self.deltas[k]).clamp_(0.0, 1.0).requires_grad_(True)
        self._inputs.append((x, out))
        return out

    def perturbed(self) -> list[torch.Tensor]:
        """This step's perturbed inputs x' (in call order): the leaves whose .grad the encoder step fills."""
        return [out for _, out in self._inputs]

    @torch.no_grad()
    def end_step(self) -> None:
        """After the optimiser step: one signed step of eps on every delta used, clipped; next replay."""
        for (x, out), delta in zip(self._inputs, self.deltas):
            if out.grad is not None:
                moved = x.detach() + delta
                inside = (moved >= 0) & (moved <= 1)  # where the clamp passes the gradient
                delta.add_(out.grad.sign() * inside, alpha=self.eps).clamp_(-self.eps, self.eps)
        self._inputs, self._view_calls = [], 0
        self.replay = (self.replay + 1) % self.replays
        if self.replay == 0:
            self.views = []  # the next batch draws new views

    def state(self) -> list[torch.Tensor]:
        """The perturbation buffers (detached CPU copies) that an exact resume needs at a replay boundary."""
        return [d.detach().cpu().clone() for d in self.deltas]

    def load(self, deltas: list[torch.Tensor], step: int, device: torch.device) -> None:
        """Restore the buffers saved by `state` at optimiser step `step` (views are drawn afresh)."""
        self.deltas = [d.to(device) for d in deltas]
        self.replay = step % self.replays
        self.views, self._inputs, self._view_calls = [], [], 0


def free_replay_for(method: nn.Module) -> FreeReplay | None:
    """The FreeReplay state for a method whose method.attack.mode is free, else None."""
    attack = getattr(getattr(method, "cfg", None), "attack", None)
    if isinstance(attack, AttackConfig) and attack.mode == "free":
        assert attack.replays is not None  # validated: >= 2
        return FreeReplay(attack.replays, attack.eps)
    return None


class StepContext:
    """Optimisation mechanics for one phase-1 step: autocast, SAM, the two optimisers, cross-rank gradients.

    With a `distributed` job of several ranks, every optimiser step is preceded by the mean
    all-reduce of its parameters' gradients (coalesced; see `robustcl.distributed` for why the mean
    of per-rank gradients is the single-process gradient of the global batch), so parameters stay
    identical on every rank. A single process (the default) does no communication at all.
    With method.attack.mode=free, `free` holds the replayed views and the carried perturbations
    (`FreeReplay`); the encoder step is then the end of a replay and updates them.
    `reference` holds the run's switches for the authors' code (config `reference`, all off by default):
    the step reads sam_reached_only, sam_pass_updates_bn and unclipped_start from it.
    """

    def __init__(self, method: "Method", optimizer: torch.optim.Optimizer,
                 critic_optimizer: torch.optim.Optimizer | None, sam: SAM | None,
                 sam_terms: tuple[str, ...], generator: torch.Generator, autocast: Callable[[], contextlib.AbstractContextManager],
                 strong: StrongViewConfig = StrongViewConfig(), weak: WeakViewConfig = WeakViewConfig(),
                 channels_last: bool = False, distributed: Distributed | None = None,
                 reference: ReferenceConfig = OFF) -> None:
        self.reference = reference
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
        self.free = free_replay_for(method)

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
        In free mode the perturbed inputs' gradients come from the same backward(s) at theta (under SAM
        they are kept from the first pass; the pass at theta + e does not change them) and are never
        all-reduced; after the optimiser step each perturbation takes its signed step (`FreeReplay`).
        Reference switches: `sam_reached_only` drops the gradient of every parameter the SAM terms do
        not reach (the authors' SAM steps only parameters with a gradient from its second pass: with SAM
        on the benign term, the adversarial-BN weights and biases get no update, not even weight decay
        or momentum); `sam_pass_updates_bn` lets BN running statistics move in the pass at theta + e.
        """
        method, opt = self.method, self.optimizer
        perturbed = self.free.perturbed() if self.free is not None else []
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
                n = len(self.sam.params)
                grads = torch.autograd.grad(sharp, [*self.sam.params, *perturbed], retain_graph=rest.requires_grad,
                                            allow_unused=True)
                grads, input_grads = grads[:n], grads[n:]
                unreached = ([prm for prm, g in zip(self.sam.params, grads) if g is None]
                             if self.reference.sam_reached_only else [])
                for x_adv, grad in zip(perturbed, input_grads):  # free mode: the sharp terms' input gradient
                    x_adv.grad = grad
                self.distributed.all_reduce_mean_(grads)  # the global batch's ascent direction
                if rest.requires_grad:
                    rest.backward()
                kept = [x_adv.grad for x_adv in perturbed]  # free mode: the input gradient at theta only
                for x_adv in perturbed:
                    x_adv.grad = None  # (else the pass at theta + e would accumulate into `kept` in place)
                with phase("sam_second_pass"):
                    self.sam.ascend(grads)
                    stats = contextlib.nullcontext() if self.reference.sam_pass_updates_bn else frozen_bn_stats(method)
                    with stats, self.autocast():
                        at_e = terms_fn(sharp_names)
                    weighted_sum(at_e, weights).backward()
                    self.sam.descend()
                for prm in unreached:  # reference: the optimiser skips them (no step, weight decay or momentum)
                    prm.grad = None
                for x_adv, grad in zip(perturbed, kept):
                    x_adv.grad = grad
        self.distributed.all_reduce_grads(optimizer_params(opt))
        opt.step()
        if self.free is not None:
            self.free.end_step()
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
