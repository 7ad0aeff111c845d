"""Metric sinks (`train.loggers`): metrics.jsonl always, TensorBoard and Weights & Biases on request.

A record is what metrics.jsonl holds ({"phase": ..., "step" or "epoch": ..., values}); a sink turns
it into scalars "<phase>[/<protocol>]/<key>" (a series) against that step. Phase 1 logs "pretrain"
and "diagnostics" against the optimiser step, phase 2 "finetune/<protocol>" against the epoch,
evaluation "evaluate/<protocol>" against the encoder's phase-1 step.

Resume-aware, so a step shows once: a logger is opened with `purge_from`, and each TensorBoard
series it writes hides the points of earlier processes at steps >= purge_from (SummaryWriter's
purge_step; a resumed phase 1 passes its checkpoint's step + 1, as metrics.jsonl is truncated there).
W&B cannot hide points: the run id and the last step sent per series are kept in the run directory
(wandb-run.json), the W&B run is resumed under that id, and a resumed phase 1 skips the steps W&B
already received (a resume is exact, so they are the same values).
"""
from __future__ import annotations

import importlib.util
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from robustcl.runs.atomic import RunError, atomic_write_text
from robustcl.runs.layout import RunLayout
from robustcl.runs.rundir import RunDir

SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger name -> the package it needs
STEP_KEYS = ("step", "epoch")  # a record's x axis: the first of these it has
LABEL_KEYS = ("phase", "protocol")
WANDB_STATE = RunLayout.wandb_state.name
TENSORBOARD_DIR = RunLayout.tensorboard.name


class Sink(Protocol):
    """Where metric records go besides metrics.jsonl."""

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record's scalars."""

    def close(self) -> None:
        """Flush and release (files, processes)."""


def missing_package(name: str) -> RunError:
    """The one-line error for a logger whose library is not installed."""
    return RunError(f"train.loggers includes {name} but the {SINK_PACKAGES[name]} package is not installed; "
                    f"pip install 'robustcl[{name}]', or drop {name} from train.loggers")


def check_loggers(names: Iterable[str]) -> None:
    """Fail early (before a run writes anything) when a requested logger's library is absent."""
    for name in names:
        if name in SINK_PACKAGES and importlib.util.find_spec(SINK_PACKAGES[name]) is None:
            raise missing_package(name)


def series(record: Mapping[str, Any]) -> tuple[str, str, int] | None:
    """(series name, step key, step) of a record, or None for a record without phase or step."""
    step_key = next((k for k in STEP_KEYS if isinstance(record.get(k), int) and not isinstance(record[k], bool)), None)
    if "phase" not in record or step_key is None:
        return None
    name = str(record["phase"]) + (f"/{record['protocol']}" if "protocol" in record else "")
    return name, step_key, int(record[step_key])


def scalars(record: Mapping[str, Any], step_key: str, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a record (nested mappings as "a/b"), without its labels and step."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in (*LABEL_KEYS, step_key):
            continue
        if isinstance(value, Mapping):
            out.update(scalars(value, step_key, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardSink:
    """One event directory per series under <run>/tensorboard/, opened on its first record."""

    def __init__(self, root: Path, purge_from: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard") from None
        self.writer_class, self.root, self.purge_from = SummaryWriter, Path(root), purge_from
        self.writers: dict[str, Any] = {}

    def log(self, record: Mapping[str, Any]) -> None:
        found = series(record)
        if found is None:
            return
        name, step_key, step = found
        if name not in self.writers:
            folder = self.root / name
            _after_existing_events(folder)
            self.writers[name] = self.writer_class(str(folder), purge_step=self.purge_from)
        for key, value in scalars(record, step_key).items():
            self.writers[name].add_scalar(f"{name}/{key}", value, step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


def _after_existing_events(folder: Path) -> None:
    """Wait until the clock passes the newest event file's second: TensorBoard reads event files in
    name order (the name starts with the creation second), and a purge only hides earlier files' points."""
    stamps = [int(p.name.split(".")[3]) for p in folder.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class WandbSink:
    """One W&B run per run directory (id in wandb-run.json), a step metric per series (W&B's define_metric)."""

    def __init__(self, run: RunDir, config: Mapping[str, Any], project: str, resuming: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise missing_package("wandb") from None
        self.path = run.root / WANDB_STATE
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.state: dict[str, Any] = {"id": state.get("id") or secrets.token_hex(6),
                                      "sent": state.get("sent", {})}
        self.resuming = resuming
        self._save()  # the id first: a process killed during init still resumes the same W&B run
        self.run = wandb.init(project=project, name=run.root.name, id=self.state["id"], dir=str(run.root),
                              resume="allow", settings=wandb.Settings(console="off", quiet=True))
        self.run.config.update(dict(config), allow_val_change=True)
        self.defined: set[str] = set()

    def log(self, record: Mapping[str, Any]) -> None:
        found = series(record)
        if found is None:
            return
        name, step_key, step = found
        if self.resuming and step <= self.state["sent"].get(name, -1):
            return  # W&B received this step before the process was stopped
        if name not in self.defined:
            self.run.define_metric(f"{name}/{step_key}")
            self.run.define_metric(f"{name}/*", step_metric=f"{name}/{step_key}")
            self.defined.add(name)
        self.state["sent"][name] = step
        self._save()  # before sending: a kill in between loses a point rather than doubling it
        self.run.log({f"{name}/{step_key}": step, **{f"{name}/{k}": v for k, v in scalars(record, step_key).items()}})

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state) + "\n")

    def close(self) -> None:
        """Finish the W&B run. Offline, the last records reach the run files when W&B's service process
        flushes them (at the latest at interpreter exit, or `wandb.teardown()`); measured with wandb 0.31."""
        self.run.finish()


class MetricLogger:
    """metrics.jsonl plus the sinks of train.loggers: `log` writes the JSON line first, then each sink."""

    def __init__(self, run: RunDir, sinks: list[Sink]) -> None:
        self.run, self.sinks = run, sinks

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(record)
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_logger(run: RunDir, cfg: Any, purge_from: int = 0, resuming: bool = False) -> MetricLogger:
    """The logger for one phase of `run` under cfg.train.loggers (see the module docstring for purge_from)."""
    names = cfg.train.loggers
    check_loggers(names)
    sinks: list[Sink] = []
    try:
        if "tensorboard" in names:
            sinks.append(TensorBoardSink(run.root / TENSORBOARD_DIR, purge_from))
        if "wandb" in names:
            sinks.append(WandbSink(run, cfg.to_dict(), cfg.train.wandb_project, resuming))
    except BaseException:
        MetricLogger(run, sinks).close()
        raise
    return MetricLogger(run, sinks)


__all__ = ["MetricLogger", "Sink", "TensorBoardSink", "WandbSink", "check_loggers", "open_logger", "scalars", "series"]
