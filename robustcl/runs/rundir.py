"""A run is a directory; everything a report or a resume needs lives in it, written atomically.

Layout: config.yaml, metrics.jsonl, checkpoints/last.pt, encoder.safetensors, heads/<protocol>.pt,
results.json, report.md, plots/*.png.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


class RunError(RuntimeError):
    """A run-directory problem: the message says what and how to fix it."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_torch_atomic(obj: Any, path: Path) -> None:
    """torch.save to bytes, then an atomic write: a kill never leaves a half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class RunDir:
    """Paths and I/O for one run directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    checkpoint = property(lambda self: self.root / "checkpoints" / "last.pt")
    encoder = property(lambda self: self.root / "encoder.safetensors")
    results = property(lambda self: self.root / "results.json")
    report = property(lambda self: self.root / "report.md")
    plots = property(lambda self: self.root / "plots")
    pretrain_done = property(lambda self: self.root / "pretrain.done")

    def head(self, protocol: str) -> Path:
        return self.root / "heads" / f"{protocol}.pt"

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, config_yaml: str, resume: bool, overwrite: bool) -> bool:
        """Create or reopen the directory; returns True when resuming from a checkpoint.

        Refuses to touch a directory that holds another run unless --resume or --overwrite.
        """
        exists = self.root.exists() and any(self.root.iterdir())
        if resume:
            if not self.checkpoint.is_file():
                if self.pretrain_done.is_file():
                    return True
                raise RunError(f"cannot resume: {self.checkpoint} does not exist; start the run without --resume")
            return True
        if exists and not overwrite:
            raise RunError(f"run directory {self.root} already holds a run; pass --resume to continue it, "
                           f"--overwrite to replace it, or choose another --out")
        if exists and overwrite:
            for path in (self.checkpoint, self.metrics, self.results, self.report, self.encoder, self.pretrain_done):
                path.unlink(missing_ok=True)
            (self.root / "wandb-run.json").unlink(missing_ok=True)  # a new W&B run (its offline files stay)
            for folder in (self.root / "heads", self.plots, self.root / "tensorboard"):
                shutil.rmtree(folder, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_yaml)
        return False

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (flushed, so a kill loses at most this line)."""
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        """All complete records of metrics.jsonl (a torn last line from a kill is skipped)."""
        if not self.metrics.is_file():
            return []
        out = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def truncate_metrics(self, max_step: int) -> None:
        """On resume, drop phase-1 records logged after the checkpoint's step (they will be redone)."""
        kept = [r for r in self.read_metrics() if not (r.get("phase") == "pretrain" and r.get("step", 0) > max_step)]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def iter_metrics(self, phase: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.read_metrics() if r.get("phase") == phase)

    # ------------------------------------------------------------------ results
    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def read_results(self) -> dict[str, Any]:
        return json.loads(self.results.read_text()) if self.results.is_file() else {}
