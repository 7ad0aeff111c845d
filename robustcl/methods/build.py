"""The one factory of phase 1: method + optimisers + SAM + StepContext from a config.

Pretrainer, `robustcl bench` and the tests build their step here, so the step they run is the same
wiring everywhere. The method says what to optimise (`Method.param_groups`: one SGD per key) and
with which SAM settings (`Method.sam_config`); this module only assembles them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from robustcl.config import Config, reference_switches
from robustcl.data import DatasetInfo
from robustcl.distributed import Distributed, rank_seed
from robustcl.methods.method import Method
from robustcl.methods.step import StepContext, optimizer_params
from robustcl.models.dual_bn import cross_rank_batch_norm
from robustcl.objectives import SAM

LearningRate = Callable[[int, float], float]  # (optimiser step, base lr) -> lr at that step


def constant_lr(step: int, base: float) -> float:
    """The base learning rate at every step (bench and tests, which time or check single steps)."""
    return base


@dataclass
class Training:
    """A built phase-1 step: the method, its optimisers by key, SAM, the step context and the lr schedule."""
    method: Method
    optimizers: dict[str, torch.optim.SGD]
    sam: SAM | None
    ctx: StepContext
    lr_at: LearningRate
    encoder_lr: float      # train.lr: the base the schedule scales for every "encoder" group
    critic_lr: float | None  # the critic's base lr (reference.critic_schedule schedules it), None without one
    critic_schedule: bool

    @property
    def generator(self) -> torch.Generator:
        """The views' and attacks' random generator (checkpointed by the trainer)."""
        return self.ctx.generator

    def schedule(self, step: int) -> float:
        """Set step `step`'s learning rates; returns the encoder's (logged as "lr").

        Every "encoder" group gets lr_at(step, train.lr) * its "lr_scale" (default 1); the critic keeps
        its own lr unless reference.critic_schedule schedules it like the encoder (the authors' code);
        any other optimiser a method adds keeps the lr it was built with.
        """
        lr = self.lr_at(step, self.encoder_lr)
        set_group_lrs(self.optimizers["encoder"], lr)
        critic = self.optimizers.get("critic")
        if critic is not None and self.critic_schedule and self.critic_lr is not None:
            set_group_lrs(critic, self.lr_at(step, self.critic_lr))
        return lr


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group's lr = lr * group["lr_scale"] (1 when the group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizers(method: Method, cfg: Config) -> dict[str, torch.optim.SGD]:
    """One SGD (foreach) per key of `method.param_groups`; "encoder" must be one of them, and no group may hold
    a parameter of `method.auxiliary_modules`."""
    groups = method.param_groups(cfg.train)
    if "encoder" not in groups:
        raise TypeError(f"method {method.name!r}: param_groups must have an 'encoder' key (the optimiser SAM wraps "
                        f"and the lr schedule drives), got {', '.join(groups)}")
    frozen = {id(p) for module in method.auxiliary_modules().values() for p in module.parameters()}
    leaked = [key for key, value in groups.items() for group in value if any(id(p) in frozen for p in group["params"])]
    if leaked:
        raise TypeError(f"method {method.name!r}: param_groups key(s) {', '.join(sorted(set(leaked)))} hold parameters "
                        "of an auxiliary module (frozen teachers and EMA networks are never optimised)")
    return {key: torch.optim.SGD(value, foreach=True) for key, value in groups.items()}


def build_sam(method: Method, encoder_optimizer: torch.optim.Optimizer) -> SAM | None:
    """SAM/ASAM over every parameter of the encoder optimiser when `method.sam_config()` turns it on."""
    s = method.sam_config()
    if s.mode == "off":
        return None
    return SAM(optimizer_params(encoder_optimizer), s.rho, adaptive=s.mode == "asam")


def build_training(cfg: Config, info: DatasetInfo, device: torch.device, distributed: Distributed | None = None,
                   generator_seed: int | None = None, lr_at: LearningRate = constant_lr) -> Training:
    """Method, optimisers, SAM and StepContext for `cfg` on data shaped like `info`, on `device`.

    Seeds torch's global RNG with cfg.seed first, so the initial weights are a function of the config.
    With several ranks the BNs become cross-rank ones before the optimisers are built (they keep the same
    Parameter objects). The views' generator is seeded with `generator_seed`, by default this rank's
    `rank_seed(cfg.seed, rank)`. `lr_at(step, base)` is the schedule `Training.schedule` applies.
    """
    from robustcl.train.common import autocast_factory, build_method  # robustcl.train.common imports this package

    dist = distributed if distributed is not None else Distributed()
    t = cfg.train
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, info.channels, info.mean, info.std)
    if dist.world > 1:
        cross_rank_batch_norm(method)
    method.to(device)
    if t.channels_last:
        method.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(method, cfg)
    sam = build_sam(method, optimizers["encoder"])
    seed = rank_seed(cfg.seed, dist.rank) if generator_seed is None else generator_seed
    generator = torch.Generator(device=device).manual_seed(seed)
    reference = reference_switches(cfg)
    ctx = StepContext(method, optimizers["encoder"], optimizers.get("critic"), sam, method.sam_config().terms,
                      generator, autocast_factory(device, t.precision), strong=cfg.views.strong,
                      weak=cfg.views.weak, channels_last=t.channels_last, distributed=dist,
                      reference=reference, optimizers=optimizers)
    critic = method.critic_config() if "critic" in optimizers else None
    return Training(method, optimizers, sam, ctx, lr_at, t.lr, critic.lr if critic is not None else None,
                    reference.critic_schedule)
