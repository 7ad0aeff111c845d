"""The schema of a run's configuration: one dataclass per section, each validating its own values.

The conversion from YAML (types, unknown keys, overrides) is `robustcl.config.engine`; the shipped
presets and `extends` are `robustcl.config.presets`. The method section's dataclass belongs to the
method (`robustcl.methods`), chosen by method.name from the registry (`robustcl.config.registry`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from robustcl.config.engine import CODE_ONLY, SEED, ConfigError, build, plain
from robustcl.config.engine import check as _check
from robustcl.config.registry import method_config_class


@dataclass
class SyntheticConfig:
    """data.name=synthetic: class-structured random images made in memory (robustcl/data/synthetic.py)."""
    num_classes: int = 10            # classes, each a fixed smooth prototype image
    channels: int = 1                # channels per image (1: grey, 3: colour)
    size: int = 28                   # height = width in pixels
    n_train: int = 2000              # training images (the validation split, data.val_size, comes out of them)
    n_test: int = 500                # test images


@dataclass
class DataConfig:
    """The dataset: which one, where its files are, and how much of it a run uses."""
    name: str = "fashion-mnist"      # fashion-mnist, cifar10, cifar100, stl10, imagefolder or synthetic
    root: str | None = None          # directory of its files (null: the cache ~/.cache/robustcl/<name>, system dirs)
    download: bool = False           # download (md5-checked, into the cache) when the files are not found
    val_size: int = 5000          # held out from the training split for phase-2 epoch selection
    train_limit: int | None = None  # use only the first N (shuffled) training images in phase 1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Reader options, e.g. data.options.size=32 for stl10/imagefolder. None (not {}) by default so configs
    # stored before this field existed still compare equal on resume.
    options: dict[str, Any] | None = None

    def reader_options(self, seed: int | None = None) -> dict[str, Any]:
        """What the dataset's reader is given: the synthetic section (name synthetic, with the run's `seed`
        when given), then data.options. The one place these are merged."""
        options: dict[str, Any] = {}
        if self.name == "synthetic":
            options.update(vars(self.synthetic))
            if seed is not None:
                options["seed"] = seed
        return {**options, **(self.options or {})}

    def validate(self) -> None:
        _check(self.val_size >= 0, "data.val_size", self.val_size, "must be >= 0")
        _check(self.train_limit is None or self.train_limit > 0, "data.train_limit", self.train_limit, "must be > 0 or null")
        if self.options:
            from robustcl.data import DataError
            from robustcl.data import dataset_options

            try:
                dataset_options(self.name, self.options)
            except DataError as exc:
                raise ConfigError(f"config value data.options: {exc}") from None


# One definition of the views' parameters: the config sections views.strong / views.weak, and what
# robustcl.views.strong_view / weak_view take (robustcl.views re-exports these classes).
def check_range(name: str, lo: float, hi: float, min_value: float = 0.0) -> None:
    """Raise if (lo, hi) is not an ordered range above `min_value` (catches swapped configs early)."""
    if not (min_value <= lo <= hi):
        raise ValueError(f"{name} must satisfy {min_value} <= lo <= hi, got ({lo}, {hi})")


def check_prob(name: str, p: float) -> None:
    """Raise if `p` is not a probability."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def check_kernel(kernel: int) -> None:
    """Raise if the blur kernel size is not a positive odd integer (as torchvision requires)."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {kernel}")


def check_jitter(brightness: float, contrast: float, saturation: float, hue: float) -> None:
    """Raise on negative jitter strengths or a hue strength above 0.5 (torchvision's limits)."""
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if value < 0:
            raise ValueError(f"{name} jitter must be >= 0, got {value}")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")


@dataclass(frozen=True)
class StrongViewConfig:
    """Parameters of the SimCLR-style strong view (torchvision defaults for CIFAR-scale images); config section
    views.strong. crop_ratio and blur_kernel are settable in code only (not config keys)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)  # random resized crop: range of the crop's area fraction
    crop_ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata=CODE_ONLY)
    flip_p: float = 0.5                           # probability of a horizontal flip
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8                         # probability of applying the colour jitter
    gray_p: float = 0.2                           # probability of converting to greyscale
    blur_p: float = 0.5                           # probability of a Gaussian blur (3x3 kernel)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # range the blur's sigma is drawn from, uniformly
    blur_kernel: int = field(default=3, metadata=CODE_ONLY)

    def __post_init__(self) -> None:
        """Validate at construction so a bad preset fails before training starts."""
        self.validate()

    def validate(self) -> None:
        """One-line ConfigError (a ValueError) naming the views.strong key at fault."""
        lo, hi = self.crop_scale
        _check(0 < lo <= hi <= 1, "views.strong.crop_scale", self.crop_scale, "must satisfy 0 < min <= max <= 1")
        for key in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            _check(0 <= getattr(self, key) <= 1, f"views.strong.{key}", getattr(self, key), "must be a probability in [0, 1]")
        try:
            self._check_view()
        except ValueError as exc:
            raise ConfigError(f"config section views.strong: {exc}") from None

    def _check_view(self) -> None:
        """The view functions' own limits (ValueError)."""
        check_range("crop_scale", *self.crop_scale)
        if self.crop_scale[1] > 1.0 or self.crop_scale[0] <= 0.0:
            raise ValueError(f"crop_scale must lie in (0, 1], got {self.crop_scale}")
        check_range("crop_ratio", *self.crop_ratio)
        if self.crop_ratio[0] <= 0.0:
            raise ValueError(f"crop_ratio must be positive, got {self.crop_ratio}")
        check_jitter(*self.jitter)
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            check_prob(name, getattr(self, name))
        check_range("blur_sigma", *self.blur_sigma)
        if self.blur_sigma[0] <= 0.0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma}")
        check_kernel(self.blur_kernel)


