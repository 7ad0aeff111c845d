"""The one factory of phase 1: method (encoder f, head g, critic D), optimisers, SAM and StepContext from a config.

Pretrainer, `robustcl bench`, `robustcl bound` and the tests build their model and step here, so the
step they run is the same wiring everywhere. The method says what to optimise (`Method.param_groups`:
one SGD per key) and with which SAM settings (`Method.sam_config`); this module only assembles them.
What the encoder is built with also lives here: the backbone's options (`backbone_kwargs`, the ResNet
stem resolved from `image_side`) and the input normalisation (`input_normalisation`, ImageNet's
constants under reference.imagenet_normalisation), which `encoder_export_fields` hands to
`robustcl.export` for the exported encoder's metadata.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from robustcl.config import Config, ConfigError, reference_switches
from robustcl.data import DataError, DatasetInfo, dataset_info
from robustcl.data.base import get_reader
from robustcl.distributed import Distributed, rank_seed
from robustcl.hardware import resolve_precision
from robustcl.methods.method import Method, method_class
from robustcl.methods.step import StepContext, optimizer_params
from robustcl.models import Critic, ProjectionHead, build_encoder, resolve_stem
from robustcl.models.dual_bn import cross_rank_batch_norm
from robustcl.objectives import SAM

LearningRate = Callable[[int, float], float]  # (optimiser step, base lr) -> lr at that step


def constant_lr(step: int, base: float) -> float:
    """The base learning rate at every step (bench and tests, which time or check single steps)."""
    return base


@dataclass
class TrainingSetup:
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
                   generator_seed: int | None = None, lr_at: LearningRate = constant_lr) -> TrainingSetup:
    """Method, optimisers, SAM and StepContext for `cfg` on data shaped like `info`, on `device`.

    Seeds torch's global RNG with cfg.seed first, so the initial weights are a function of the config.
    With several ranks the BNs become cross-rank ones before the optimisers are built (they keep the same
    Parameter objects). The views' generator is seeded with `generator_seed`, by default this rank's
    `rank_seed(cfg.seed, rank)`. `lr_at(step, base)` is the schedule `TrainingSetup.schedule` applies.
    """
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
    return TrainingSetup(method, optimizers, sam, ctx, lr_at, t.lr, critic.lr if critic is not None else None,
                    reference.critic_schedule)


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of autocast contexts (bf16 when asked or `auto` on a native-bf16 device, else a no-op)."""
    enabled = resolve_precision(precision, device) == "bf16" if precision == "auto" else precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def image_side(cfg: Config) -> int:
    """Side (px) of the images cfg's dataset yields, from the config alone, so `model.stem=auto` resolves
    the same way wherever the model is rebuilt (pretrain, resume, bound, bench)."""
    d = cfg.data
    options = {**(vars(d.synthetic) if d.name == "synthetic" else {}), **(d.options or {})}
    try:
        return dataset_info(d.name, **options).height
    except DataError:  # imagefolder: info needs the files, but its side is the `size` option
        size = {**get_reader(d.name).defaults, **options}.get("size")
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        raise


def backbone_kwargs(cfg: Config) -> dict[str, object]:
    """Constructor options for cfg's backbone: ConvNet widths, or the ResNet stem with auto resolved (and the
    authors' projection-only shortcut under reference.projection_only_shortcut)."""
    if cfg.model.arch == "convnet":
        return {"widths": tuple(cfg.model.widths)}
    side = image_side(cfg) if cfg.model.stem in (None, "auto") else None
    kwargs: dict[str, object] = {"stem": resolve_stem(cfg.model.stem, side)}
    if reference_switches(cfg).projection_only_shortcut:
        kwargs["identity_shortcut"] = False
    return kwargs


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_normalisation(cfg: Config, mean: tuple[float, ...], std: tuple[float, ...]
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean/std the encoder normalises with: the dataset's (given), or ImageNet's under
    reference.imagenet_normalisation, as the authors' ResNet does on every dataset (for a 1-channel
    dataset, the averages of ImageNet's three: 0.449 / 0.226)."""
    if not reference_switches(cfg).imagenet_normalisation:
        return mean, std
    if len(mean) == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if len(mean) == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ConfigError(f"reference.imagenet_normalisation needs 1- or 3-channel images, got {len(mean)} channels; drop it")


def build_method(cfg: Config, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Method:
    """Encoder f, projection head g and (if the method wants one) critic D for `cfg`; `mean`/`std` are the
    dataset's (replaced by ImageNet's under reference.imagenet_normalisation)."""
    cls = method_class(cfg.method.name)
    kwargs = backbone_kwargs(cfg)
    mean, std = input_normalisation(cfg, mean, std)
    encoder = build_encoder(cfg.model.arch, in_channels, mean, std, dual_bn=cls.dual_bn, **kwargs)
    projector = ProjectionHead(encoder.feature_dim, encoder.feature_dim, cfg.model.proj_dim)
    critic = Critic(cfg.model.proj_dim, cfg.model.critic_hidden) if cls.wants_critic(cfg.method) else None
    return cls(cfg.method, encoder, projector, critic)


def encoder_export_fields(cfg: Config, info: DatasetInfo) -> dict[str, Any]:
    """What `robustcl.export.export_encoder` records beyond the encoder itself: the method's headline branch
    and the normalisation the encoder was built with (`input_normalisation`), as its keyword arguments."""
    return {"headline_branch": method_class(cfg.method.name).headline_branch,
            "normalisation": input_normalisation(cfg, tuple(info.mean), tuple(info.std))}


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LearningRate", "TrainingSetup", "autocast_factory", "backbone_kwargs",
           "build_method", "build_optimizers", "build_sam", "build_training", "constant_lr", "encoder_export_fields",
           "image_side", "input_normalisation", "set_group_lrs"]
