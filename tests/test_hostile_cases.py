"""Hostile cases beyond issue 23's list (docs/reliability.md, "Cases of our own"): each is one
`robustcl: error:` line with exit 2, or the right outcome, never a traceback or a false success."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error

from robustcl.cli import main
from robustcl.data import fetch

ROOT = Path(__file__).resolve().parents[1]




def test_data_fetch_offline_is_one_line_naming_where_to_put_the_files(capsys, monkeypatch, tmp_path):
    """It printed two lines without the prefix and exited 1 (`robustcl data fetch cifar10`, no network)."""
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTCL_CIFAR10_URL", "http://127.0.0.1:9/")  # the discard port: refused at once
    assert main(["data", "fetch", "cifar10"]) == 2
    line = one_line_error(capsys)
    assert "could not obtain cifar10" in line and str(tmp_path / "cache" / "cifar10") in line
    assert "the download said:" in line


def test_python_m_fetch_keeps_its_exit_code_and_message(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTCL_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("ROBUSTCL_CIFAR10_URL", "http://127.0.0.1:9/")
    assert fetch.main(["cifar10"]) == 1
    assert capsys.readouterr().err.strip().startswith("could not obtain cifar10:")


@pytest.mark.parametrize("flags, needle", [
    (["--jobs", "0"], "--jobs 0 must be >= 1"),
    (["--slurm-gpus", "1"], "applies to --launcher submitit only"),
    (["--shard", "2/2"], "need n >= 1 and 0 <= i < n"),
])
def test_a_dry_run_checks_the_launch_options_as_the_sweep_would(flags, needle, capsys, tmp_path):
    """`sweep --jobs 0 --dry-run` listed the runs and exited 0; the real sweep refused it."""
    assert main(["sweep", "--spec", "fmnist-ladder", "--out", str(tmp_path / "sw"), "--dry-run", *flags]) == 2
    assert needle in one_line_error(capsys)


def test_a_closed_stdout_is_no_traceback(tmp_path):
    """`robustcl configs >&-` ended in AttributeError: 'NoneType' object has no attribute 'flush'."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import os, sys; os.close(1); sys.stdout = None\n"
                           "from robustcl.cli import entry; sys.exit(entry())", "configs"],
                          env=env, capture_output=False, stderr=subprocess.PIPE, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_thread_count_torch_cannot_take_is_a_config_error(capsys, tmp_path):
    """`train.threads=100000` crashed the process with SIGSEGV inside torch.set_num_threads (exit 139)."""
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "r"), "--quiet",
                 "train.threads=100000"]) == 2
    assert "train.threads=100000 must be in 1..1024" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_a_key_given_twice_in_a_config_file_is_refused(capsys, tmp_path):
    """PyYAML keeps the last of two equal keys without a word: `lr: 0.1` then `lr: 0.3` trained with 0.3."""
    path = tmp_path / "dup.yaml"
    path.write_text("extends: smoke\ntrain:\n  lr: 0.1\n  lr: 0.3\n")
    assert main(["configs", "--show", str(path)]) == 2
    assert "gives the key 'lr' twice (lines 3 and 4)" in one_line_error(capsys)


def test_a_fifo_in_place_of_metrics_jsonl_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO for appending blocks until a reader comes: `finetune` hung forever on one."""
    run = tmp_path / "r"
    assert main(["pretrain", "--config", "smoke", "--out", str(run), "--quiet", "train.threads=1"]) == 0
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "robustcl", "finetune", "--run", str(run), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "metrics.jsonl is a FIFO" in lines[0]


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_appending_never_goes_through_a_fifo_or_a_link(tmp_path, kind):
    """metrics.jsonl and a sweep worker's log are appended through runs.atomic.open_append: a FIFO there would block
    the run forever, a link would write outside the directory."""
    from robustcl.runs import RunError
    from robustcl.runs.atomic import open_append

    path = tmp_path / "run.log"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere").write_text("")
        path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunError, match="not a regular file"):
        open_append(path)
    with open_append(tmp_path / "fine.log") as fh:
        fh.write("a line\n")
    assert (tmp_path / "fine.log").read_text() == "a line\n"
