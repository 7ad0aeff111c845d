"""Typed run configuration: YAML presets shipped in the package, `key=value` overrides, validation.

Every section is a dataclass; `build(cls, mapping)` converts a parsed YAML mapping into it and fails
with a one-line `ConfigError` naming the offending key (unknown key, wrong type, impossible value).
A preset may start with `extends: <preset>` to inherit and override another one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the key and the fix."""


# ----------------------------------------------------------------------------------------- schema
@dataclass
class SyntheticConfig:
    num_classes: int = 10
    channels: int = 1
    size: int = 28
    n_train: int = 2000
    n_test: int = 500


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None
    download: bool = False
    val_size: int = 5000          # held out from the training split for phase-2 epoch selection
    train_limit: int | None = None  # use only the first N (shuffled) training images in phase 1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Reader options, e.g. data.options.size=32 for stl10/imagefolder. None (not {}) by default so configs
    # stored before this field existed still compare equal on resume.
    options: dict[str, Any] | None = None

    def validate(self) -> None:
        _check(self.val_size >= 0, "data.val_size", self.val_size, "must be >= 0")
        _check(self.train_limit is None or self.train_limit > 0, "data.train_limit", self.train_limit, "must be > 0 or null")
        if self.options:
            from robustcl.data import DataError
            from robustcl.data.base import _check_options, get_reader

            try:
                _check_options(get_reader(self.name), self.options)
            except DataError as exc:
                raise ConfigError(f"config value data.options: {exc}") from None


@dataclass
class StrongViewSection:
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def validate(self) -> None:
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "views.strong.crop_scale", self.crop_scale, "must satisfy 0 < min <= max <= 1")
        for key in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            _check(0 <= getattr(self, key) <= 1, f"views.strong.{key}", getattr(self, key), "must be a probability in [0, 1]")
        try:
            self.build()
        except ValueError as exc:
            raise ConfigError(f"config section views.strong: {exc}") from None

    def build(self) -> Any:
        """The views module's StrongViewConfig with these values (its own checks run here too)."""
        from robustcl.views import StrongViewConfig

        return StrongViewConfig(**dataclasses.asdict(self))


@dataclass
class WeakViewSection:
    padding: int = 4
    flip_p: float = 0.5

    def validate(self) -> None:
        _check(self.padding >= 0, "views.weak.padding", self.padding, "must be >= 0")
        _check(0 <= self.flip_p <= 1, "views.weak.flip_p", self.flip_p, "must be a probability in [0, 1]")

    def build(self) -> Any:
        """The views module's WeakViewConfig with these values."""
        from robustcl.views import WeakViewConfig

        return WeakViewConfig(**dataclasses.asdict(self))


@dataclass
class ViewsConfig:
    strong: StrongViewSection = field(default_factory=StrongViewSection)
    weak: WeakViewSection = field(default_factory=WeakViewSection)


@dataclass
class ModelConfig:
    arch: Literal["convnet", "resnet18", "resnet50"] = "resnet18"
    widths: tuple[int, ...] = (32, 64, 128, 256)   # convnet only
    proj_dim: int = 128
    critic_hidden: int = 0
    # ResNet stem: cifar (3x3 stride 1, no max-pool), imagenet (7x7 stride 2 + 3x3 max-pool), auto: cifar for
    # images <= 64 px, imagenet above (resolved in build_method). null means auto; it is the default (not
    # "auto") so configs stored before this field existed still compare equal on resume.
    stem: Literal["auto", "cifar", "imagenet"] | None = None

    def validate(self) -> None:
        _check(self.arch != "convnet" or self.stem in (None, "auto"), "model.stem", self.stem,
               "applies to resnet18/resnet50 only; drop it (or use auto) with model.arch=convnet")
        _check(self.proj_dim > 0, "model.proj_dim", self.proj_dim, "must be > 0")
        _check(len(self.widths) > 0 and min(self.widths) > 0, "model.widths", self.widths, "must be positive widths")
        _check(self.critic_hidden >= 0, "model.critic_hidden", self.critic_hidden, "must be >= 0 (0: a linear critic)")


