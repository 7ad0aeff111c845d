"""Running a sweep's runs in parallel: local processes (`--jobs N`), shards (`--shard i/n`), SLURM via submitit.

Each run is one task, executed by `run_task` in a fresh worker: it reloads the run's config, decides
again whether the run is done, to resume or new (the same rule as the serial sweep, so a run another
worker or shard finished meanwhile is skipped), and runs pretrain -> finetune -> evaluate. Workers get
a share of the CPU threads (`thread_cap`) without changing the run's config: config.yaml must stay
what the serial sweep would write, or skip/resume would see a changed config. A shard is every n-th
run of the plan's order starting at i, so any scheduler can run shard 0..n-1 of the same spec.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from robustcl.config import ConfigError

if TYPE_CHECKING:
    from robustcl.sweep import PlannedRun, SweepPlan

SHARD_RE = re.compile(r"^(\d+)/(\d+)$")
LAUNCHERS = ("local", "submitit")
SUBMITIT_CLUSTERS = ("slurm", "local")
LOG_FOLDER = "logs"
SUBMITIT_FOLDER = "submitit"


@dataclass(frozen=True)
class LaunchSettings:
    """How a sweep's runs are executed: worker count, this process's shard, the launcher and its cluster options."""
    jobs: int = 1
    shard: tuple[int, int] | None = None     # (i, n): runs k with k % n == i
    launcher: str = "local"                  # local processes, or submitit (SLURM)
    cluster: str = "slurm"                   # submitit only: slurm, or local (submitit's LocalExecutor, one machine)
    partition: str | None = None             # SLURM partition
    time_min: int | None = None              # job time limit in minutes
    gpus: int | None = None                  # GPUs per job
    cpus: int | None = None                  # CPUs per job (also each job's torch thread cap)

    def validate(self) -> None:
        if self.jobs < 1:
            raise ConfigError(f"sweep --jobs {self.jobs} must be >= 1")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"sweep --launcher {self.launcher!r} must be one of {', '.join(LAUNCHERS)}")
        if self.cluster not in SUBMITIT_CLUSTERS:
            raise ConfigError(f"sweep --submitit-cluster {self.cluster!r} must be one of {', '.join(SUBMITIT_CLUSTERS)}")
        for flag, value in (("--slurm-time", self.time_min), ("--slurm-gpus", self.gpus), ("--slurm-cpus", self.cpus)):
            if value is not None and value < (0 if flag == "--slurm-gpus" else 1):
                raise ConfigError(f"sweep {flag} {value} must be {'>= 0' if flag == '--slurm-gpus' else '>= 1'}")
        slurm_only = {"--slurm-partition": self.partition, "--slurm-time": self.time_min, "--slurm-gpus": self.gpus,
                      "--slurm-cpus": self.cpus}
        given = [flag for flag, value in slurm_only.items() if value is not None]
        if given and self.launcher != "submitit":
            raise ConfigError(f"sweep {given[0]} applies to --launcher submitit only; add it or drop {given[0]}")

    @property
    def serial(self) -> bool:
        """True for the default: every run in this process, one after another."""
        return self.jobs == 1 and self.launcher == "local"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; a one-line ConfigError otherwise."""
    match = SHARD_RE.match(text.strip())
    if not match:
        raise ConfigError(f"sweep --shard {text!r} must look like i/n, e.g. 0/4 (shards 0..n-1 of n)")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or i >= n:
        raise ConfigError(f"sweep --shard {text}: need n >= 1 and 0 <= i < n (shards are numbered 0..{max(n, 1) - 1})")
    return i, n


