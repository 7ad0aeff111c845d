"""benchmarks/gpu_ladder.sh: the GPU ladder's flow on a CPU at a tiny size, reading Fashion-MNIST only from the carried copy."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_ladder.sh"
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def run_script(env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=timeout)


def test_without_the_carried_data_it_stops_and_says_how(tmp_path):
    done = run_script({"DATA_ROOT": str(tmp_path / "nothing"), "OUT": str(tmp_path / "out")}, timeout=120)
    assert done.returncode == 1
    assert f"Fashion-MNIST not found (or corrupt) in {tmp_path / 'nothing'}; run PREPARE=1" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(), reason="needs Fashion-MNIST installed (make data)")
def test_prepare_then_the_tiny_ladder_writes_the_summary(tmp_path):
    data = tmp_path / "carried" / "fashion-mnist"
    prepared = run_script({"PREPARE": "1", "DATA_ROOT": str(data)}, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in SYSTEM_FMNIST.iterdir() if p.suffix == ".gz")

    out = tmp_path / "out"
    env = {"DEVICE": "cpu", "SMALL": "1", "SEEDS": "0 1", "JOBS": "2", "BUDGET_S": "3000", "DATA_ROOT": str(data),
           "OUT": str(out), "WORK": str(tmp_path / "work"), "ROBUSTCL_DATA": str(tmp_path / "empty-cache")}
    done = run_script(env, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "gpu_ladder.json").read_text())
    assert record["runs_finished"] == record["runs_planned"] == 8
    assert record["seeds"] == {"0": ["ok", record["seeds"]["0"][1]], "1": ["ok", record["seeds"]["1"][1]]}

    light = out / "fmnist32-resnet18-ladder"
    summary = (light / "summary.md").read_text()
    assert "## Paired difference to the baseline `adv-only`" in summary
    for rung in ("+benign", "+sam", "+critic"):
        for protocol in ("SLF", "ALF"):
            assert f"| {rung} | adv-only | {protocol} | pgd2-linf-0.1 | 2 |" in summary  # configuration, minus, ...
    with open(light / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    for run in {r["run"] for r in rows}:
        config = (light / run / "config.yaml").read_text()
        assert f"root: {data}" in config and "size: 32" in config  # the carried copy, resized to 32 px
        assert (light / run / "per_image.npz").is_file() and (light / run / "results.json").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".safetensors")]  # only light files come back
