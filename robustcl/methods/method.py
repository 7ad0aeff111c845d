"""The contract between a phase-1 method and the harness: `Method`, its config base `MethodConfig`, what its
`setup` may use (`SetupEnv`), and the registry of methods by name (`METHODS`, `method_class`).

A method is an `nn.Module` holding the encoder f, the projection head g and (optionally) the
critic D. Its `training_step` reads like the paper's algorithm and delegates the mechanics
(autocast, SAM on a subset of terms, optimiser steps) to `robustcl.methods.step.StepContext`.
Everything the harness needs to know about a method (its attack, SAM, reporting branch, parameter
groups, per-step and per-epoch hooks, auxiliary networks) is a hook on `Method` with a default; a
subclass with a `name` registers itself in `METHODS` (`robustcl.config.registry`; see docs/methods.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Protocol, TypeVar

import torch
from torch import nn

from robustcl.config import AttackConfig, Config, ConfigError, TrainConfig
from robustcl.config.registry import METHODS, register_method, registered_method
from robustcl.distributed import Distributed
from robustcl.methods.sections import CriticConfig, SamConfig
from robustcl.methods.step import StepContext
from robustcl.models import Branch, Critic, Encoder, ProjectionHead, reported_branch
from robustcl.runs import RunDir

ParamGroups = dict[str, list[dict[str, Any]]]
T = TypeVar("T")


def optional_field(cfg: object, name: str, kind: type[T]) -> T | None:
    """cfg's field `name` when its dataclass declares one holding a `kind`, else None.

    The one place a method config is read by field name: the defaults of the `Method` hooks use it,
    so the harness itself never looks a field up by name.
    """
    if not dataclasses.is_dataclass(cfg) or name not in {f.name for f in dataclasses.fields(cfg)}:
        return None
    value = getattr(cfg, name)
    return value if isinstance(value, kind) else None


@dataclass
class MethodConfig:
    """Fields every method has; each method extends it with its own."""
    name: str = ""                      # the method (robustcl.methods.METHODS); selects this section's schema
    temperature: float = 0.5            # InfoNCE temperature tau

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"config value method.temperature={self.temperature!r} must be > 0")
        attack = optional_field(self, "attack", AttackConfig)  # every attacking method's `attack` section
        if attack is not None:
            attack.validate("method.attack")


class PretrainEntry(Protocol):
    """The harness's phase-1 entry point (`robustcl.train.pretrain.pretrain`): train or resume `cfg` in `run`."""

    def __call__(self, cfg: Config, run: RunDir, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> object: ...


RunEncoderReader = Callable[[Path], tuple[Encoder, Branch]]  # a finished run's encoder and its headline branch


@dataclass(frozen=True)
class SetupEnv:
    """What `Method.setup` may use: the run's config, its directory (None outside a run), device, ranks, verbosity,
    and what the harness lends a method that needs another run (DeACL's teacher), so that no method imports the
    harness or the exporter: its own `pretrain` entry point and `read_run_encoder` (`robustcl.export`'s reading
    of a finished run's encoder through its headline branch). Both are None where no harness lends them."""
    cfg: Config
    run_root: Path | None
    device: torch.device
    distributed: Distributed
    quiet: bool  # True on every rank but 0 (and when the caller asked for silence): print nothing
    pretrain: PretrainEntry | None = None
    read_run_encoder: RunEncoderReader | None = None


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
        critic = optional_field(cfg, "critic", CriticConfig)
        return critic is not None and critic.enabled and critic.weight > 0

    @classmethod
    def attack_for(cls, cfg: MethodConfig) -> AttackConfig | None:
        """The phase-1 attack of config `cfg` (None: the method attacks nothing); override this, not attack_config."""
        return optional_field(cfg, "attack", AttackConfig)

    @classmethod
    def attack_free(cls, cfg: MethodConfig) -> bool:
        """Whether config `cfg` of this method trains without any attack (SimCLR)."""
        return cls.attack_for(cfg) is None

    def attack_config(self) -> AttackConfig | None:
        """This method's phase-1 attack (free mode, diagnostics' eps and bound's budget read it), None if none."""
        return type(self).attack_for(self.cfg)

    def sam_config(self) -> SamConfig:
        """The SAM settings of this method (off unless the method's config declares a `sam` section)."""
        found = optional_field(self.cfg, "sam", SamConfig)
        return found if found is not None else SamConfig()

    def critic_config(self) -> CriticConfig | None:
        """The critic's settings (its optimiser's lr, momentum, weight decay), from a declared `critic` section."""
        return optional_field(self.cfg, "critic", CriticConfig)

    def attack_view(self) -> Literal["weak", "strong"]:
        """Which augmentation the method attacks (bound measures with it): the strong view unless overridden."""
        return "strong"

    def divergence(self) -> str | None:
        """The f-divergence the critic estimates (diagnostics read its threshold), None without a critic."""
        return optional_field(self.cfg, "divergence", str) if self.critic is not None else None

    def report_branch(self, requested: str = "headline") -> Branch:
        """The BN branch a reading through `requested` uses: headline -> `headline_branch`; one BN -> benign."""
        return reported_branch(requested, self.headline_branch, self.encoder.dual_bn)

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, train: TrainConfig) -> ParamGroups:
        """Optimiser key -> SGD param groups: one SGD is built per key (`robustcl.methods.factory`).

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

    def on_epoch_start(self, epoch: int, total_epochs: float, ctx: StepContext) -> None:
        """At every epoch boundary and at the first step of every (resumed) fit: state a pure function of the epoch."""

    def on_step_end(self, step: int, total_steps: int, ctx: StepContext) -> None:
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

    def training_step(self, images: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One phase-1 optimisation step on a uint8 batch; returns detached metrics."""
        raise NotImplementedError


def attack_field(**overrides: float) -> AttackConfig:
    """A dataclass default for a method's attack section."""
    return field(default_factory=lambda: AttackConfig(**overrides))  # type: ignore[return-value]


def method_class(name: str) -> type[Method]:
    """The Method subclass registered under `name` (one-line ConfigError listing the known ones)."""
    return registered_method(name)


__all__ = ["METHODS", "Method", "MethodConfig", "ParamGroups", "PretrainEntry", "RunEncoderReader", "SetupEnv",
           "attack_field", "method_class", "optional_field"]