@dataclass(frozen=True)
class WeakViewConfig:
    """Parameters of the weak view: torchvision RandomCrop(padding) + RandomHorizontalFlip(flip_p); config
    section views.weak."""

    padding: int = 4        # zero padding before the random crop back to the original size
    flip_p: float = 0.5     # probability of a horizontal flip

    def __post_init__(self) -> None:
        """Validate at construction so a bad preset fails before training starts."""
        self.validate()

    def validate(self) -> None:
        """One-line ConfigError (a ValueError) naming the views.weak key at fault."""
        _check(self.padding >= 0, "views.weak.padding", self.padding, "must be >= 0")
        _check(0 <= self.flip_p <= 1, "views.weak.flip_p", self.flip_p, "must be a probability in [0, 1]")


@dataclass
class ViewsConfig:
    """The two augmentations phase 1 draws: strong (SimCLR's) and weak (pad-crop-flip)."""
    strong: StrongViewConfig = field(default_factory=StrongViewConfig)
    weak: WeakViewConfig = field(default_factory=WeakViewConfig)


@dataclass
class ModelConfig:
    """The encoder f (dual-BN ResNet or small ConvNet), the projection head g and the critic D."""
    arch: Literal["convnet", "resnet18", "resnet50"] = "resnet18"  # the encoder's architecture
    widths: tuple[int, ...] = (32, 64, 128, 256)   # convnet only
    proj_dim: int = 128             # output dimension of the projection head g (and input of the critic)
    critic_hidden: int = 0          # hidden units of the critic D (0: a linear critic)
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
    eps: float = 8 / 255          # radius in pixel units: L-inf (L2 for eval.l2)
    alpha: float = 2 / 255        # step size of each PGD step
    steps: int = 7                # PGD steps
    random_start: bool = True     # start from a uniform random point of the eps-ball (else from the input)
    mode: Literal["pgd", "fgsm-rs", "free"] = "pgd"  # pgd, fgsm-rs or free (the last two: phase 1 only)
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


# torch's thread pool: 100,000 threads crashed the process (SIGSEGV, torch 2.13); no machine this runs on has 1,024 cores
MAX_THREADS = 1024

@dataclass
class TrainConfig:
    """Phase 1: SGD with linear warm-up and cosine decay, precision, device, threads, logging and checkpoints."""
    batch_size: int = 512            # images per optimiser step (the global batch across processes)
    epochs: int = 500                # passes over the training split
    max_steps: int | None = None     # stop after this many optimiser steps (overrides epochs)
    lr: float = 0.5                  # peak learning rate of the encoder's SGD (after warm-up)
    momentum: float = 0.9            # SGD momentum
    weight_decay: float = 1e-4       # SGD weight decay
    warmup_epochs: float = 10        # linear warm-up of the learning rate over these epochs
    min_lr: float = 1e-8             # the cosine decay's final learning rate
    # auto: bf16 autocast where the device computes bf16 natively (CUDA with bf16, AVX512-BF16/AMX CPU), else
    # fp32 (robustcl/hardware.py); resolved once when a run starts and stored resolved in its config.yaml
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = False      # channels-last memory format for phase 1's weights and images
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    # torch intra-op threads on CPU: auto = the cores this process may use (affinity, cgroup quota) divided
    # among torchrun's local ranks; an integer; or null for torch's own default
    threads: int | Literal["auto"] | None = "auto"
    log_every: int = 20              # optimiser steps between metrics.jsonl lines (and one at every epoch end)
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
        _check(not isinstance(self.threads, int) or 1 <= self.threads <= MAX_THREADS, "train.threads", self.threads,
               f"must be in 1..{MAX_THREADS}, auto (the cores this process may use) or null (torch's default)")
        _check(len(set(self.loggers)) == len(self.loggers), "train.loggers", self.loggers, "must not repeat a logger")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "train.device", self.device, "must be auto, cpu, cuda or cuda:N")


