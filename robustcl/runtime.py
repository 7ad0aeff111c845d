"""Where and how a run computes, and whether a config says what a run's stored one says.

`open_runtime` is the one place a command opens its runtime (device -> precision -> threads -> logger
libraries; with `train.threads: auto` on a CPU it installs the thread governor that `pace_threads` consults
between batches); `config_change` the one place a config is held against a run's stored config.yaml (resume,
sweep status, demo reuse, `--resume --config`). This module sits just above the config and
`robustcl.hardware`, which says what the machine can do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import yaml
from torch import nn

from robustcl.config import Config, ConfigError, dump_yaml, first_difference, from_mapping
from robustcl.hardware import FreeCores, local_ranks, resolve_precision, resolve_threads, threads_for
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
    """A copy of cfg with `auto` precision (train, eval) resolved for `device`; `threads: auto` stays `auto` (the
    count follows the machine's load while the command runs: `ThreadGovernor`).

    `started` is the stored config of a run that already began: an `auto` precision keeps the value
    that run started with, so a resumed run never switches precision half-way.
    """
    before = (started or {}).get("train", {}).get("precision")
    train_precision = cfg.train.precision
    if train_precision == "auto" and before in ("fp32", "bf16"):
        train_precision = before
    train = dataclasses.replace(cfg.train, precision=resolve_precision(train_precision, device))
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
    """What a command computes with: its config (`auto` precision resolved) and its device."""
    cfg: Config
    device: torch.device


class ThreadGovernor:
    """`train.threads: auto` on a CPU: torch's intra-op thread count follows the cores other processes leave
    free, re-decided at most every `interval` seconds between batches. Two threads on two cores beside one
    busy process spend most of each parallel op waiting for the sibling the scheduler took away (a PGD
    evaluation ran 3.6x slower, not the fair 2x: docs/performance.md); one thread then runs at a full core.
    Evaluation results do not depend on the count; a training run's last bits do (fix train.threads for
    bit-identical reruns)."""

    def __init__(self, limit: int, interval: float = 1.0, cores: FreeCores | None = None) -> None:
        self.limit, self.interval = limit, interval
        self.cores = cores if cores is not None else FreeCores()
        self.decided = time.monotonic()

    def start(self, window: float = 0.1) -> int:
        """The first count, from the load over a short `window`, set in torch."""
        time.sleep(window)
        free = self.cores.sample()
        threads = self.limit if free is None else threads_for(free, self.limit)
        torch.set_num_threads(threads)
        self.decided = time.monotonic()
        return threads

    def pace(self) -> int | None:
        """Between batches: the new count when it changed (set in torch), else None."""
        now = time.monotonic()
        if now - self.decided < self.interval:
            return None
        self.decided = now
        free = self.cores.sample()
        if free is None:
            return None
        before, wanted = torch.get_num_threads(), threads_for(free, self.limit)
        if wanted == before:
            return None
        torch.set_num_threads(wanted)  # a sweep worker's thread_cap may hold it lower
        after = torch.get_num_threads()
        return after if after != before else None


# The process's governor (torch's thread count is process-wide too): installed by open_runtime, None when the
# thread count is fixed.
_governor: ThreadGovernor | None = None


def torchrun_ranks() -> bool:
    """Several local ranks of one torchrun job: they step together, so each would count the others as outside
    load and their counts would swing in step; they keep resolve_threads' fixed share instead."""
    return local_ranks() > 1


@contextlib.contextmanager
def paced(module: nn.Module) -> Iterator[None]:
    """Within the block every forward of `module` first lets the governor re-decide (at most once per its
    interval): a long attack, a Square query loop or a feature pass adapts mid-way. Nothing without a governor."""
    if _governor is None:
        yield
        return
    handle = module.register_forward_pre_hook(lambda *_: pace_threads())
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def threads_as_found() -> Iterator[None]:
    """A command called from Python (a notebook, a script) leaves torch's thread count and the governor as it
    found them: a count chosen in a busy moment does not outlive the call and slow what the caller runs next."""
    global _governor
    threads, governor = torch.get_num_threads(), _governor
    try:
        yield
    finally:
        _governor = governor
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def governed() -> bool:
    """Whether `train.threads: auto` is following the load in this process now."""
    return _governor is not None


def pace_threads() -> int | None:
    """Called between batches by training and evaluation: the new thread count if `train.threads: auto` just
    changed it, else None (always None for a fixed count)."""
    return _governor.pace() if _governor is not None else None


def open_runtime(cfg: Config, stored: Mapping[str, Any] | None = None, *, threads: bool = True) -> Runtime:
    """Resolve the device, then precision and threads (an `auto` precision keeps what the `stored` run started
    with), set torch's intra-op threads (unless `threads` is False: the caller sets its own; `auto` on a CPU:
    the governor decides them now and between batches) and check that the configured logger libraries
    import: before any work, so a missing one fails first."""
    global _governor
    device = resolve_device(cfg.train.device)
    cfg = resolve_runtime(cfg, device, dict(stored) if stored is not None else None)
    governor, _governor = _governor, None
    if threads and cfg.train.threads:
        limit = resolve_threads(cfg.train.threads)
        assert isinstance(limit, int)
        if cfg.train.threads == "auto" and device.type == "cpu" and limit > 1 and not torchrun_ranks():
            if governor is None or governor.limit != limit:  # one already following this machine is kept
                governor = ThreadGovernor(limit)
                governor.start()
            _governor = governor
        else:
            torch.set_num_threads(limit)
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


__all__ = ["ONLY_THREADS", "Runtime", "ThreadGovernor", "comparable", "config_change", "governed", "open_runtime", "pace_threads",
           "paced", "resolve_device", "resolve_runtime", "started_config", "threads_as_found", "torchrun_ranks"]
