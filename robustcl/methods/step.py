"""The optimisation mechanics of one phase-1 step: `StepContext` (autocast, SAM on a subset of terms, the
optimisers, cross-rank gradients, free mode's replay) and the gradient helpers it is made of.

A method's `training_step` reads like the paper's algorithm and hands its loss terms to
`StepContext.encoder_step` / `critic_step` / `optimizer_step`; everything here is method-agnostic.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from robustcl.config import REFERENCE_SWITCHES_OFF, ConfigError, ReferenceConfig
from robustcl.distributed import Distributed
from robustcl.methods.free_replay import free_replay_for
from robustcl.models import frozen_bn_stats
from robustcl.objectives import SAM, frozen_parameters
from robustcl.views import StrongViewConfig, WeakViewConfig

Terms = dict[str, torch.Tensor]


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
    `method` is the `robustcl.methods.method.Method` being trained: the step reads its `critic` and
    `attack_config()` and switches its train/eval mode.
    """

    def __init__(self, method: nn.Module, optimizer: torch.optim.Optimizer,
                 critic_optimizer: torch.optim.Optimizer | None, sam: SAM | None,
                 sam_terms: tuple[str, ...], generator: torch.Generator, autocast: Callable[[], contextlib.AbstractContextManager],
                 strong: StrongViewConfig = StrongViewConfig(), weak: WeakViewConfig = WeakViewConfig(),
                 channels_last: bool = False, distributed: Distributed | None = None,
                 reference: ReferenceConfig = REFERENCE_SWITCHES_OFF,
                 optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
        self.reference = reference
        self.distributed = distributed if distributed is not None else Distributed()
        self.method = method
        self.strong = strong
        self.weak = weak
        self.optimizer = optimizer
        self.critic_optimizer = critic_optimizer
        # every optimiser by its `Method.param_groups` key: "encoder" and "critic" are the two above
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers or {})
        self.optimizers.setdefault("encoder", optimizer)
        if critic_optimizer is not None:
            self.optimizers.setdefault("critic", critic_optimizer)
        self.sam = sam
        self.sam_terms = sam_terms
        self.generator = generator
        self.autocast = autocast
        self.channels_last = channels_last
        self.free = free_replay_for(method.attack_config())

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the memory format the run asked for."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def critic_step(self, loss: torch.Tensor) -> None:
        """One optimiser step of D on its own loss (its gradient averaged over ranks first)."""
        assert self.critic_optimizer is not None
        self.optimizer_step(self.critic_optimizer, loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer | str, loss: torch.Tensor) -> None:
        """One step of `optimizer` (or the one under that `Method.param_groups` key) on its own `loss`:
        zero its gradients, backward, average them over ranks, step."""
        opt = self.optimizers[optimizer] if isinstance(optimizer, str) else optimizer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.reduce_and_step(opt)

    def reduce_and_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the accumulated gradients of `optimizer`'s parameters over ranks (none for one process), then step."""
        self.distributed.all_reduce_grads(optimizer_params(optimizer))
        optimizer.step()

    def encoder_step(self, terms_fn: Callable[[tuple[str, ...] | None], Terms],
                     weights: dict[str, float]) -> Terms:
        """Minimise sum_k w_k * term_k over f and g (D frozen); SAM on `sam_terms` when enabled.

        `terms_fn(None)` computes every term at the current parameters; `terms_fn(names)` only the
        named ones (used for the SAM pass at theta + e, with BN running statistics frozen).
        The pieces: `weighted_backward` (no SAM) or `sam_backward` (SAM's two passes), then
        `reduce_and_step` (the gradient averaged over ranks once, just before the optimiser step), then,
        in free mode, each carried perturbation's signed step (`FreeReplay.end_step`).
        """
        method = self.method
        perturbed = self.free.perturbed() if self.free is not None else []
        method.train()
        self.optimizer.zero_grad(set_to_none=True)
        critic = [method.critic] if method.critic is not None else []
        with frozen_parameters(*critic), phase("encoder_step"):
            with self.autocast():
                terms = terms_fn(None)
            if self.sam is None:
                weighted_backward(terms, weights)
            else:
                self.sam_backward(terms_fn, terms, weights, perturbed)
        self.reduce_and_step(self.optimizer)
        if self.free is not None:
            self.free.end_step()
        return {k: v.detach() for k, v in terms.items()}

    def sam_backward(self, terms_fn: Callable[[tuple[str, ...] | None], Terms], terms: Terms,
                     weights: dict[str, float], perturbed: list[torch.Tensor]) -> None:
        """Accumulate SAM's gradient: the sharp terms' at theta + e, the other terms' at theta (not yet all-reduced).

        Across ranks, SAM's ascent direction is the ALL-REDUCED gradient of the sharp terms (that of
        the global batch), so e is the same on every rank and the step equals the single-process one;
        a rank-local e would save one all-reduce but perturb each rank differently.
        In free mode the perturbed inputs' gradients are the sharp and other terms' at theta (the pass
        at theta + e does not change them) and are never all-reduced.
        Reference switches: `sam_reached_only` drops the gradient of every parameter the SAM terms do
        not reach (the authors' SAM steps only parameters with a gradient from its second pass: with SAM
        on the benign term, the adversarial-BN weights and biases get no update, not even weight decay
        or momentum); `sam_pass_updates_bn` lets BN running statistics move in the pass at theta + e.
        """
        assert self.sam is not None
        sharp_names = sam_term_names(self.sam_terms, terms)
        sharp = weighted_sum({k: terms[k] for k in sharp_names}, weights)
        rest = weighted_sum({k: v for k, v in terms.items() if k not in sharp_names}, weights)
        grads, input_grads = sharp_gradients(sharp, self.sam.params, perturbed, retain_graph=rest.requires_grad)
        unreached = unreached_parameters(self.sam.params, grads) if self.reference.sam_reached_only else []
        set_grads(perturbed, input_grads)  # free mode: the sharp terms' input gradient
        self.distributed.all_reduce_mean_(grads)  # the global batch's ascent direction
        if rest.requires_grad:
            rest.backward()
        kept = take_grads(perturbed)  # free mode: the input gradient at theta, kept out of the pass at theta + e
        with phase("sam_second_pass"):
            self.sam_second_pass(terms_fn, sharp_names, weights, grads)
        set_grads(unreached, [None] * len(unreached))  # reference: the optimiser skips them (no step, decay, momentum)
        set_grads(perturbed, kept)

    def sam_second_pass(self, terms_fn: Callable[[tuple[str, ...] | None], Terms], names: tuple[str, ...],
                        weights: dict[str, float], grads: Sequence[torch.Tensor | None]) -> None:
        """Move to theta + e (from the sharp terms' gradient `grads`), accumulate the named terms' gradient there,
        move back; BN running statistics frozen meanwhile unless reference.sam_pass_updates_bn."""
        assert self.sam is not None
        self.sam.ascend(grads)
        stats = contextlib.nullcontext() if self.reference.sam_pass_updates_bn else frozen_bn_stats(self.method)
        with stats, self.autocast():
            at_e = terms_fn(names)
        weighted_sum(at_e, weights).backward()
        self.sam.descend()


