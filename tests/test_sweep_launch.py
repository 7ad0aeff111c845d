"""Parallel sweeps: shards partition the runs, --jobs N matches the serial sweep, submitit's local executor runs it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import robustcl.train.pretrain as pretrain_module
from robustcl.cli import main
from robustcl.config import ConfigError
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
