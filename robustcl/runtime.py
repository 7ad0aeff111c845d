"""Where and how a run computes, and whether a config says what a run's stored one says.

`open_runtime` is the one place a command opens its runtime (device -> precision -> threads -> logger
libraries); `config_change` the one place a config is held against a run's stored config.yaml (resume,
sweep status, demo reuse, `--resume --config`). This module sits just above the config and
`robustcl.hardware`, which says what the machine can do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from robustcl.config import Config, ConfigError, dump_yaml, first_difference, from_mapping
from robustcl.hardware import resolve_precision, resolve_threads
from robustcl.runs.loggers import check_loggers

# A run reused as it is (sweep status, demo) may differ from the config in its thread count alone; a resumed
# phase 1 may change more (robustcl.config.CHANGEABLE_ON_RESUME).
ONLY_THREADS = ("train.threads",)


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


@dataclass(frozen=True)
class Runtime:
    """What a command computes with: its config (`auto` precision and threads resolved) and its device."""
    cfg: Config
    device: torch.device


def open_runtime(cfg: Config, stored: Mapping[str, Any] | None = None, *, threads: bool = True) -> Runtime:
    """Resolve the device, then precision and threads (an `auto` precision keeps what the `stored` run started
    with), set torch's intra-op threads (unless `threads` is False: the caller sets its own) and check that
    the configured logger libraries import: before any work, so a missing one fails first."""
    device = resolve_device(cfg.train.device)
    cfg = resolve_runtime(cfg, device, dict(stored) if stored is not None else None)
    if threads and cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_loggers(cfg.train.loggers)
    return Runtime(cfg, device)


def comparable(data: Mapping[str, Any] | Config) -> dict[str, Any]:
    """A config (or a stored one) as plain YAML data through today's schema, so a setting added since a run was
    made compares at its default; stored data the schema refuses stays as it is (the comparison names the key)."""
    try:
        cfg = data if isinstance(data, Config) else from_mapping(dict(data))
    except ConfigError:
        return dict(data)  # type: ignore[arg-type]
    return yaml.safe_load(dump_yaml(cfg))


def config_change(stored: Mapping[str, Any], cfg: Config, may_change: Sequence[str] = ONLY_THREADS) -> str | None:
    """The first setting in which `cfg` differs from a run's `stored` config ("key: old -> new"), its `auto`
    settings resolved as that run resolved them; None when they agree outside `may_change`."""
    before = comparable(stored)
    try:
        cfg = resolve_runtime(cfg, resolve_device(cfg.train.device), before)
    except (RuntimeError, ConfigError):
        pass  # train.device=cuda without CUDA: the command that runs it says so
    return first_difference(before, comparable(cfg), ignore=tuple(may_change))


__all__ = ["ONLY_THREADS", "Runtime", "comparable", "config_change", "open_runtime", "resolve_device",
           "resolve_runtime", "started_config"]
