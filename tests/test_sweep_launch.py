"""Parallel sweeps: shards partition the runs, --jobs N matches the serial sweep, submitit's local executor runs it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import robustcl
import robustcl.train.pretrain as pretrain_module
from robustcl.cli import main
from robustcl.config import ConfigError
from robustcl.runs.guard import RunLock
from robustcl.sweep.flow import run_sweep
from robustcl.sweep.launch import make_task, run_task, thread_share
from robustcl.sweep.options import LaunchSettings, parse_shard, shard_runs
from robustcl.sweep.plan import PlannedRun, plan_sweep
from robustcl.sweep.run import thread_cap

SPEC = """\
# one smoke configuration x two seeds (test)
name: par
seeds: [0, 1]
overrides: [train.max_steps=2, train.threads=1, "finetune.protocols=[slf]", "eval.eps_curve=[]", eval.limit=32]
runs:
  - {name: g, config: smoke}
"""
TIMING = {"seconds", "seconds_by_part", "images_per_s", "wall_s", "time", "elapsed_s", "hardware"}  # hardware: threads differ by design


def write_spec(folder: Path, text: str = SPEC) -> Path:
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def without_timing(value):
    """results.json without its wall-clock fields (the only thing two identical runs may differ in)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def fake_runs(n: int) -> list[PlannedRun]:
    return [PlannedRun("c", k, "smoke", (), Path(f"/nonexistent/c-s{k}")) for k in range(n)]


# ----------------------------------------------------------------------------------------- shards
def test_shards_partition_the_runs_deterministically():
    runs = fake_runs(11)
    shards = [shard_runs(runs, (i, 4)) for i in range(4)]
    names = [r.name for shard in shards for r in shard]
    assert sorted(names) == sorted(r.name for r in runs) and len(names) == len(set(names))  # each run exactly once
    assert [r.seed for r in shards[1]] == [1, 5, 9]
    assert [r.name for r in shard_runs(runs, (1, 4))] == [r.name for r in shards[1]]  # the same every time
    assert shard_runs(runs, None) == runs and shard_runs(runs, (0, 1)) == runs


@pytest.mark.parametrize("text, message", [("4/4", "0 <= i < n"), ("1/0", "n >= 1"), ("a/b", "must look like i/n"),
                                           ("1", "must look like i/n")])