LINF_RANGE = "must be in [0, 1]: an L-inf radius on [0, 1] images (above 1 it is the whole range); e.g. 8/255"


@dataclass
class AttackConfig:
    """An L-inf attack: eps and alpha in pixel units ([0,1]); YAML may write them as '8/255'.

    mode: pgd (steps x alpha) or fgsm-rs (Wong et al. 2020: one step of 1.25 eps from a uniform
    random start; needs steps=1, alpha is not used). Only phase-1 attacks may use fgsm-rs or free.
    free (Shafahi et al. 2019, "Adversarial training for free!"): no attack pass; each batch is
    replayed `replays` times and one perturbation per attacked input, carried across batches, takes
    a step of eps * sign(its gradient from the training step's own backward) after every optimiser
    step (alpha, steps, random_start are not used). train.max_steps counts optimiser steps (replays);
    train.epochs counts passes over the data, each `replays` x as many steps as without replay.
    """
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 7
    random_start: bool = True
    mode: Literal["pgd", "fgsm-rs", "free"] = "pgd"
    replays: int | None = None   # mode free only: times each batch is replayed (null: no replay)

    def validate(self, where: str) -> None:
        _check(self.eps >= 0, f"{where}.eps", self.eps, "must be >= 0")
        _check(self.eps <= 1 or where == "eval.l2", f"{where}.eps", self.eps, LINF_RANGE)
        _check(self.alpha > 0, f"{where}.alpha", self.alpha, "must be > 0")
        _check(self.steps >= 1, f"{where}.steps", self.steps, "must be >= 1")
        _check(self.mode == "pgd" or where == "method.attack", f"{where}.mode", self.mode,
               "must be pgd (fast attack modes are for phase-1 training only)")
        _check(self.mode != "fgsm-rs" or self.steps == 1, f"{where}.steps", self.steps,
               "must be 1 with mode fgsm-rs (one step of 1.25 eps)")
        _check(self.mode != "fgsm-rs" or self.random_start, f"{where}.random_start", self.random_start,
               "must be true with mode fgsm-rs (the random start is what prevents catastrophic overfitting)")
        _check(self.mode != "free" or (self.replays is not None and self.replays >= 2), f"{where}.replays",
               self.replays, f"must be >= 2 with {where}.mode=free (each batch is replayed that many times)")
        _check(self.mode == "free" or self.replays is None, f"{where}.replays", self.replays,
               f"applies to {where}.mode=free only; drop it")


@dataclass
class TrainConfig:
    batch_size: int = 512
    epochs: int = 500
    max_steps: int | None = None     # stop after this many optimiser steps (overrides epochs)
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10
    min_lr: float = 1e-8
    # auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, AVX512-BF16/AMX CPU), else
    # fp32 (robustcl/hardware.py); resolved once when a run starts and stored resolved in its config.yaml
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = False
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    # torch intra-op threads on CPU: auto = the cores this process may use (affinity, cgroup quota) divided
    # among torchrun's local ranks; an integer; or null for torch's own default
    threads: int | Literal["auto"] | None = "auto"
    log_every: int = 20
    checkpoint_every: int = 200      # steps between checkpoints (and one at every epoch end)
    # metric sinks for phase 1, phase 2 and evaluation: metrics.jsonl is always written; tensorboard
    # (pip install robustcl[tensorboard]) and wandb (robustcl[wandb]; WANDB_MODE=offline keeps it local) on request
    loggers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ("jsonl",)
    wandb_project: str = "robustcl"  # the W&B project a run is logged to (train.loggers with wandb)

    def validate(self) -> None:
        _check(self.batch_size >= 2, "train.batch_size", self.batch_size, "must be >= 2 (contrastive negatives)")
        _check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1 or null")
        _check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(self.warmup_epochs < self.epochs or self.max_steps is not None, "train.warmup_epochs",
               self.warmup_epochs, f"must be below train.epochs={self.epochs}")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"must be in [0, train.lr={self.lr}]")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(not isinstance(self.threads, int) or self.threads >= 1, "train.threads", self.threads,
               "must be >= 1, auto (the cores this process may use) or null (torch's default)")
        _check(len(set(self.loggers)) == len(self.loggers), "train.loggers", self.loggers, "must not repeat a logger")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "train.device", self.device, "must be auto, cpu, cuda or cuda:N")


