"""Where and how a run computes: its device, and a config with `auto` precision and threads resolved for it.

Plain functions on a `Config` (this module sits just above the config and `robustcl.hardware`, which
says what the machine can do): both phases, evaluation, bench and the sweep resolve a run's runtime here.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from robustcl.config import Config, ConfigError
from robustcl.hardware import resolve_precision, resolve_threads


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


__all__ = ["resolve_device", "resolve_runtime", "started_config"]