def test_bad_shard_is_a_one_line_error(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_shard(text)
    assert "\n" not in str(info.value)
    assert parse_shard(" 2/3 ") == (2, 3)


def test_bad_launch_options_are_one_line_errors(tmp_path, capsys):
    spec = write_spec(tmp_path)
    for argv, message in ((["--jobs", "0"], "--jobs 0 must be >= 1"),
                          (["--slurm-partition", "gpu"], "--slurm-partition applies to --launcher submitit only"),
                          (["--shard", "2/2"], "0 <= i < n")):
        assert main(["sweep", "--spec", str(spec), "--out", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("robustcl: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_only_the_shard(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main(["sweep", "--spec", str(spec), "--out", str(tmp_path / "out"), "--dry-run", "--shard", "1/2"]) == 0
    listing = capsys.readouterr().out
    assert "g-s1" in listing and "g-s0" not in listing and ": 1 runs" in listing


# ---------------------------------------------------------------------------------------- threads
def test_thread_share_and_cap():
    assert thread_share(4, cpus=16) == 4 and thread_share(3, cpus=2) == 1
    before = torch.get_num_threads()
    with thread_cap(1):
        torch.set_num_threads(8)  # what a config's train.threads=8 would ask for
        assert torch.get_num_threads() == 1
    assert torch.set_num_threads.__name__ == "set_num_threads"  # restored
    torch.set_num_threads(before)


def test_a_failing_run_is_reported_by_the_worker(tmp_path, monkeypatch):
    spec = write_spec(tmp_path)
    plan = plan_sweep(str(spec), tmp_path / "out")

    def diverging(cfg, run, resume=False, overwrite=False, progress=True):
        raise pretrain_module.NonFiniteLoss("non-finite loss (adversarial) before step 1")

    monkeypatch.setattr(pretrain_module, "pretrain", diverging)
    result = run_task(make_task(plan.runs[0], False, 1, tmp_path / "g.log"))
    assert result.error == "non-finite loss (adversarial) before step 1" and not result.skipped


# --------------------------------------------------------------------------------- parallel = serial
@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serial")
    outcome = run_sweep(str(write_spec(folder)), folder / "out", progress=False, echo=lambda _: None)
    assert not outcome.failed
    return folder / "out"


def test_jobs_2_gives_the_serial_results_and_keeps_skip_and_refuse(serial, tmp_path, capsys):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 runs in 2 processes, 1 torch threads each" in printed and f"summary: {out / 'summary.md'}" in printed
    for name in ("g-s0", "g-s1"):
        parallel = json.loads((out / name / "results.json").read_text())
        assert without_timing(parallel) == without_timing(json.loads((serial / name / "results.json").read_text()))
        assert (out / name / "config.yaml").read_text() == (serial / name / "config.yaml").read_text()
        assert (out / "logs" / f"{name}.log").is_file()
    assert "| g | gbrcl | SLF |" in (out / "summary.md").read_text()
    log: list[str] = []
    run_sweep(str(spec), out, progress=False, echo=log.append)  # serial rerun: everything done
    assert len(log) == 2 and all("done, skipped" in line for line in log)
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--jobs", "2", "train.max_steps=3"]) == 2
    assert "another config (train.max_steps: 2 -> 3)" in capsys.readouterr().err


def test_two_shards_together_make_the_whole_sweep(serial, tmp_path, capsys):
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--shard", "1/2", "--quiet"]) == 0
    assert (out / "g-s1" / "results.json").is_file() and not (out / "g-s0").exists()
    assert "Runs without results: g-s0" in (out / "summary.md").read_text()
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--shard", "0/2", "--quiet"]) == 0
    for name in ("g-s0", "g-s1"):
        assert without_timing(json.loads((out / name / "results.json").read_text())) == \
            without_timing(json.loads((serial / name / "results.json").read_text()))
    assert "Runs without results" not in (out / "summary.md").read_text()
    capsys.readouterr()


def test_submitit_local_executor_runs_the_sweep(serial, tmp_path, capsys):
    pytest.importorskip("submitit")
    spec = write_spec(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--launcher", "submitit", "--submitit-cluster", "local",
                 "--slurm-cpus", "1", "--slurm-time", "10", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "submitted 2 local jobs" in printed and "g-s0: finished in" in printed
    for name in ("g-s0", "g-s1"):
        assert without_timing(json.loads((out / name / "results.json").read_text())) == \
            without_timing(json.loads((serial / name / "results.json").read_text()))
    assert any((out / "submitit").rglob("*_result.pkl"))  # submitit's own job files: it really ran them
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--launcher", "submitit", "--submitit-cluster",
                 "local"]) == 0  # all done: nothing submitted
    again = capsys.readouterr().out
    assert "submitted" not in again and again.count("done, skipped") == 2


def test_launch_settings_default_is_serial():
    assert LaunchSettings().serial and not LaunchSettings(jobs=2).serial and not LaunchSettings(launcher="submitit").serial


def test_an_unexpected_error_in_a_worker_stops_the_parallel_sweep(tmp_path, capsys):
    """As in the serial sweep, an error that is not a run's own failure (here: missing data) ends the sweep."""
    spec = write_spec(tmp_path, SPEC.replace("config: smoke}", "config: fmnist-gbrcl}"))
    out = tmp_path / "out"
    missing = tmp_path / "no-data"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--jobs", "2", "--quiet",
                 f"data.root={missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustcl: error: fashion-mnist not found in root") and "\n" not in err
    assert not (out / "summary.md").exists()


# ------------------------------------------------------------------------------------------ signals
LONG_SPEC = SPEC.replace("train.max_steps=2,", "train.max_steps=150, train.epochs=100, train.checkpoint_every=2,")
RUNS = ("g-s0", "g-s1")


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, seconds: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return condition()


def _sweep_process(spec: Path, out: Path, folder: Path) -> subprocess.Popen:
    """`robustcl sweep --jobs 2` in its own process group, its output in folder/stdout and folder/stderr (files:
    a worker that outlives the sweep would hold a pipe open)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(robustcl.__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "robustcl", "sweep", "--spec", str(spec), "--out", str(out),
                                 "--jobs", "2", "--quiet"], env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)


def _stop_mid_training(tmp_path: Path, signum: int) -> tuple[Path, Path, subprocess.Popen]:
    """Start `sweep --jobs 2` on LONG_SPEC, send `signum` to the sweep process once both runs have a checkpoint,
    and check that no worker and no live lock outlives it; returns (spec, out, the ended sweep process)."""
    spec, out = write_spec(tmp_path, LONG_SPEC), tmp_path / "out"
    proc = _sweep_process(spec, out, tmp_path)
    workers: list[int] = []
    try:
        training = _wait_for(lambda: all((out / n / "checkpoints" / "last.pt").is_file() for n in RUNS), 180, proc)
        assert training, f"the runs never started training: {(tmp_path / 'stderr').read_text()}"
        workers = [pid for pid in _children(proc.pid) if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) == 2
        os.kill(proc.pid, signum)
        proc.wait(timeout=60)
        assert _wait_for(lambda: not any(_alive(pid) for pid in workers), 60), "a worker outlived the sweep"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    for name in RUNS:
        holder = RunLock(out / name).holder()
        assert holder is None or not _alive(holder["pid"]), f"{name}'s lock is held by a live process: {holder}"
        assert not (out / name / "results.json").exists()  # stopped mid-run
    assert [r.status for r in plan_sweep(str(spec), out).runs] == ["resume", "resume"]
    return spec, out, proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_ends_a_jobs_2_sweep_its_workers_and_their_locks(tmp_path, capsys, signum, status):
    """SIGTERM (or SIGINT) to `sweep --jobs 2` mid-training: the workers stop and free their runs, the sweep
    says so in one line with status 128 + the signal; the same command then resumes both runs to the end."""
    spec, out, proc = _stop_mid_training(tmp_path, signum)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == status, (proc.returncode, stderr)
    assert stderr == (f"robustcl: sweep stopped by {signal.Signals(signum).name}; run the same command again to "
                      "resume its runs\n")
    if signum == signal.SIGTERM:  # one rerun is enough to show that stopped runs resume
        assert main(["sweep", "--spec", str(spec), "--out", str(out), "--jobs", "2", "--quiet"]) == 0
        assert all((out / name / "results.json").is_file() for name in RUNS)
        capsys.readouterr()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_workers_of_a_killed_sweep_stop_instead_of_hanging(tmp_path):
    """SIGKILL cannot be handled: the workers notice that their parent is gone, stop their runs and exit."""
    _stop_mid_training(tmp_path, signal.SIGKILL)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is a POSIX signal")
def test_a_stop_signal_unwinds_the_serial_sweep_and_restores_the_handlers(tmp_path, monkeypatch, capsys):
    """SIGHUP during a serial sweep's run: the run unwinds (its lock released), one line, status 129."""
    spec, out = write_spec(tmp_path), tmp_path / "out"
    held = []

    def hung_up(cfg, run, resume=False, overwrite=False, progress=True):
        lock = RunLock(run.root)
        lock.acquire(create=True)
        try:
            held.append(lock.path.is_file())
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(30)  # the handler raises in here
        finally:
            lock.release()

    def unhandled(signum, frame):  # what the test's process does with a SIGHUP the sweep did not handle
        raise RuntimeError("the sweep left SIGHUP to its caller")

    monkeypatch.setattr(pretrain_module, "pretrain", hung_up)
    before = signal.signal(signal.SIGHUP, unhandled)
    try:
        assert main(["sweep", "--spec", str(spec), "--out", str(out), "--quiet"]) == 129
        assert signal.getsignal(signal.SIGHUP) is unhandled  # the sweep's handler is gone
    finally:
        signal.signal(signal.SIGHUP, before)
    captured = capsys.readouterr()
    assert captured.err == "robustcl: sweep stopped by SIGHUP; run the same command again to resume its runs\n"
    assert held == [True] and RunLock(out / "g-s0").holder() is None