@dataclass
class AffConfig:
    """AFF: full adversarial fine-tuning of encoder + head (TRADES or PGD-AT), epoch chosen on validation PGD."""
    loss: Literal["trades", "pgd-at"] = "trades"
    beta: float = 6.0                  # TRADES: CE(f(x), y) + beta * KL(f(x) || f(x'))
    epochs: int = 25
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    train_limit: int | None = None     # fine-tune on at most N training images
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(8 / 255, 2 / 255, 10))

    def validate(self) -> None:
        _check(self.beta >= 0, "finetune.aff.beta", self.beta, "must be >= 0")
        _check(self.epochs >= 1, "finetune.aff.epochs", self.epochs, "must be >= 1")
        _check(self.lr > 0, "finetune.aff.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, "finetune.aff.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "finetune.aff.weight_decay", self.weight_decay, "must be >= 0")
        _check(self.batch_size >= 2, "finetune.aff.batch_size", self.batch_size, "must be >= 2 (BN in train mode)")
        _check(self.train_limit is None or self.train_limit >= 2, "finetune.aff.train_limit", self.train_limit,
               "must be >= 2 or null")
        self.attack.validate("finetune.aff.attack")


@dataclass
class PostprocessConfig:
    """Encoder post-processing before the protocols: lp-aff is DynACL++'s (robustcl/methods/dynacl.py `lp_aff`).

    k-means pseudo-labels of the benign-branch features, `lp_epochs` of linear probing, then `aff.epochs` of
    adversarial full fine-tuning on them (lr x 0.1 at each of `milestones`); every protocol starts from the result.
    """
    name: Literal["none", "lp-aff"] = "none"
    clusters: int = 10
    kmeans_iters: int = 100
    lp_epochs: int = 10
    lp_lr: float = 0.01
    milestones: tuple[int, ...] = (10, 20)
    aff: AffConfig = field(default_factory=lambda: AffConfig(epochs=25, lr=0.1, weight_decay=1e-4, batch_size=512))

    def validate(self) -> None:
        _check(self.clusters >= 2, "finetune.postprocess.clusters", self.clusters, "must be >= 2")
        _check(self.kmeans_iters >= 1, "finetune.postprocess.kmeans_iters", self.kmeans_iters, "must be >= 1")
        _check(self.lp_epochs >= 0, "finetune.postprocess.lp_epochs", self.lp_epochs, "must be >= 0")
        _check(self.lp_lr > 0, "finetune.postprocess.lp_lr", self.lp_lr, "must be > 0")
        _check(all(m >= 1 for m in self.milestones), "finetune.postprocess.milestones", self.milestones,
               "must be epochs >= 1")
        self.aff.validate()


@dataclass
class FinetuneConfig:
    """Phase 2: SLF/ALF linear heads on the frozen encoder, or AFF (encoder and head), epoch chosen on a held-out split."""
    protocols: tuple[Literal["slf", "alf", "aff"], ...] = ("slf", "alf")
    branch: Literal["headline", "benign", "adversarial"] = "headline"
    epochs: int = 25
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 512
    train_limit: int | None = None     # train heads on at most N training images
    alf_train_limit: int | None = None  # ALF only: at most N images (each costs a PGD attack per epoch)
    val_limit: int = 1000              # validation images used for epoch selection
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(8 / 255, 0.007, 10))
    aff: AffConfig = field(default_factory=AffConfig)
    # run before the protocols (DynACL++: lp-aff); null by default so configs stored before it compare equal
    postprocess: PostprocessConfig | None = None

    def validate(self) -> None:
        _check(self.epochs >= 1, "finetune.epochs", self.epochs, "must be >= 1")
        _check(self.lr > 0, "finetune.lr", self.lr, "must be > 0")
        _check(0 <= self.momentum < 1, "finetune.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0, "finetune.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(set(self.protocols)) == len(self.protocols), "finetune.protocols", self.protocols,
               "must not repeat a protocol")
        _check(self.batch_size >= 1, "finetune.batch_size", self.batch_size, "must be >= 1")
        _check(self.val_limit >= 1, "finetune.val_limit", self.val_limit, "must be >= 1")
        for key in ("train_limit", "alf_train_limit"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"finetune.{key}", value, "must be >= 1 or null")
        _check(len(self.protocols) > 0, "finetune.protocols", self.protocols, "must name at least one of slf, alf, aff")
        self.attack.validate("finetune.attack")
        self.aff.validate()