@dataclass
class AffConfig:
    """AFF: full adversarial fine-tuning of encoder + head (TRADES or PGD-AT), epoch chosen on validation PGD."""
    loss: Literal["trades", "pgd-at"] = "trades"  # TRADES (Zhang et al. 2019) or PGD-AT (Madry et al. 2018)
    beta: float = 6.0                  # TRADES: CE(f(x), y) + beta * KL(f(x) || f(x'))
    epochs: int = 25                   # fine-tuning epochs (the best on validation PGD accuracy is kept)
    lr: float = 0.1                    # SGD learning rate of encoder and head
    momentum: float = 0.9              # SGD momentum
    weight_decay: float = 5e-4         # SGD weight decay
    batch_size: int = 128              # images per step
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
    """Encoder post-processing before the protocols: lp-aff is DynACL++'s (robustcl/train/lp_aff.py `lp_aff`).

    k-means pseudo-labels of the benign-branch features, `lp_epochs` of linear probing, then `aff.epochs` of
    adversarial full fine-tuning on them (lr x 0.1 at each of `milestones`); every protocol starts from the result.
    """
    name: Literal["none", "lp-aff"] = "none"  # none, or lp-aff: DynACL++'s pseudo-label LP then AFF
    clusters: int = 10                        # k of the k-means pseudo-labels (the authors' 10, also on CIFAR-100)
    kmeans_iters: int = 100                   # Lloyd iterations of the k-means
    lp_epochs: int = 10                       # linear-probing epochs on the pseudo-labels (encoder frozen)
    lp_lr: float = 0.01                       # linear-probing learning rate
    milestones: tuple[int, ...] = (10, 20)    # AFF epochs after which its lr is multiplied by 0.1
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
    protocols: tuple[Literal["slf", "alf", "aff"], ...] = ("slf", "alf")  # the phase-2 models fitted by default
    # the encoder's BN branch the heads read: headline (the one the method is reported through), benign or adversarial
    branch: Literal["headline", "benign", "adversarial"] = "headline"
    epochs: int = 25                   # SLF/ALF head epochs (the best on the validation split is kept)
    lr: float = 0.01                   # SLF/ALF heads' SGD learning rate
    momentum: float = 0.9              # SLF/ALF heads' SGD momentum
    weight_decay: float = 5e-4         # SLF/ALF heads' SGD weight decay
    batch_size: int = 512              # SLF/ALF images per step
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
DEFAULT_CORRUPTIONS_LIMIT = 1000  # docs/corruptions.md "What it costs" measured the evaluation that set it


