"""Executing a sweep's runs: one after another in this process (the default), in local processes (`--jobs N`)
or as SLURM jobs via submitit (`launch_runs` picks by the LaunchSettings).

Every run goes through robustcl/sweep/run.py's execute_planned_run. In parallel each run is one task, executed
by `run_task` in a fresh worker: it reloads the run's config and calls execute_planned_run, which decides again
whether the run is done, to resume or new (so a run another worker or shard finished meanwhile is skipped).
Workers get a share of the CPU threads (`thread_share`, capped by run.thread_cap).

Each run is held for its whole task (`robustcl.runs.guard.claimed`: pretrain to report): a run that another
live process holds (a second sweep into the same directory) is left to it, reported as running elsewhere and
not counted as failed; that sweep writes the summary again when it ends.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from robustcl.config import ConfigError
from robustcl.runs.guard import claimed
from robustcl.runs.layout import SweepLayout
from robustcl.sweep.options import LaunchSettings
from robustcl.sweep.plan import PlannedRun, SweepPlan, load_run_config
from robustcl.sweep.run import TaskResult, execute_planned_run

LOG_FOLDER = SweepLayout.logs.name
SUBMITIT_FOLDER = SweepLayout.submitit.name


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_share(jobs: int, cpus: int | None = None) -> int:
    """Torch threads per worker when `jobs` workers split `cpus` (default: the available CPUs), at least 1."""
    return max(1, (cpus or available_cpus()) // jobs)


# ------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class RunTask:
    """Everything a worker needs to execute one run of a sweep (plain data: pickles to any process or node)."""
    name: str
    label: str
    seed: int
    config: str
    overrides: tuple[str, ...]
    root: str
    overwrite: bool
    threads: int | None
    log: str | None = None


def make_task(planned: PlannedRun, overwrite: bool, threads: int | None, log: Path | None) -> RunTask:
    """The task of one planned run: its identity and config reference, the worker's thread cap and log file."""
    return RunTask(planned.name, planned.label, planned.seed, planned.config, tuple(planned.overrides),
                   str(planned.root), overwrite, threads, None if log is None else str(log))


@dataclass(frozen=True)
class RunningElsewhere(TaskResult):
    """A run another live process holds (a second sweep into the same directory): left to it, not failed."""


def execute_claimed(planned: PlannedRun, overwrite: bool, progress: bool = False, **options: Any) -> TaskResult:
    """execute_planned_run while this process holds the run (`claimed`); RunningElsewhere when another does."""
    with claimed(planned.root) as ours:
        if not ours:
            return RunningElsewhere(planned.name, False, 0.0)
        return execute_planned_run(planned, overwrite, progress, **options)


def run_task(task: RunTask) -> TaskResult:
    """A worker's entry point (a spawned local process or a submitit job): the task's run, its config loaded
    in this process, through execute_planned_run with the task's thread cap and log."""
    planned = PlannedRun(task.label, task.seed, task.config, task.overrides, Path(task.root))
    planned.cfg = load_run_config(planned)
    return execute_claimed(planned, task.overwrite, progress=False, threads=task.threads, log=task.log)


@dataclass
class Tally:
    """How a sweep's runs went: the failed ones (name -> message) and those left to another live process."""
    failed: dict[str, str] = field(default_factory=dict)
    elsewhere: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- launchers
Echo = Callable[[str], None]


def launch_runs(runs: Sequence[PlannedRun], plan: SweepPlan, settings: LaunchSettings, overwrite: bool, progress: bool,
                echo: Echo) -> tuple[dict[str, str], tuple[str, ...]]:
    """Execute `runs` of the plan with the settings' launcher: submitit jobs, local processes (jobs > 1), or one
    after another in this process (the default); returns the runs that failed (name -> message) and the runs
    left to another live process."""
    if settings.launcher == "submitit":
        tally = run_submitit(runs, plan, settings, overwrite, echo)
    elif not settings.serial:
        tally = run_local_processes(runs, plan, settings, overwrite, echo)
    else:
        tally = run_serial(runs, overwrite, progress, echo)
    return tally.failed, tuple(tally.elsewhere)


def run_serial(runs: Sequence[PlannedRun], overwrite: bool, progress: bool, echo: Echo) -> Tally:
    """Every run in this process, one after another, each saying its status first; returns how they went."""
    tally = Tally()
    for i, planned in enumerate(runs, 1):
        prefix = f"[{i}/{len(runs)}]"
        result = execute_claimed(planned, overwrite, progress,  # says the status before the run starts
                                 announce=lambda status, head=f"{prefix} {planned.name}": echo(f"{head}: {status}"))
        _echo_result(result, prefix, tally, echo)
    return tally