EvalAttack = Literal["pgd", "cw", "pgd-l2", "autoattack"]


@dataclass
class EvalConfig:
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(8 / 255, 2 / 255, 20))
    # attacks reported in results.json's `robust` map: PGD (cross-entropy, L-inf, `attack`), CW (the
    # margin loss, same budget), PGD-L2 (budget `l2`), standard AutoAttack (L-inf, `attack.eps`, the
    # official pyautoattack code); the eps curve and integrity checks use PGD
    attacks: tuple[EvalAttack, ...] = ("pgd",)
    l2: AttackConfig = field(default_factory=lambda: AttackConfig(0.5, 0.0625, 20))
    restarts: int = 1                  # PGD/CW/L2: an image is robust only if it survives every restart
    eps_curve: tuple[float, ...] = ()  # extra eps values for the robustness curve (PGD, same steps)
    steps_curve: tuple[int, ...] = ()  # PGD step counts for the accuracy-vs-steps curve (same eps, alpha)
    mixed_reading: bool = False        # also report the reference protocol's labelled clean-benign/robust-adv reading
    limit: int | None = None           # evaluate on a seeded random subset of this many test images
    # the integrity checks and AutoAttack on the first N of the evaluated images (a random subset of
    # them, since those are in random order), null: all; PGD and the curves always use every evaluated image
    checks_limit: int | None = None
    autoattack_limit: int | None = None
    subset_seed: int = 0               # picks that subset: fixed across training seeds, so runs are paired
    batch_size: int = 500
    # fp32 by default even where bf16 is native: attacks in low precision can under-report robustness.
    # auto follows the device like train.precision.
    precision: Literal["auto", "fp32", "bf16"] = "fp32"

    def validate(self) -> None:
        self.attack.validate("eval.attack")
        self.l2.validate("eval.l2")
        _check("pgd" in self.attacks, "eval.attacks", self.attacks, "must include pgd (the curve and checks use it)")
        _check(len(set(self.attacks)) == len(self.attacks), "eval.attacks", self.attacks, "must not repeat an attack")
        _check(self.attack.eps > 0, "eval.attack.eps", self.attack.eps, "must be > 0 (eps 0 is clean accuracy)")
        _check(self.restarts >= 1, "eval.restarts", self.restarts, "must be >= 1")
        _check(self.restarts == 1 or self.attack.random_start, "eval.restarts", self.restarts,
               "needs eval.attack.random_start=true (restarts without a random start repeat the same attack)")
        _check(all(0 <= e <= 1 for e in self.eps_curve), "eval.eps_curve", self.eps_curve, LINF_RANGE)
        _check(all(k >= 1 for k in self.steps_curve), "eval.steps_curve", self.steps_curve, "must be >= 1")
        _check(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "must be >= 1 or null")
        for key in ("checks_limit", "autoattack_limit"):
            value = getattr(self, key)
            _check(value is None or value >= 20, f"eval.{key}", value, "must be >= 20 or null (all evaluated images)")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")


