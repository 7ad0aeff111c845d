"""A whole sweep: plan it, run its not-finished runs (in this process, local processes or submitit jobs),
and write the summary of every finished run (`robustcl sweep`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from robustcl.runs import RunError
from robustcl.runs.policy import claim_sweep_dir
from robustcl.sweep.launch import launch_runs
from robustcl.sweep.options import LaunchSettings, shard_runs
from robustcl.sweep.plan import SweepPlan, plan_sweep, sweep_identity, write_sweep_yaml
from robustcl.sweep.rows import MergedRows, merge_rows
from robustcl.sweep.spec import Sweep
from robustcl.sweep.summary import write_summary


@dataclass
class SweepOutcome:
    """What a sweep produced: the summary, the plan, runs that failed (name -> message) and runs another live
    process (a second sweep into the same directory) was running, left to it."""
    summary: Path
    plan: SweepPlan
    failed: dict[str, str]
    elsewhere: tuple[str, ...] = ()


def run_sweep(spec: str | Sweep, out: Path | str | None = None, overrides: Sequence[str] = (),
              overwrite: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print, seeds: Sequence[int] | None = None,
              launch: LaunchSettings | None = None, rows: Sequence[Path | str] = ()) -> SweepOutcome:
    """Run every not-finished run (of `launch.shard` only, when given), then write the comparison; returns its paths.

    By default runs go one after another in this process; `launch` may spread them over local processes
    (jobs > 1) or submitit jobs (robustcl/sweep/launch.py); each run goes through run.execute_planned_run.
    The summary covers every finished run of the sweep. The directory must be this spec's (or new):
    robustcl.runs.policy.claim_sweep_dir refuses another spec's without `overwrite` and a file robustcl did
    not write. A run another live sweep is running is left to it (`elsewhere`), not failed.
    """
    launch = launch or LaunchSettings()
    launch.validate()
    plan = plan_sweep(spec, out, overrides, overwrite, seeds)
    _merged(plan, rows)  # a bad --rows file fails before anything runs (merged again after the runs)
    mine = shard_runs(plan.runs, launch.shard)  # another shard's runs may be mid-write: only ours are checked
    blocked = [r.status for r in mine if r.status.startswith("conflict")]
    if blocked:
        raise RunError(blocked[0])
    claim_sweep_dir(plan.out, sweep_identity(plan.sweep), overwrite)
    write_sweep_yaml(plan)
    failed, elsewhere = launch_runs(mine, plan, launch, overwrite, progress, echo)
    return SweepOutcome(write_summary(plan, failed, _merged(plan, rows), elsewhere), plan, failed, elsewhere)


def _merged(plan: SweepPlan, rows: Sequence[Path | str]) -> MergedRows | None:
    """The runs of the `rows` files (summary.csv of other sweep directories) merged into the plan's, if any."""
    return merge_rows(plan, rows) if rows else None


def summarize_sweep(spec: str | Sweep, out: Path | str | None = None, overrides: Sequence[str] = (),
                    seeds: Sequence[int] | None = None, rows: Sequence[Path | str] = (), overwrite: bool = False) -> Path:
    """Write the summary of the runs finished so far (and of `rows`' runs) without running anything (into this
    spec's sweep directory; `overwrite` takes over another spec's, as `run_sweep`)."""
    plan = plan_sweep(spec, out, overrides, seeds=seeds)
    merged = _merged(plan, rows)
    claim_sweep_dir(plan.out, sweep_identity(plan.sweep), overwrite)
    return write_summary(plan, None, merged)