def runs_to_do(runs: Sequence[PlannedRun], echo: Echo) -> list[PlannedRun]:
    """The runs not yet done, after saying which finished ones are skipped."""
    for planned in runs:
        if planned.status == "done":
            echo(f"{planned.name}: done, skipped")
    return [r for r in runs if r.status != "done"]


def run_local_processes(runs: Sequence[PlannedRun], plan: SweepPlan, settings: LaunchSettings, overwrite: bool,
                        echo: Echo) -> Tally:
    """Up to settings.jobs local worker processes (spawned), each run a task; returns how they went."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = thread_share(settings.jobs)
    todo = runs_to_do(runs, echo)
    tally = Tally()
    if not todo:
        return tally
    echo(f"{len(todo)} runs in {min(settings.jobs, len(todo))} processes, {threads} torch threads each; "
         f"logs in {plan.out / LOG_FOLDER}")
    tasks = [make_task(r, overwrite, threads, plan.out / LOG_FOLDER / f"{r.name}.log") for r in todo]
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started its thread pools
    pool = ProcessPoolExecutor(max_workers=min(settings.jobs, len(tasks)), mp_context=context)
    pending = {pool.submit(run_task, task): task for task in tasks}
    try:
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                pending.pop(future)
                result = future.result()  # an unexpected error (bad data, a bug) stops the sweep, as in serial
                done_count += 1
                _echo_result(result, f"[{done_count}/{len(tasks)}]", tally, echo)
    except BaseException:  # an interrupt or an unexpected error stops the sweep at once, as the serial one does
        for worker in multiprocessing.active_children():  # the pool's workers: their runs resume from checkpoints
            worker.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return tally


def _echo_result(result: TaskResult, prefix: str, tally: Tally, echo: Echo) -> None:
    """Say how a run went (skipped, running elsewhere, finished in N s, or failed: why), recording it in `tally`."""
    if isinstance(result, RunningElsewhere):
        tally.elsewhere.append(result.name)
        echo(f"{prefix} {result.name}: running in another process (another sweep into this directory?), left to it")
    elif result.error is not None:
        tally.failed[result.name] = result.error
        echo(f"{prefix} {result.name}: failed: {result.error}")
    elif result.skipped:
        echo(f"{prefix} {result.name}: done, skipped")
    else:
        echo(f"{prefix} {result.name}: finished in {result.seconds:.0f} s")


def submitit_executor(folder: Path, settings: LaunchSettings, name: str) -> Any:
    """A submitit AutoExecutor for the settings' cluster (slurm, or local for one machine), parameters set."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("sweep --launcher submitit needs the submitit package: pip install 'robustcl[slurm]'") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=settings.cluster)
    params: dict[str, Any] = {"name": name, "timeout_min": settings.time_min, "gpus_per_node": settings.gpus,
                              "cpus_per_task": settings.cpus, "slurm_partition": settings.partition,
                              "slurm_array_parallelism": settings.jobs if settings.jobs > 1 else None}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def run_submitit(runs: Sequence[PlannedRun], plan: SweepPlan, settings: LaunchSettings, overwrite: bool,
                 echo: Echo) -> Tally:
    """Submit the not-done runs as one submitit job array, wait for every job; returns how they went."""
    todo = runs_to_do(runs, echo)
    tally = Tally()
    if not todo:
        return tally
    folder = plan.out / SUBMITIT_FOLDER
    executor = submitit_executor(folder, settings, f"robustcl-{plan.sweep.spec.name}")
    tasks = [make_task(r, overwrite, settings.cpus, None) for r in todo]
    jobs = executor.map_array(run_task, tasks)
    echo(f"submitted {len(jobs)} {settings.cluster} jobs ({', '.join(str(j.job_id) for j in jobs)}); submitit files "
         f"in {folder}; waiting (an interrupt stops the waiting, not the jobs: run the same command when they end)")
    for k, (job, task) in enumerate(zip(jobs, tasks), 1):
        try:
            result = job.result()
        except Exception as exc:  # the job died (a bug, bad data, the time limit): report it, wait for the others
            message = str(exc).strip().splitlines()
            tally.failed[task.name] = (f"job {job.job_id} failed: {message[-1] if message else type(exc).__name__}; "
                                       f"log {job.paths.stderr}")
            echo(f"[{k}/{len(jobs)}] {task.name}: {tally.failed[task.name]}")
            continue
        _echo_result(result, f"[{k}/{len(jobs)}]", tally, echo)
    return tally


__all__ = ["LOG_FOLDER", "SUBMITIT_FOLDER", "RunTask", "RunningElsewhere", "Tally", "execute_claimed", "launch_runs", "make_task", "run_local_processes", "run_serial",
           "run_submitit", "run_task", "runs_to_do", "submitit_executor", "thread_share"]