@dataclass
class DiagnosticsConfig:
    """Phase-1 health checks every `every` optimiser steps on the held-out validation split (0: off).

    Measures cosine k-NN accuracy (exp(cos/knn_temperature)-weighted votes of the k nearest bank
    features), the same under a `attack_steps`-step PGD feature attack (eps: the method's attack eps,
    else `eps`), and the critic's benign-vs-adversarial accuracy. Warning rules and thresholds:
    critic_high for critic_high_checks checks (D overfits), within critic_chance for the first
    critic_chance_checks checks (D not learning), a loss term above loss_rise x its minimum or
    non-decreasing over loss_rising_checks checks once loss_warmup_checks have passed (diverging),
    robust k-NN below (1 - robust_drop) x its best or below robust_floor x chance while clean k-NN is
    above clean_floor x chance (catastrophic overfitting). See robustcl/train/diagnostics.py.
    """
    every: int = 0                      # optimiser steps between checks (and one at the end); 0 disables
    k: int = 20
    knn_temperature: float = 0.07       # vote weight exp(cos / T) (Wu et al. 2018)
    bank: int = 2000                    # feature-bank images (validation split)
    queries: int = 500                  # query images (validation split, disjoint from the bank)
    attack_batch: int = 128             # queries attacked for the robust k-NN and the critic check
    attack_steps: int = 3
    eps: float = 8 / 255                # used only when the method has no attack of its own
    critic_high: float = 0.95
    critic_high_checks: int = 2
    critic_chance: tuple[float, float] = (0.45, 0.55)
    critic_chance_checks: int = 3
    loss_rise: float = 1.5
    loss_warmup_checks: int = 3
    loss_rising_checks: int = 6
    loss_ignore: tuple[str, ...] = ("divergence", "critic_loss", "critic_acc")  # min-max game terms, not minimised
    robust_drop: float = 0.5
    robust_floor: float = 1.5           # x chance
    clean_floor: float = 3.0            # x chance
    on_collapse: Literal["warn", "stop"] = "warn"  # catastrophic-overfitting guard: stop keeps the last checkpoint

    def validate(self) -> None:
        for key in ("every", "loss_warmup_checks"):
            _check(getattr(self, key) >= 0, f"diagnostics.{key}", getattr(self, key), "must be >= 0")
        for key in ("k", "bank", "queries", "attack_batch", "attack_steps", "critic_high_checks",
                    "critic_chance_checks"):
            _check(getattr(self, key) >= 1, f"diagnostics.{key}", getattr(self, key), "must be >= 1")
        _check(self.knn_temperature > 0, "diagnostics.knn_temperature", self.knn_temperature, "must be > 0")
        _check(0 <= self.eps <= 1, "diagnostics.eps", self.eps, LINF_RANGE)
        _check(0 < self.critic_high <= 1, "diagnostics.critic_high", self.critic_high, "must be in (0, 1]")
        lo, hi = self.critic_chance
        _check(0 <= lo <= hi <= 1, "diagnostics.critic_chance", self.critic_chance, "must satisfy 0 <= low <= high <= 1")
        _check(self.loss_rise > 1, "diagnostics.loss_rise", self.loss_rise, "must be > 1")
        _check(self.loss_rising_checks >= 2, "diagnostics.loss_rising_checks", self.loss_rising_checks, "must be >= 2")
        _check(self.on_collapse == "warn" or self.every > 0, "diagnostics.on_collapse", self.on_collapse,
               "needs diagnostics.every > 0 (the guard acts on the held-out robust k-NN checks)")
        _check(0 < self.robust_drop < 1, "diagnostics.robust_drop", self.robust_drop, "must be in (0, 1)")
        for key in ("robust_floor", "clean_floor"):
            _check(getattr(self, key) > 0, f"diagnostics.{key}", getattr(self, key), "must be > 0")


