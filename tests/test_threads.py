"""`train.threads: auto` on a shared machine: the thread count follows the cores other processes leave free
(robustcl.hardware.FreeCores, threads_for; robustcl.runtime.ThreadGovernor), re-decided between batches of
training, fine-tuning and evaluation. Its speed is measured in benchmarks/shared_machine.py, not here."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml

from robustcl import hardware, runtime
from robustcl.cli import main
from robustcl.config import load_config
from robustcl.hardware import FreeCores, busy_cpu_seconds, threads_for
from robustcl.runs import RunDir
from robustcl.runs.progress import PHASE, Progress
from robustcl.runtime import ThreadGovernor, open_runtime, pace_threads, paced

TICK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """The governor sets torch's process-wide thread count: restore it, and leave no governor behind."""
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)
    runtime._governor = None


def stat_file(path: Path, per_cpu: dict[int, tuple[int, ...]]) -> Path:
    """A /proc/stat with an aggregate line and one line per cpu (user nice system idle iowait irq softirq steal)."""
    total = [sum(col) for col in zip(*per_cpu.values())]
    lines = ["cpu  " + " ".join(map(str, total))] + [f"cpu{n} " + " ".join(map(str, v)) for n, v in per_cpu.items()]
    path.write_text("\n".join([*lines, "intr 1 2 3", "ctxt 99"]) + "\n")
    return path


def test_busy_seconds_count_work_on_the_given_cpus_only(tmp_path):
    stat = stat_file(tmp_path / "stat", {0: (10, 1, 5, 900, 7, 2, 3, 4), 1: (20, 0, 0, 800, 0, 0, 0, 0),
                                          2: (500, 0, 0, 0, 0, 0, 0, 0)})
    assert busy_cpu_seconds([0, 1], stat) == pytest.approx((10 + 1 + 5 + 2 + 3 + 4 + 20) / TICK)  # idle, iowait not
    assert busy_cpu_seconds([2], stat) == pytest.approx(500 / TICK)
    assert busy_cpu_seconds([0], tmp_path / "missing") is None
    assert busy_cpu_seconds([0, 7], stat) is None  # a core /proc/stat does not list (LXCFS renumbers them): unknown


def test_free_cores_are_the_cores_minus_the_work_of_other_processes(tmp_path):
    clock = {"wall": 100.0, "own": 5.0}
    stat = stat_file(tmp_path / "stat", {0: (0,) * 8, 1: (0,) * 8, 2: (0,) * 8})
    cores = FreeCores(stat, cpus={0, 1}, wall=lambda: clock["wall"], own=lambda: clock["own"])
    # one second: both cores busy (2 s of work), 4/3 s of it ours -> another process used 2/3 of a core
    clock["wall"], clock["own"] = 101.0, 5.0 + 4 / 3
    stat_file(stat, {0: (TICK, 0, 0, 0, 0, 0, 0, 0), 1: (TICK, 0, 0, 0, 0, 0, 0, 0), 2: (TICK, 0, 0, 0, 0, 0, 0, 0)})
    assert cores.sample() == pytest.approx(2 - 2 / 3, abs=0.02)  # cpu2 is not ours: its work does not count
    # the next second: only our own work on one core -> both free for us
    clock["wall"], clock["own"] = 102.0, 5.0 + 4 / 3 + 1
    stat_file(stat, {0: (2 * TICK, 0, 0, 0, 0, 0, 0, 0), 1: (TICK, 0, 0, TICK, 0, 0, 0, 0), 2: (TICK, 0, 0, 0, 0, 0, 0, 0)})
    assert cores.sample() == pytest.approx(2.0)


@pytest.mark.parametrize("free, limit, threads", [(2.0, 2, 2), (1.33, 2, 1), (1.6, 2, 2), (1.5, 2, 1), (0.1, 2, 1),
                                                  (7.7, 8, 8), (5.5, 8, 5), (16.0, 4, 4)])
def test_a_thread_per_free_core_at_least_one_at_most_the_limit(free, limit, threads):
    assert threads_for(free, limit) == threads


class Cores:
    """FreeCores with the free cores given in turn."""

    def __init__(self, *free: float | None) -> None:
        self.free = list(free)

    def sample(self) -> float | None:
        return self.free.pop(0)


def test_the_governor_follows_the_load_between_batches_and_no_faster_than_its_interval():
    governor = ThreadGovernor(2, interval=0.0, cores=Cores(2.0, 1.3, 1.2, None, 1.9))
    assert governor.start(window=0.0) == 2 and torch.get_num_threads() == 2
    assert governor.pace() == 1 and torch.get_num_threads() == 1  # a competitor appeared
    assert governor.pace() is None and torch.get_num_threads() == 1  # still there: no change
    assert governor.pace() is None and torch.get_num_threads() == 1  # unreadable: keep the count
    assert governor.pace() == 2 and torch.get_num_threads() == 2  # it left
    slow = ThreadGovernor(2, interval=3600.0, cores=Cores(2.0, 0.5))
    slow.start(window=0.0)
    assert slow.pace() is None and torch.get_num_threads() == 2  # not due yet