def weighted_backward(terms: Terms, weights: dict[str, float]) -> None:
    """The plain encoder step's backward: accumulate the gradient of sum_k w_k * term_k."""
    weighted_sum(terms, weights).backward()


def sam_term_names(sam_terms: tuple[str, ...], terms: Terms) -> tuple[str, ...]:
    """The configured SAM terms this step computed (in sam_terms' order); a ConfigError when it computed none."""
    names = tuple(k for k in sam_terms if k in terms)
    if not names:
        raise ConfigError(f"method.sam.terms={list(sam_terms)} names none of this method's loss "
                          f"terms ({', '.join(terms)}); name one of them or set method.sam.mode=off")
    return names


def sharp_gradients(sharp: torch.Tensor, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                    retain_graph: bool) -> tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
    """(d sharp / d params, d sharp / d inputs), None where unreached; the graph kept when other terms need it."""
    grads = torch.autograd.grad(sharp, [*params, *inputs], retain_graph=retain_graph, allow_unused=True)
    n = len(params)
    return grads[:n], grads[n:]


def unreached_parameters(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """The parameters whose gradient is None (the SAM terms do not depend on them)."""
    return [prm for prm, g in zip(params, grads) if g is None]


def set_grads(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """tensor.grad = grad for each pair (free mode's perturbed inputs; None drops a parameter's gradient)."""
    for tensor, grad in zip(tensors, grads):
        tensor.grad = grad


def take_grads(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The tensors' current .grad, each then cleared, so a later backward cannot accumulate into them in place."""
    grads = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


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


__all__ = ["PHASES", "StepContext", "Terms", "optimizer_params", "phase", "sam_term_names", "set_grads",
           "sharp_gradients", "take_grads", "unreached_parameters", "weighted_backward", "weighted_sum"]