@dataclass
class ReferenceConfig:
    """The authors' code where it departs from the paper's description, one named switch each, all off.

    Each switch reproduces one thing their public code does (docs/reproducing.md says what, where, and
    why robustcl's default differs); presets `*-reference` turn them all on.
    """
    projection_only_shortcut: bool = False  # ResNet: blocks add only a projection shortcut, identity blocks no residual
    imagenet_normalisation: bool = False    # inputs normalised with ImageNet's mean/std instead of the dataset's
    sam_reached_only: bool = False          # SAM's step skips parameters the SAM terms do not reach (adversarial BN frozen)
    sam_pass_updates_bn: bool = False       # BN running statistics also move in SAM's pass at theta + e (their AdvCL + ours)
    unclipped_start: bool = False           # PGD's random start is not clipped to [0, 1] before the first step
    schedule: bool = False                  # warm-up lr set after each step (the first runs at full lr); cosine per epoch
    critic_schedule: bool = False           # the critic's lr follows the encoder's schedule (warm-up, cosine) from critic.lr
    advcl_separate_forwards: bool = False   # AdvCL: every view its own benign-branch forward (own BN batch statistics)
    advcl_supcon_scale: bool = False        # AdvCL: contrastive and benign terms x tau / 0.07 (SupConLoss's base temperature)
    advcl_raw_high_frequency: bool = False  # AdvCL: HF(x) fed as the signed high-pass, not min-max scaled into [0, 1]
    evaluation: bool = False                # also their linear reading: epoch picked on TEST robust accuracy, mixed branches
    test_attack: AttackConfig = field(default_factory=lambda: AttackConfig(0.0314, 0.00314, 20))  # that reading's PGD

    def validate(self) -> None:
        self.test_attack.validate("reference.test_attack")

    def check_applies(self, cfg: "Config") -> None:
        """A switch that cannot act on this config is a one-line error (not silently ignored)."""
        _check(not self.projection_only_shortcut or cfg.model.arch != "convnet", "reference.projection_only_shortcut",
               True, "applies to model.arch=resnet18/resnet50 only (the ConvNet has no shortcuts); drop it")
        for key in ("advcl_separate_forwards", "advcl_supcon_scale", "advcl_raw_high_frequency"):
            _check(not getattr(self, key) or cfg.method.name == "advcl", f"reference.{key}", True,
                   f"applies to method.name=advcl only (this config trains {cfg.method.name}); drop it")


OFF = ReferenceConfig()


def reference_switches(cfg: "Config") -> ReferenceConfig:
    """cfg's reference switches (all off when the config has no `reference` section)."""
    return cfg.reference if cfg.reference is not None else OFF


@dataclass
class Config:
    name: str = "custom"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None                # the method's own dataclass, chosen by method.name
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # the authors' code's departures, as switches (null: none; not {} so configs stored before it compare equal on resume)
    reference: ReferenceConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (tuples as lists) for YAML/JSON."""
        return _plain(dataclasses.asdict(self))


# ------------------------------------------------------------------------------------ conversion
def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config value {key}={value!r} {why}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _parse_float(value: Any, key: str) -> float:
    """Accept numbers and fraction strings such as '8/255'."""
    if isinstance(value, bool):
        raise ConfigError(f"config key {key} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"config key {key} must be a number (or a fraction like 8/255), got {value!r}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        for option in inner:  # e.g. `int | Literal["auto"]`: the first type that accepts the value
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        names = [" or ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal else a.__name__
                 for a in inner]
        raise ConfigError(f"config key {key} must be {' or '.join(names)}{' or null' if type(None) in args else ''}; "
                          f"got {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and ("off" in args or "on" in args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"config key {key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key {key} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float:
        return _parse_float(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def build(cls: type, mapping: Any, prefix: str = "") -> Any:
    """Convert a mapping into dataclass `cls`, rejecting unknown keys with a suggestion."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section {prefix or '<root>'} must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key {full}{hint}")
        kwargs[key] = _convert(hints[key], value, full)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate) and cls is not AttackConfig:
        validate()
    return obj


# --------------------------------------------------------------------------------------- presets
PRESET_PACKAGE = "robustcl.presets"


