"""One planned run of a sweep executed in this process: `execute_planned_run`, the only place a sweep runs a run.

The serial sweep calls it for each of its runs, and every worker (a local process of `--jobs N`, a submitit
job; robustcl/sweep/launch.py) calls it for its one run: the run's status is decided afresh, then
pretrain -> finetune -> evaluate -> report. A worker caps torch's threads (`thread_cap`) without changing the
run's config: config.yaml must stay what the serial sweep would write, or skip/resume would see a changed config.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from robustcl.runs import RunError
from robustcl.runs.atomic import open_append
from robustcl.sweep.plan import PlannedRun, run_status


@dataclass(frozen=True)
class TaskResult:
    """A run's outcome: skipped (already done), seconds it took, or the expected failure's message."""
    name: str
    skipped: bool
    seconds: float
    error: str | None = None


@contextlib.contextmanager
def thread_cap(limit: int | None) -> Iterator[None]:
    """Within the block, torch uses at most `limit` intra-op threads, whatever a config's train.threads asks for."""
    if limit is None:
        yield
        return
    import torch

    real = torch.set_num_threads

    def capped(n: int) -> None:
        real(max(1, min(int(n), limit)))

    torch.set_num_threads = capped
    real(max(1, min(torch.get_num_threads(), limit)))
    try:
        yield
    finally:
        torch.set_num_threads = real


@contextlib.contextmanager
def _logged(path: str | None) -> Iterator[None]:
    """The worker's Python-level stdout and stderr appended to `path` (one log per run)."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open_append(Path(path), buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def execute_planned_run(planned: PlannedRun, overwrite: bool, progress: bool = False, *, threads: int | None = None,
                        log: str | None = None, announce: Callable[[str], None] | None = None) -> TaskResult:
    """Execute one planned run in this process (its `cfg` loaded) and return how it went.

    The status is decided afresh unless the plan found the run done: since planning, another process (a second
    sweep, shard or job sharing the directory) may have finished or started it, and a stale "new" would overwrite
    it. A done run is skipped and a conflict is its failure. Otherwise `announce`, when given, gets the status
    (new or resume), and pretrain (fresh, resumed or overwriting) -> finetune -> evaluate -> report run with torch
    capped at `threads` and the output appended to `log` (a worker's, both None in the serial sweep). A run's own
    failure (a non-finite loss, a RunError) is the result's error; any other exception propagates.
    """
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.runs.report import write_report
    from robustcl.train.finetune import finetune
    from robustcl.train.pretrain import NonFiniteLoss, pretrain

    planned.status = run_status(planned, overwrite) if planned.status != "done" else "done"
    if planned.status == "done":
        return TaskResult(planned.name, True, 0.0)
    if planned.status.startswith("conflict"):
        return TaskResult(planned.name, False, 0.0, planned.status)
    if announce is not None:
        announce(planned.status)
    run, cfg = planned.run, planned.cfg
    resume = planned.status == "resume"
    t0 = time.perf_counter()
    with _logged(log), thread_cap(threads):
        try:
            # a directory with something in it: this run (status checked above), unfinished or --overwrite
            redo = not resume and run.root.exists() and any(run.root.iterdir())
            pretrain(cfg, run, resume=resume, overwrite=redo, progress=progress)
            finetune(cfg, run, progress=progress, overwrite=True)  # this flow owns the run
            evaluate_run(cfg, run, progress=progress)
            write_report(run)
        except (NonFiniteLoss, RunError) as exc:
            return TaskResult(planned.name, False, time.perf_counter() - t0, str(exc))
    return TaskResult(planned.name, False, time.perf_counter() - t0)


__all__ = ["TaskResult", "execute_planned_run", "thread_cap"]
