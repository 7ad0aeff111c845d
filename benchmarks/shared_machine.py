"""Speed beside other work (docs/performance.md "A shared machine"): a fixed evaluation and a fixed training
slice, each timed quiet and again beside CPU-bound competitors, in one run; the slowdown ratio of each.

    PYTHONPATH=. python benchmarks/shared_machine.py [--threads auto 2] [--repeats 2] [--json out.json]

Each workload is its own `python -m robustcl` process, as a user's command is, so whatever the runtime
sets when it opens applies. The evaluation: `evaluate --protocol slf --limit 500` (PGD-20, the eps curve
and the integrity checks with Square; no corruptions) of a run this script trains first (fmnist-gbrcl,
100 steps, an SLF head; untimed). The training slice: `pretrain --config fmnist-gbrcl` for 30 steps
(start-up included). A competitor is `python -c "while True: pass"`, started before and killed after the
workload. Goal on 2 cores with one competitor: at most 2x (the fair share); quiet, `auto` within 5% of a
fixed count of all cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from robustcl.hardware import cpu_capability, cpu_model, usable_cpus

PRESET = "fmnist-gbrcl"


def robustcl(*args: str) -> float:
    """Seconds one `python -m robustcl ...` process took (it must succeed)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "robustcl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"shared_machine: robustcl {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def prepare(work: Path) -> Path:
    """A small trained run with an SLF head, for the evaluation to read."""
    run = work / "base"
    robustcl("pretrain", "--config", PRESET, "--out", str(run), "--quiet", "train.max_steps=100")
    robustcl("finetune", "--run", str(run), "--protocol", "slf", "--quiet")
    return run


def evaluation(work: Path, base: Path, threads: str, limit: int) -> float:
    """The fixed evaluation on a fresh copy of the base run's encoder, config and heads."""
    run = work / "eval"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for name in ("config.yaml", "encoder.safetensors"):
        shutil.copy(base / name, run / name)
    shutil.copytree(base / "heads", run / "heads")
    return robustcl("evaluate", "--run", str(run), "--protocol", "slf", "--limit", str(limit), "--quiet",
                    "eval.corruptions=[]", f"train.threads={threads}")


def training(work: Path, threads: str, steps: int) -> float:
    """The fixed training slice: a fresh run of `steps` phase-1 steps."""
    run = work / "train"
    shutil.rmtree(run, ignore_errors=True)
    return robustcl("pretrain", "--config", PRESET, "--out", str(run), "--quiet", f"train.max_steps={steps}",
                    "train.checkpoint_every=100000", f"train.threads={threads}")


def beside(competitors: int, workload) -> float:  # noqa: ANN001 - a no-argument callable returning seconds
    """The workload's seconds while `competitors` busy loops run."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    time.sleep(0.5)  # the loops are running before the workload looks at the machine
    try:
        return workload()
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def measure(work: Path, base: Path, options: argparse.Namespace) -> list[dict]:
    """Quiet and loaded seconds of each workload and thread setting, `repeats` times, interleaved."""
    workloads = {"evaluate": lambda t: evaluation(work, base, t, options.limit),
                 "train": lambda t: training(work, t, options.steps)}
    seconds: dict[tuple[str, str, str], list[float]] = {}
    for repeat in range(options.repeats):
        for threads in options.threads:
            for name, workload in workloads.items():
                quiet = workload(threads)
                loaded = beside(options.competitors, lambda: workload(threads))
                seconds.setdefault((name, threads, "quiet"), []).append(quiet)
                seconds.setdefault((name, threads, "loaded"), []).append(loaded)
                print(f"repeat {repeat + 1}: {name} threads={threads}: quiet {quiet:.1f} s, beside "
                      f"{options.competitors} {loaded:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for name in workloads:
        for threads in options.threads:
            quiet = statistics.median(seconds[(name, threads, "quiet")])
            loaded = statistics.median(seconds[(name, threads, "loaded")])
            rows.append({"workload": name, "threads": threads, "quiet_s": round(quiet, 2), "loaded_s": round(loaded, 2),
                         "slowdown": round(loaded / quiet, 2), "runs": options.repeats})
    return rows


def table(rows: list[dict], report: dict) -> str:
    """The rows as Markdown, with the machine, the competitors and the quiet cost of each setting."""
    quiet = {(r["workload"], r["threads"]): r["quiet_s"] for r in rows}
    first = report["threads"][0]
    lines = [f"{report['cpu']} ({report['capability']}), {report['cores']} usable cores, torch {report['torch']}; "
             f"{report['competitors']} competitor(s); medians of {report['repeats']}",
             "", f"| workload | train.threads | quiet (s) | beside {report['competitors']} busy loop (s) | slowdown | "
             f"quiet vs threads={first} |", "|---|---|---|---|---|---|"]
    for r in rows:
        versus = r["quiet_s"] / quiet[(r["workload"], first)]
        lines.append(f"| {r['workload']} | {r['threads']} | {r['quiet_s']:.1f} | {r['loaded_s']:.1f} | "
                     f"{r['slowdown']:.2f}x | {versus:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", default=["auto", str(usable_cpus())],
                        help="train.threads settings to compare (default: auto and all usable cores)")
    parser.add_argument("--competitors", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--limit", type=int, default=500, help="test images the evaluation attacks")
    parser.add_argument("--steps", type=int, default=30, help="phase-1 steps of the training slice")
    parser.add_argument("--json", type=Path, help="also write the report here")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="robustcl-shared-") as tmp:
        work = Path(tmp)
        base = prepare(work)
        report = {"cpu": cpu_model(), "capability": cpu_capability().describe(), "cores": usable_cpus(),
                  "torch": torch.__version__, "competitors": options.competitors, "repeats": options.repeats,
                  "threads": options.threads, "loadavg_before": os.getloadavg()}
        report["rows"] = measure(work, base, options)
    print(table(report["rows"], report))
    if options.json is not None:
        options.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
