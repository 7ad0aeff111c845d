"""A run is a directory; everything a report or a resume needs lives in it, written atomically.

Layout (declared once, `robustcl.runs.layout.RunLayout`): config.yaml, metrics.jsonl, checkpoints/last.pt,
encoder.safetensors, heads/<protocol>.pt, results.json, per_image.npz, report.md, plots/*.png, ...
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from robustcl.runs.atomic import RunError, atomic_write_text, open_append, write_failure
from robustcl.runs.guard import LOCK, RunLock, is_owned, refuse_foreign, take, write_marker
from robustcl.runs.layout import RunLayout


# metrics.jsonl phases whose records belong to a phase-1 step (a resumed run redoes them): losses and the thread
# count `train.threads: auto` changed to (robustcl.runtime.ThreadGovernor).
PHASE1_STEP_RECORDS = ("pretrain", "threads")


class RunDir(RunLayout):
    """Paths (`RunLayout`: `run.results`, `run.head("slf")`, ...) and I/O for one run directory."""

    def clear(self) -> None:
        """Remove robustcl's own files that a new run starts without (`RunFile.cleared`); anything the user
        added stays, and so do config.yaml, the marker and W&B's offline files."""
        for entry in self.FILES:
            if entry.cleared and entry.folder:
                shutil.rmtree(self.root / entry.name, ignore_errors=True)
            elif entry.cleared:
                (self.root / entry.name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ lifecycle
    def prepare(self, config_yaml: str, resume: bool, overwrite: bool) -> bool:
        """Create or reopen the directory; returns True when resuming from a checkpoint.

        Refuses to touch a directory that holds another run unless --resume or --overwrite, and
        --overwrite refuses a directory robustcl did not make (`robustcl.runs.guard.is_owned`). A
        run killed before its first checkpoint is resumed from step 0 (returns False).
        """
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"{self.root} is a regular file, not a run directory; choose another --out")
        entries = [p for p in self.root.iterdir() if LOCK not in p.name] if self.root.is_dir() else []
        if resume:
            if self.checkpoint.is_file() or self.pretrain_done.is_file():
                return True
            if self.config.is_file() and is_owned(self.root):  # killed before its first checkpoint: from step 0
                write_marker(self.root)
                atomic_write_text(self.config, config_yaml)
                return False
            raise RunError(f"cannot resume: {self.root} holds no started run (no {self.config}); start one with "
                           f"`robustcl pretrain --config NAME --out {self.root}`")
        refuse_foreign(self.root)
        if entries and not overwrite:
            raise RunError(f"run directory {self.root} already holds a run; pass --resume to continue it, "
                           f"--overwrite to replace it, or choose another --out")
        if entries and overwrite:  # robustcl's own files only; anything the user added stays
            self.clear()
        self.root.mkdir(parents=True, exist_ok=True)
        write_marker(self.root)
        atomic_write_text(self.config, config_yaml)
        return False

    # ------------------------------------------------------------------ metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (flushed, so a kill loses at most this line); never through a
        symbolic link."""
        try:
            with open_append(self.metrics) as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        except OSError as exc:
            raise write_failure(self.metrics, exc) from exc

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
        kept = [r for r in self.read_metrics()
                if not (r.get("phase") in PHASE1_STEP_RECORDS and r.get("step", 0) > max_step)]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def iter_metrics(self, phase: str) -> Iterator[dict[str, Any]]:
        return (r for r in self.read_metrics() if r.get("phase") == phase)

    # ------------------------------------------------------------------ results
    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def read_results(self) -> dict[str, Any]:
        """results.json's content ({} when absent); a damaged file is a one-line RunError."""
        if not self.results.is_file():
            return {}
        try:
            data = json.loads(self.results.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise RunError(f"{self.results} is not readable JSON ({exc}); re-create it: robustcl evaluate --run "
                           f"{self.root}") from None
        if not isinstance(data, dict):
            raise RunError(f"{self.results} does not hold a results mapping; re-create it: robustcl evaluate --run "
                           f"{self.root}")
        return data


def open_run(run: RunDir, lock: RunLock, config_yaml: str, resume: bool, overwrite: bool, why: str) -> bool:
    """Open `run` for writing in one step (on rank 0 of a job, one round trip): take it (`guard.take`: probed
    writable, its writer `lock` held, the directory made, no link or device among its files), then prepare it
    (ownership marker, config.yaml; --overwrite clears robustcl's own files). Returns True when a checkpoint is resumed; the
    caller releases the lock when its writing is done (on an error here it is released already)."""
    take(lock, why, create=True)
    try:
        return run.prepare(config_yaml, resume, overwrite)
    except BaseException:
        lock.release()
        raise
