"""What every method shares: its modules, its config schema, its hooks, and the optimisation context.

A method is an `nn.Module` holding the encoder f, the projection head g and (optionally) the
critic D. Its `training_step` reads like the paper's algorithm and delegates the mechanics
(autocast, SAM on a subset of terms, optimiser steps) to `StepContext`. Everything the harness needs
to know about a method (its attack, SAM, reporting branch, parameter groups, per-step and per-epoch
hooks, auxiliary networks) is a hook on `Method` with a default; a subclass with a `name` registers
itself in `METHODS` (see docs/methods.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence, TypeVar

import torch
from torch import nn

from robustcl.config import OFF, AttackConfig, ConfigError, ReferenceConfig, TrainConfig
from robustcl.config.registry import register_method
from robustcl.distributed import Distributed
from robustcl.models import Branch, Critic, Encoder, ProjectionHead, frozen_bn_stats, reported_branch
from robustcl.objectives import SAM, frozen_parameters
from robustcl.views import StrongViewConfig, WeakViewConfig

Terms = dict[str, torch.Tensor]
ParamGroups = dict[str, list[dict[str, Any]]]
T = TypeVar("T")


def declared(cfg: object, name: str, kind: type[T]) -> T | None:
    """cfg's field `name` when its dataclass declares one holding a `kind`, else None.

    The one place a method config is read by field name: the defaults of the `Method` hooks use it,
    so the harness itself never looks a field up by name.
    """
    if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
        return None
    value = getattr(cfg, name)
    return value if isinstance(value, kind) else None


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


@dataclass
class MethodConfig:
    """Fields every method has; each method extends it with its own."""
    name: str = ""                      # the method (robustcl.methods.METHODS); selects this section's schema
    temperature: float = 0.5            # InfoNCE temperature tau

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"config value method.temperature={self.temperature!r} must be > 0")
        attack = declared(self, "attack", AttackConfig)  # every attacking method's `attack` section
        if attack is not None:
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


def free_replay_for(method: "Method") -> FreeReplay | None:
    """The FreeReplay state for a method whose attack (`Method.attack_config`) has mode free, else None."""
    attack = method.attack_config()
    if attack is not None and attack.mode == "free":
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
                 reference: ReferenceConfig = OFF,
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
        self.free = free_replay_for(method)

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


@dataclass(frozen=True)
class SetupEnv:
    """What `Method.setup` may use: the run's config, its directory (None outside a run), device, ranks, verbosity."""
    cfg: Any
    run_root: Path | None
    device: torch.device
    distributed: Distributed
    quiet: bool  # True on every rank but 0 (and when the caller asked for silence): print nothing