def test_under_a_sweep_workers_thread_cap_the_governor_reports_only_real_changes():
    from robustcl.sweep.run import thread_cap

    with thread_cap(1):
        governor = ThreadGovernor(2, interval=0.0, cores=Cores(2.0, 2.0, 1.0, 2.0))
        governor.start(window=0.0)
        assert torch.get_num_threads() == 1
        assert governor.pace() is None and governor.pace() is None and governor.pace() is None  # wants 2: capped


def test_open_runtime_governs_auto_threads_on_a_cpu_and_leaves_a_fixed_count_alone(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(ThreadGovernor, "start", lambda self, window=0.1: torch.set_num_threads(1) or 1)
    opened = open_runtime(load_config("smoke", ["train.threads=auto"]))
    assert opened.cfg.train.threads == "auto" and runtime._governor is not None and torch.get_num_threads() == 1
    open_runtime(load_config("smoke", ["train.threads=2"]))
    assert runtime._governor is None and torch.get_num_threads() == 2 and pace_threads() is None


def test_a_run_stores_auto_and_logs_each_change_of_the_thread_count(tmp_path, monkeypatch):
    """config.yaml keeps `auto` (the count is the machine's, not the experiment's); a change is a metrics record."""
    changes = iter([None, 1, None, 2])
    monkeypatch.setattr("robustcl.train.pretrain.pace_threads", lambda: next(changes, None))
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(ThreadGovernor, "start", lambda self, window=0.1: torch.set_num_threads(2) or 2)
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "train.threads=auto",
                 "train.max_steps=4"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["threads"] == "auto"
    records = [(r["step"], r["threads"]) for r in RunDir(out).iter_metrics("threads")]
    assert records == [(0, 2), (2, 1), (4, 2)]  # the count it started with, then each change


def test_a_paced_module_lets_the_governor_decide_before_each_forward_and_only_inside_the_block(monkeypatch):
    calls = []

    class Counting:
        def pace(self) -> None:
            calls.append(1)

    module = torch.nn.Linear(3, 2)
    with paced(module):  # no governor: nothing is hooked
        module(torch.zeros(1, 3))
    monkeypatch.setattr(runtime, "_governor", Counting())
    with paced(module):
        for _ in range(3):
            module(torch.zeros(1, 3))
    module(torch.zeros(1, 3))
    assert len(calls) == 3


def test_an_evaluation_part_records_its_thread_count(tmp_path):
    run = RunDir(tmp_path)
    with Progress("evaluate", show=False, run=run).part("pgd", 30) as part:
        part.update(30)
    (record,) = run.iter_metrics(PHASE)
    assert record["threads"] == torch.get_num_threads()


def test_a_resumed_run_drops_the_thread_records_of_the_steps_it_redoes(tmp_path):
    run = RunDir(tmp_path)
    for record in ({"phase": "pretrain", "step": 4}, {"phase": "threads", "step": 3, "threads": 1},
                   {"phase": "threads", "step": 5, "threads": 2}, {"phase": "pretrain", "step": 6}):
        run.log(record)
    run.truncate_metrics(4)
    assert [(r["phase"], r["step"]) for r in run.read_metrics()] == [("pretrain", 4), ("threads", 3)]


def test_torchrun_ranks_keep_a_fixed_share(monkeypatch):
    monkeypatch.setattr(hardware, "usable_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    open_runtime(load_config("smoke", ["train.threads=auto"]))
    assert runtime._governor is None and torch.get_num_threads() == 4


def test_evaluation_results_do_not_depend_on_the_thread_count(tmp_path):
    """What lets the governor change the count mid-evaluation: 1 or 2 threads, the same results (timings aside)."""
    out = tmp_path / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "train.threads=1",
                 "train.max_steps=2", "finetune.protocols=[slf]"]) == 0
    assert main(["finetune", "--run", str(out), "--quiet", "train.threads=1"]) == 0
    results = []
    for threads in (1, 2):
        assert main(["evaluate", "--run", str(out), "--quiet", f"train.threads={threads}", "eval.limit=64",
                     "eval.batch_size=64", "eval.corruptions=[]"]) == 0
        record = RunDir(out).read_results()
        slf = record["protocols"]["slf"]
        for key in ("seconds", "seconds_by_part"):
            slf.pop(key)
        for check in slf["integrity"]["checks"]:
            check.pop("seconds")
        record.pop("hardware")
        results.append(record)
    assert results[0] == results[1]


def test_a_command_called_from_python_leaves_the_thread_count_as_it_found_it(tmp_path, monkeypatch):
    """In a notebook the count a busy moment chose (1 of 2) must not outlive the call, nor the governor."""
    from robustcl import api

    monkeypatch.setattr(hardware, "usable_cpus", lambda: 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(ThreadGovernor, "start", lambda self, window=0.1: torch.set_num_threads(1) or 1)
    torch.set_num_threads(2)
    seen = []
    monkeypatch.setattr("robustcl.train.pretrain.pace_threads", lambda: seen.append(torch.get_num_threads()))
    api.pretrain("smoke", tmp_path / "run", ["train.threads=auto", "train.max_steps=2"])
    assert seen and set(seen) == {1}  # the governor's count while the command ran
    assert torch.get_num_threads() == 2 and not runtime.governed()  # the caller's, after it