def shard_runs(runs: Sequence["PlannedRun"], shard: tuple[int, int] | None) -> list["PlannedRun"]:
    """The runs of one shard: positions k of the plan with k % n == i (every run is in exactly one shard)."""
    if shard is None:
        return list(runs)
    i, n = shard
    return [r for k, r in enumerate(runs) if k % n == i]


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_share(jobs: int, cpus: int | None = None) -> int:
    """Torch threads per worker when `jobs` workers split `cpus` (default: the available CPUs), at least 1."""
    return max(1, (cpus or available_cpus()) // jobs)


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


@dataclass(frozen=True)
class TaskResult:
    """A task's outcome: skipped (already done), seconds it took, or the expected failure's message."""
    name: str
    skipped: bool
    seconds: float
    error: str | None = None


def make_task(planned: "PlannedRun", overwrite: bool, threads: int | None, log: Path | None) -> RunTask:
    return RunTask(planned.name, planned.label, planned.seed, planned.config, tuple(planned.overrides),
                   str(planned.root), overwrite, threads, None if log is None else str(log))


def run_task(task: RunTask) -> TaskResult:
    """Execute one run in this process (a worker): status decided afresh, then pretrain -> finetune -> evaluate."""
    from robustcl.runs import RunError
    from robustcl.sweep import PlannedRun, _load_run_config, execute_run, run_status
    from robustcl.train.pretrain import NonFiniteLoss

    planned = PlannedRun(task.label, task.seed, task.config, task.overrides, Path(task.root))
    planned.cfg = _load_run_config(planned)
    planned.status = run_status(planned, task.overwrite)
    if planned.status == "done":
        return TaskResult(task.name, True, 0.0)
    if planned.status.startswith("conflict"):
        return TaskResult(task.name, False, 0.0, planned.status)
    t0 = time.perf_counter()
    with _logged(task.log), thread_cap(task.threads):
        try:
            execute_run(planned, progress=False)
        except (NonFiniteLoss, RunError) as exc:
            return TaskResult(task.name, False, time.perf_counter() - t0, str(exc))
    return TaskResult(task.name, False, time.perf_counter() - t0)


@contextlib.contextmanager
def _logged(path: str | None) -> Iterator[None]:
    """The worker's Python-level stdout and stderr appended to `path` (one log per run)."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


# ----------------------------------------------------------------------------------------- launchers
Echo = Callable[[str], None]


def runs_to_do(runs: Sequence["PlannedRun"], echo: Echo) -> list["PlannedRun"]:
    """The runs not yet done, after saying which finished ones are skipped."""
    for planned in runs:
        if planned.status == "done":
            echo(f"{planned.name}: done, skipped")
    return [r for r in runs if r.status != "done"]


def run_local_processes(runs: Sequence["PlannedRun"], plan: "SweepPlan", settings: LaunchSettings, overwrite: bool,
                        echo: Echo) -> dict[str, str]:
    """Up to settings.jobs local worker processes (spawned), each run a task; returns failed runs (name -> message)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = thread_share(settings.jobs)
    todo = runs_to_do(runs, echo)
    failed: dict[str, str] = {}
    if not todo:
        return failed
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
                task = pending.pop(future)
                result = future.result()  # an unexpected error (bad data, a bug) stops the sweep, as in serial
                done_count += 1
                _echo_result(result, f"[{done_count}/{len(tasks)}]", failed, echo)
    except BaseException:  # an interrupt or an unexpected error stops the sweep at once, as the serial one does
        for worker in multiprocessing.active_children():  # the pool's workers: their runs resume from checkpoints
            worker.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return failed


def _echo_result(result: TaskResult, prefix: str, failed: dict[str, str], echo: Echo) -> None:
    if result.error is not None:
        failed[result.name] = result.error
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


def run_submitit(runs: Sequence["PlannedRun"], plan: "SweepPlan", settings: LaunchSettings, overwrite: bool,
                 echo: Echo) -> dict[str, str]:
    """Submit the not-done runs as one submitit job array, wait for every job; returns failed runs (name -> message)."""
    todo = runs_to_do(runs, echo)
    failed: dict[str, str] = {}
    if not todo:
        return failed
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
            failed[task.name] = f"job {job.job_id} failed: {message[-1] if message else type(exc).__name__}; log {job.paths.stderr}"
            echo(f"[{k}/{len(jobs)}] {task.name}: {failed[task.name]}")
            continue
        _echo_result(result, f"[{k}/{len(jobs)}]", failed, echo)
    return failed


# ------------------------------------------------------------------------------------------------ CLI
def add_launch_options(parser: argparse.ArgumentParser) -> None:
    """`robustcl sweep` options for parallel execution (the default, --jobs 1, is the serial in-process sweep)."""
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to N runs at once in local processes, torch threads split between them "
                             "(default 1: one after another in this process); with submitit: the job array's "
                             "parallelism")
    parser.add_argument("--shard", help="run only shard i/n of the runs (every n-th run from i; 0 <= i < n), "
                                        "for any scheduler: e.g. --shard $SLURM_ARRAY_TASK_ID/4")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local processes (default) or submitit (a SLURM job per run)")
    parser.add_argument("--submitit-cluster", choices=SUBMITIT_CLUSTERS, default="slurm",
                        help="submitit: slurm (default), or local (submitit's local executor: one machine, for tests)")
    parser.add_argument("--slurm-partition", help="submitit: SLURM partition")
    parser.add_argument("--slurm-time", type=int, metavar="MINUTES", help="submitit: time limit per job in minutes")
    parser.add_argument("--slurm-gpus", type=int, help="submitit: GPUs per job")
    parser.add_argument("--slurm-cpus", type=int, help="submitit: CPUs per job (and its torch thread cap)")


def launch_settings(args: argparse.Namespace) -> LaunchSettings:
    """LaunchSettings from parsed `robustcl sweep` options, validated (one-line ConfigError)."""
    settings = LaunchSettings(jobs=args.jobs, shard=parse_shard(args.shard) if args.shard else None,
                              launcher=args.launcher, cluster=args.submitit_cluster, partition=args.slurm_partition,
                              time_min=args.slurm_time, gpus=args.slurm_gpus, cpus=args.slurm_cpus)
    settings.validate()
    return settings


__all__ = ["LaunchSettings", "RunTask", "TaskResult", "add_launch_options", "launch_settings", "parse_shard",
           "run_local_processes", "run_submitit", "run_task", "shard_runs", "thread_cap", "thread_share"]
