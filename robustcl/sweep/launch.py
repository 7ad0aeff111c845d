"""Executing a sweep's runs: one after another in this process (the default), in local processes (`--jobs N`)
or as SLURM jobs via submitit (`launch_runs` picks by the LaunchSettings).

Every run goes through robustcl/sweep/run.py's execute_planned_run. In parallel each run is one task, executed
by `run_task` in a fresh worker: it reloads the run's config and calls execute_planned_run, which decides again
whether the run is done, to resume or new (so a run another worker or shard finished meanwhile is skipped).
Workers get a share of the CPU threads (`thread_share`, capped by run.thread_cap).

Stopping. While a sweep runs its runs here or in local processes, SIGTERM, SIGINT and SIGHUP raise `Stopped` in
its main thread (`stop_on_signals`). The serial sweep unwinds its run (the run's lock is released on the way);
the parallel one stops its workers first (`stop_workers`): each gets SIGTERM, unwinds its run the same way and
exits; one still alive after STOP_GRACE_S is killed, and its lock is then a dead holder's, which the next
sweep takes over. A worker also watches its parent (`init_worker`): when the sweep process dies (even by
SIGKILL) the worker stops its run and exits instead of waiting for tasks forever. Either way the stopped
runs resume from their last checkpoint when the same command runs again.

Each run is held for its whole task (`robustcl.runs.guard.claimed`: pretrain to report): a run that another
live process holds (a second sweep into the same directory) is left to it, reported as running elsewhere and
not counted as failed; that sweep writes the summary again when it ends.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from robustcl.config import ConfigError
from robustcl.runs.guard import claimed
from robustcl.runs.layout import SweepLayout
from robustcl.sweep.options import LaunchSettings
from robustcl.sweep.plan import PlannedRun, SweepPlan, load_run_config
from robustcl.sweep.run import TaskResult, execute_planned_run

LOG_FOLDER = SweepLayout.logs.name
SUBMITIT_FOLDER = SweepLayout.submitit.name
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
STOP_GRACE_S = 30.0  # how long a stopped worker may take to unwind its run before it is killed
PARENT_POLL_S = 1.0  # how often a worker checks that the sweep process is still alive


# ---------------------------------------------------------------------------------------- stopping
class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGINT or SIGHUP) ended the sweep or one of its workers; `signum` says which
    (a KeyboardInterrupt, so code that cleans up after an interrupt cleans up after it too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, the first SIGTERM, SIGINT or SIGHUP raises Stopped in the main thread; later ones are
    ignored, so they cannot cut the clean-up short (a lock's release). The previous handlers come back after the
    block. Outside the main thread signals cannot be handled and the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_worker = {"local": False, "busy": False, "stopping": False}  # this process as a local worker (init_worker)


def _exit_worker(status: int) -> None:
    """End this local worker now, as a normal exit would (the exit handlers run: multiprocessing's finalizers give
    back its semaphores), without going back to the pool's loop, which would wait for tasks from a parent that is
    stopping or gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    os._exit(status)


def _worker_stop(signum: int, frame: object) -> None:
    """A local worker's stop signal: unwind the run in progress (Stopped; later signals are ignored meanwhile),
    or exit at once when idle."""
    if _worker["stopping"]:
        return
    if not _worker["busy"]:
        _exit_worker(128 + signum)
    _worker["stopping"] = True
    raise Stopped(signum)


def _watch_parent(parent: int) -> None:
    """A worker's watchdog thread: once the sweep process is gone, stop the worker (as SIGTERM does); if the run
    does not unwind within STOP_GRACE_S, end the worker anyway (its lock is then a dead holder's)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)  # the main thread runs the handler
    time.sleep(STOP_GRACE_S)
    os._exit(128 + signal.SIGTERM)


def init_worker(parent: int) -> None:
    """The initializer of a local worker process: stop signals stop it (`_worker_stop`), and it watches `parent`."""
    _worker["local"] = True
    for signum in STOP_SIGNALS:
        signal.signal(signum, _worker_stop)
    threading.Thread(target=_watch_parent, args=(parent,), name="robustcl-watch-parent", daemon=True).start()


def stop_workers(workers: Sequence[Any], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to each worker process, then wait up to `grace` seconds for them to unwind their runs and exit;
    any still running is killed."""
    from multiprocessing.connection import wait

    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + grace
    remaining = list(workers)
    while remaining and time.monotonic() < deadline:
        ended = wait([w.sentinel for w in remaining], timeout=deadline - time.monotonic())
        remaining = [w for w in remaining if w.sentinel not in ended]
    for worker in remaining:
        worker.kill()


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
    in this process, through execute_planned_run with the task's thread cap and log. A local worker stopped
    by a signal exits once its run has unwound (its lock released): its parent is stopping or gone."""
    planned = PlannedRun(task.label, task.seed, task.config, task.overrides, Path(task.root))
    planned.cfg = load_run_config(planned)
    _worker["busy"] = True
    try:
        return execute_claimed(planned, task.overwrite, progress=False, threads=task.threads, log=task.log)
    except Stopped as exc:
        if not _worker["local"]:
            raise  # a submitit job: its launcher decides
        _exit_worker(exc.exit_status)  # the run unwound: its lock is released
    finally:
        _worker["busy"] = False


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
    if settings.launcher == "submitit":  # an interrupt stops the waiting, not the jobs
        tally = run_submitit(runs, plan, settings, overwrite, echo)
    else:
        with stop_on_signals():  # SIGTERM, SIGINT, SIGHUP: Stopped, the runs unwound (locks released), resumable
            if not settings.serial:
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
    pool = ProcessPoolExecutor(max_workers=min(settings.jobs, len(tasks)), mp_context=context,
                               initializer=init_worker, initargs=(os.getpid(),))
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
    except BaseException:  # a stop signal or an unexpected error stops the sweep at once, as the serial one does
        stop_workers(multiprocessing.active_children())  # the pool's workers: their runs resume from checkpoints
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


__all__ = ["LOG_FOLDER", "STOP_SIGNALS", "SUBMITIT_FOLDER", "RunTask", "RunningElsewhere", "Stopped", "Tally",
           "execute_claimed", "init_worker", "launch_runs", "make_task", "run_local_processes", "run_serial",
           "run_submitit", "run_task", "runs_to_do", "stop_on_signals", "stop_workers", "submitit_executor",
           "thread_share"]