@dataclass
class EvalConfig:
    """Evaluation: clean and robust test accuracy of each fitted model, the curves and the integrity checks."""
    attack: AttackConfig = field(default_factory=lambda: AttackConfig(8 / 255, 2 / 255, 20))  # the headline PGD (L-inf)
    # attacks reported in results.json's `robust` map: PGD (cross-entropy, L-inf, `attack`), CW (the
    # margin loss, same budget), PGD-L2 (budget `l2`), standard AutoAttack (L-inf, `attack.eps`, the
    # official pyautoattack code); the eps curve and integrity checks use PGD
    attacks: tuple[EvalAttack, ...] = ("pgd",)
    l2: AttackConfig = field(default_factory=lambda: AttackConfig(0.5, 0.0625, 20))  # PGD-L2's budget (attacks: pgd-l2)
    restarts: int = 1                  # PGD/CW/L2: an image is robust only if it survives every restart
    eps_curve: tuple[float, ...] = ()  # extra eps values for the robustness curve (PGD, same steps)
    steps_curve: tuple[int, ...] = ()  # PGD step counts for the accuracy-vs-steps curve (same eps, alpha)
    mixed_reading: bool = False        # also report the reference protocol's labelled clean-benign/robust-adv reading
    limit: int | None = None           # evaluate on a seeded random subset of this many test images
    # the integrity checks on the first N of the evaluated images (a random subset of them, since those are in
    # random order), null: all; PGD and the curves always use every evaluated image
    checks_limit: int | None = None
    autoattack_limit: int | None = None  # AutoAttack on the first N of the evaluated images, as checks_limit
    subset_seed: int = field(default=0, metadata=SEED)  # picks that subset: fixed across training seeds (paired runs)
    batch_size: int = 500              # images per forward/attack batch
    # fp32 by default even where bf16 is native: attacks in low precision can under-report robustness.
    # auto follows the device like train.precision.
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # common corruptions (docs/corruptions.md): a list of names, or all (the benchmark's 15); empty: off.
    # The mean over them and the severities is the benchmark's corruption accuracy (CA)
    corruptions: tuple[str, ...] | Literal["all"] = ()
    corruption_severities: tuple[int, ...] = (1, 2, 3, 4, 5)  # severities 1..5 evaluated
    # corrupted images per corruption and severity: a seeded random subset of the evaluated images, null: all
    corruptions_limit: int | None = DEFAULT_CORRUPTIONS_LIMIT

    def corruption_names(self) -> tuple[str, ...]:
        """eval.corruptions with "all" read as the 15 standard corruptions, in CIFAR-10-C's order."""
        from robustcl.data.corruptions import STANDARD  # the names live with the corruptions (data layer)

        names = (self.corruptions,) if isinstance(self.corruptions, str) else self.corruptions
        out = [n for name in names for n in (STANDARD if name == "all" else (name,))]
        return tuple(dict.fromkeys(out))

    def validate(self) -> None:
        self.validate_corruptions()
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

    def validate_corruptions(self) -> None:
        """One-line ConfigErrors for an unknown corruption name, a severity outside 1..5, a limit below 1."""
        from robustcl.data.corruptions import ALL

        names = (self.corruptions,) if isinstance(self.corruptions, str) else self.corruptions
        valid = ("all", *ALL)
        unknown = [n for n in names if n not in valid]
        _check(not unknown, "eval.corruptions", self.corruptions,
               f"names unknown corruption(s) {', '.join(map(str, unknown))}; valid: {', '.join(valid)}")
        severities = self.corruption_severities
        _check(bool(severities) and all(isinstance(s, int) and 1 <= s <= 5 for s in severities),
               "eval.corruption_severities", severities, "must be severities in 1..5 (e.g. [1, 2, 3, 4, 5])")
        _check(len(set(severities)) == len(severities), "eval.corruption_severities", severities,
               "must not repeat a severity")
        _check(self.corruptions_limit is None or self.corruptions_limit >= 1, "eval.corruptions_limit",
               self.corruptions_limit, "must be >= 1 or null (all evaluated images)")


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
    k: int = 20                         # neighbours voting in the k-NN probe
    knn_temperature: float = 0.07       # vote weight exp(cos / T) (Wu et al. 2018)
    bank: int = 2000                    # feature-bank images (validation split)
    queries: int = 500                  # query images (validation split, disjoint from the bank)
    attack_batch: int = 128             # queries attacked for the robust k-NN and the critic check
    attack_steps: int = 3               # PGD steps of the feature attack for the robust k-NN
    eps: float = 8 / 255                # used only when the method has no attack of its own
    critic_high: float = 0.95           # critic accuracy >= this for critic_high_checks checks in a row: D overfits
    critic_high_checks: int = 2         # checks in a row at or above critic_high before that warning
    critic_chance: tuple[float, float] = (0.45, 0.55)  # accuracy in this range for critic_chance_checks: D not learning
    critic_chance_checks: int = 3       # first checks (and still) inside critic_chance before that warning
    loss_rise: float = 1.5              # a loss term above this x its minimum so far warns: diverging
    loss_warmup_checks: int = 3         # checks before the loss rules apply
    loss_rising_checks: int = 6         # a loss term non-decreasing (and up) over this many checks warns
    loss_ignore: tuple[str, ...] = ("divergence", "critic_loss", "critic_acc")  # min-max game terms, not minimised
    robust_drop: float = 0.5            # robust k-NN below (1 - this) x its best warns of a collapse
    robust_floor: float = 1.5           # robust k-NN below this x chance, clean above clean_floor x chance: collapse
    clean_floor: float = 3.0            # clean k-NN above this x chance, robust below robust_floor x chance: collapse
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


REFERENCE_SWITCHES_OFF = ReferenceConfig()  # the reference mode switched off: robustcl's own behaviour throughout


def reference_switches(cfg: "Config") -> ReferenceConfig:
    """cfg's reference switches (all off when the config has no `reference` section)."""
    return cfg.reference if cfg.reference is not None else REFERENCE_SWITCHES_OFF


@dataclass
class Config:
    """A run's whole configuration (what its config.yaml stores)."""
    name: str = "custom"              # the run's name: its default directory is runs/<name>
    seed: int = field(default=0, metadata=SEED)  # seeds the initial weights, the train/validation split, views, attacks
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
        return plain(self)


def from_mapping(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a raw mapping (the method section by its registered schema: the
    methods must be registered first, `import robustcl.methods`)."""
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


# Settings that do not change what phase 1 computes: the config keys (and sections) a resumed or continued
# phase-1 run may change.
CHANGEABLE_ON_RESUME = ("name", "train.device", "train.threads", "train.log_every", "train.checkpoint_every",
               "train.loggers", "train.wandb_project", "diagnostics", "finetune", "eval", "reference.evaluation",
               "reference.test_attack")