class Method(nn.Module):
    """Base of every phase-1 method: f (encoder), g (projection head), optional D (critic), and its hooks.

    A subclass that sets `name` is registered in `METHODS` when its class statement runs. The hooks
    below are the whole contract between a method and the harness (pretrain, bench, bound, diagnostics,
    export, finetune); each has a default that fits the methods of docs/methods.md.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    dual_bn: ClassVar[bool] = True
    headline_branch: ClassVar[Branch] = "adversarial"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that names itself (`name` set in its own body) in METHODS."""
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            return  # an intermediate base class
        register_method(cls.name, cls)  # the same class again (a module reloaded) replaces itself

    def __init__(self, cfg: MethodConfig, encoder: Encoder, projector: ProjectionHead,
                 critic: Critic | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.projector = projector
        self.critic = critic

    # ------------------------------------------------------------------ what the method is
    @classmethod
    def wants_critic(cls, cfg: MethodConfig) -> bool:
        """Whether this configuration needs a critic D: a declared `critic` section, enabled, with a positive weight."""
        critic = declared(cfg, "critic", CriticConfig)
        return critic is not None and critic.enabled and critic.weight > 0

    @classmethod
    def attack_for(cls, cfg: MethodConfig) -> AttackConfig | None:
        """The phase-1 attack of config `cfg` (None: the method attacks nothing); override this, not attack_config."""
        return declared(cfg, "attack", AttackConfig)

    @classmethod
    def attack_free(cls, cfg: MethodConfig) -> bool:
        """Whether config `cfg` of this method trains without any attack (SimCLR)."""
        return cls.attack_for(cfg) is None

    def attack_config(self) -> AttackConfig | None:
        """This method's phase-1 attack (free mode, diagnostics' eps and bound's budget read it), None if none."""
        return type(self).attack_for(self.cfg)

    def sam_config(self) -> SamConfig:
        """The SAM settings of this method (off unless the method's config declares a `sam` section)."""
        found = declared(self.cfg, "sam", SamConfig)
        return found if found is not None else SamConfig()

    def critic_config(self) -> CriticConfig | None:
        """The critic's settings (its optimiser's lr, momentum, weight decay), from a declared `critic` section."""
        return declared(self.cfg, "critic", CriticConfig)

    def attack_view(self) -> Literal["weak", "strong"]:
        """Which augmentation the method attacks (bound measures with it): the strong view unless overridden."""
        return "strong"

    def divergence(self) -> str | None:
        """The f-divergence the critic estimates (diagnostics read its threshold), None without a critic."""
        return declared(self.cfg, "divergence", str) if self.critic is not None else None

    def report_branch(self, requested: str = "headline") -> Branch:
        """The BN branch a reading through `requested` uses: headline -> `headline_branch`; one BN -> benign."""
        return reported_branch(requested, self.headline_branch, self.encoder.dual_bn)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, train: TrainConfig) -> ParamGroups:
        """Optimiser key -> SGD param groups: one SGD is built per key (`robustcl.methods.build`).

        "encoder" (f and g, train.lr/momentum/weight_decay) is the optimiser SAM wraps and the lr
        schedule drives (each group at schedule(train.lr) * group["lr_scale"], default 1); "critic"
        (D, its own settings) follows the critic's schedule. A method may add groups or keys.
        """
        groups: ParamGroups = {"encoder": [{"params": self.encoder_parameters(), "lr": train.lr,
                                            "momentum": train.momentum, "weight_decay": train.weight_decay,
                                            "name": "encoder"}]}
        if self.critic is not None:
            c = self.critic_config()
            if c is None:
                raise TypeError(f"method {self.name!r} has a critic but no `critic` section (CriticConfig); declare "
                                "one or override Method.param_groups")
            groups["critic"] = [{"params": list(self.critic.parameters()), "lr": c.lr, "momentum": c.momentum,
                                 "weight_decay": c.weight_decay, "name": "critic"}]
        return groups

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of f and g (what the encoder optimiser and SAM update)."""
        return [p for m in (self.encoder, self.projector) for p in m.parameters()]

    def auxiliary_modules(self) -> dict[str, nn.Module]:
        """Frozen teachers or EMA networks: submodules (so checkpointed with the method), kept in eval mode,
        never in `param_groups`. None by default."""
        return {}

    def train(self, mode: bool = True) -> "Method":
        """nn.Module.train, except that the auxiliary modules always stay in eval mode."""
        super().train(mode)
        for module in self.auxiliary_modules().values():
            module.eval()
        return self

    # ------------------------------------------------------------------ hooks the trainer calls
    def setup(self, env: SetupEnv) -> None:
        """Once, after the method and its optimisers are built and before resume or training (e.g. load a teacher)."""

    def on_epoch_start(self, epoch: int, total_epochs: float, ctx: "StepContext") -> None:
        """At every epoch boundary and at the first step of every (resumed) fit: state a pure function of the epoch."""

    def on_step_end(self, step: int, total_steps: int, ctx: "StepContext") -> None:
        """After every optimiser step; `step` counts the steps done so far (EMA updates go here)."""

    def epoch_metrics(self) -> dict[str, float]:
        """Extra numbers logged with the step metrics (e.g. a schedule's current value)."""
        return {}

    # ------------------------------------------------------------------ the step
    def embed(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """z = g(f_branch(x)), L2-normalised."""
        return self.projector(self.encoder(x, branch))

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

    def training_step(self, images: torch.Tensor, ctx: "StepContext") -> dict[str, torch.Tensor]:
        """One phase-1 optimisation step on a uint8 batch; returns detached metrics."""
        raise NotImplementedError


def attack_field(**overrides: float) -> AttackConfig:
    """A dataclass default for a method's attack section."""
    return field(default_factory=lambda: AttackConfig(**overrides))  # type: ignore[return-value]