def list_presets() -> dict[str, str]:
    """Preset name -> first comment line (its description and source)."""
    out = {}
    for entry in sorted(resources.files(PRESET_PACKAGE).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            out[entry.name[:-5]] = first.lstrip("# ").strip()
    return out


def _read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; give a preset name (robustcl configs) or a YAML path")
        try:
            text, origin = path.read_text(encoding="utf-8"), str(path)
        except (UnicodeDecodeError, OSError) as exc:
            why = "is not a text file (a checkpoint or another binary file?)" if isinstance(exc, UnicodeDecodeError) \
                else f"cannot be read ({exc.strerror or exc})"
            raise ConfigError(f"config file {path} {why}; give a YAML config or a preset name (robustcl configs)") \
                from None
    else:
        entry = resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"
        if not entry.is_file():
            known = ", ".join(list_presets())
            raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {known}")
        text, origin = entry.read_text(), f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a YAML mapping at the top level")
    return data, origin


SCHEDULE_PACKAGE = "robustcl.presets.schedules"


def list_schedules() -> dict[str, str]:
    """Phase-2 schedule preset name -> its first comment line (what it is and where it comes from)."""
    return {entry.name[:-5]: entry.read_text().splitlines()[0].lstrip("# ").strip()
            for entry in sorted(resources.files(SCHEDULE_PACKAGE).iterdir(), key=lambda p: p.name)
            if entry.name.endswith(".yaml")}


def schedule_overrides(name: str) -> list[str]:
    """A schedule preset as `finetune.key=value` overrides, to apply on top of a run's config."""
    entry = resources.files(SCHEDULE_PACKAGE) / f"{name}.yaml"
    if not entry.is_file():
        raise ConfigError(f"unknown schedule {name!r}; known schedules: {', '.join(list_schedules())}")
    data = yaml.safe_load(entry.read_text()) or {}

    def flatten(node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict):
                out += flatten(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
        return out
    return flatten(data, "")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_extends(name_or_path: str, depth: int = 0) -> dict[str, Any]:
    if depth > 8:
        raise ConfigError(f"config {name_or_path}: 'extends' chain is too deep (a cycle?)")
    data, _ = _read_yaml(name_or_path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _resolve_extends(str(parent), depth + 1)
    child_method = data.get("method") or {}
    if "name" in child_method and child_method["name"] != (base.get("method") or {}).get("name"):
        base.pop("method", None)  # another method: its section replaces the parent's, not merges
    return _merge(base, data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a raw mapping."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=0.1")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or a section stored as null (e.g. `reference: null`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def from_mapping(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a raw mapping (the method section by its registered schema)."""
    from robustcl.methods import method_config_class  # methods own their config schema

    data = dict(data)
    method = data.pop("method", None) or {}
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError("config needs method.name (e.g. method.name=gbrcl); see `robustcl configs`")
    cfg = build(Config, data)
    cfg.method = build(method_config_class(str(method["name"])), method, "method")
    if cfg.reference is not None:
        cfg.reference.check_applies(cfg)
    _check(cfg.data.val_size >= 1 or not (cfg.finetune.protocols or cfg.diagnostics.every), "data.val_size",
           cfg.data.val_size, "must be >= 1: phase-2 epoch selection and diagnostics use the held-out split")
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply `key=value` overrides in order to a raw mapping; a method.name override to another method
    drops the old method's settings first."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "method.name" and value.strip() != str((data.get("method") or {}).get("name")):
            data["method"] = {}  # another method: the preset's method settings do not apply to it
    for item in overrides:
        apply_override(data, item)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply `key=value` overrides, validate."""
    data = _resolve_extends(name_or_path)
    apply_overrides(data, overrides)
    return from_mapping(data)


def first_difference(a: Any, b: Any, prefix: str = "", ignore: tuple[str, ...] = ()) -> str | None:
    """The first dotted key where two plain mappings differ, as 'key: old -> new' (None when equal).

    Keys equal to or under an entry of `ignore` (e.g. 'train.device', 'eval') are skipped.
    """
    if prefix and any(prefix == k or prefix.startswith(k + ".") for k in ignore):
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key), ignore)
            if found:
                return found
        return None
    return None if a == b else f"{prefix}: {a!r} -> {b!r}"


# Settings that do not change what phase 1 computes: a resumed run may change these.
PHASE1_FREE = ("name", "train.device", "train.threads", "train.log_every", "train.checkpoint_every",
               "train.loggers", "train.wandb_project", "diagnostics", "finetune", "eval", "reference.evaluation",
               "reference.test_attack")


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory stores in config.yaml)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
