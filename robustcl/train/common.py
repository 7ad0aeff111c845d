"""Pieces both phases share: device, precision, data split, model construction."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from robustcl.config import Config, ConfigError, reference_switches
from robustcl.hardware import resolve_precision, resolve_threads
from robustcl.data import ArrayDataset, DataError, dataset_info, load_dataset
from robustcl.data.base import get_reader
from robustcl.methods import Method, method_class
from robustcl.models import Critic, ProjectionHead, build_encoder, resolve_stem


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto")
    return device


def resolve_runtime(cfg: Config, device: torch.device, started: dict[str, Any] | None = None) -> Config:
    """A copy of cfg with `auto` precision (train, eval) and threads resolved for `device`.

    `started` is the stored config of a run that already began: an `auto` precision keeps the value
    that run started with, so a resumed run never switches precision half-way.
    """
    before = (started or {}).get("train", {}).get("precision")
    train_precision = cfg.train.precision
    if train_precision == "auto" and before in ("fp32", "bf16"):
        train_precision = before
    train = dataclasses.replace(cfg.train, precision=resolve_precision(train_precision, device),
                                threads=resolve_threads(cfg.train.threads))
    eval_cfg = dataclasses.replace(cfg.eval, precision=resolve_precision(cfg.eval.precision, device, "eval.precision"))
    return dataclasses.replace(cfg, train=train, eval=eval_cfg)


def started_config(config_path: Path) -> dict[str, Any] | None:
    """The stored config.yaml of a run that already began (None if there is none or it does not parse)."""
    try:
        data = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def autocast_factory(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of autocast contexts (bf16 when asked or `auto` on a native-bf16 device, else a no-op)."""
    enabled = resolve_precision(precision, device) == "bf16" if precision == "auto" else precision == "bf16"
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def load_split(cfg: Config, split: str) -> ArrayDataset:
    """The configured dataset's split (synthetic options, then data.options, passed through)."""
    d = cfg.data
    options = vars(d.synthetic).copy() if d.name == "synthetic" else {}
    if d.name == "synthetic":
        options["seed"] = cfg.seed
    options.update(d.options or {})
    return load_dataset(d.name, split, root=d.root, download=d.download, **options)


def train_val_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of the training data: (train indices, held-out validation indices).

    The validation images are never seen in phase 1 and serve phase-2 epoch selection, so no
    choice is ever made on the test set.
    """
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images out of {n}; lower data.val_size")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[val_size:], perm[:val_size]


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
