"""`robustcl demo`: gbrcl against SimCLR on Fashion-MNIST, end to end, with one comparison report."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Sequence

import torch

import yaml

import robustcl.methods  # noqa: F401 - registers the methods configs are built with
from robustcl.config import load_config
from robustcl.evaluation.run_eval import evaluate_run
from robustcl.hardware import cpu_capability
from robustcl.runs import RunDir, RunError, atomic_write_text
from robustcl.runs.progress import Progress
from robustcl.runs.report import (corruption_section, describe_attack, integrity_lines, plot_eps_curves,
                                  plot_loss_terms, results_table)
from robustcl.runtime import config_change, open_runtime, started_config
from robustcl.train.finetune import finetune
from robustcl.train.pretrain import pretrain

DEMO_PRESETS = ("fmnist-gbrcl", "fmnist-simclr")
# The demo reports the benchmark's third number too: the 15 corruptions x 5 severities on a seeded 200 of the 500
# evaluated images (docs/corruptions.md "What it costs" has the seconds this adds to the 300 s budget).
DEMO_CORRUPTIONS_LIMIT = 200
DEMO_OVERRIDES = ("eval.corruptions=all", f"eval.corruptions_limit={DEMO_CORRUPTIONS_LIMIT}")


def _complete(run: RunDir, protocols: Sequence[str]) -> bool:
    return run.results.is_file() and all(run.head(p).is_file() for p in protocols)


def run_demo(out: Path, overwrite: bool = False, progress: bool = True, overrides: Sequence[str] = ()) -> Path:
    """Pretrain, fine-tune (SLF, ALF) and evaluate both presets under `out`; returns the report path.

    Finished runs are reused (and interrupted ones resumed) unless `overwrite`. With `progress`, a line on
    stderr names each method and phase as it starts ("demo: gbrcl — pretrain").
    """
    shown = Progress("demo", show=progress)
    timings: dict[str, float] = {}
    stage_times: dict[str, dict[str, float]] = {}  # where each method's time went (empty: reused)
    runs: list[tuple[str, RunDir]] = []
    for preset in DEMO_PRESETS:
        cfg = load_config(preset, [*DEMO_OVERRIDES, *overrides])
        run = RunDir(out / cfg.method.name)
        cfg = open_runtime(cfg, None if overwrite else started_config(run.config)).cfg
        if run.config.is_file() and not overwrite:
            changed = config_change(yaml.safe_load(run.config.read_text()) or {}, cfg)
            if changed:
                raise RunError(f"{run.root} holds a run with other settings ({changed}); "
                               "pass --overwrite to redo it or choose another --out")
        t0 = time.perf_counter()
        stages: dict[str, float] = {}
        if overwrite or not _complete(run, cfg.finetune.protocols):
            resume = not overwrite and run.checkpoint.is_file()
            shown.say(f"demo: {cfg.method.name} — pretrain")
            pretrain(cfg, run, resume=resume, overwrite=overwrite or not resume, progress=progress)
            stages["pretrain"] = time.perf_counter() - t0
            shown.say(f"demo: {cfg.method.name} — fine-tune ({', '.join(cfg.finetune.protocols).upper()})")
            fitted = finetune(cfg, run, progress=progress, overwrite=True)  # this flow owns the run
            stages.update({f"fit {p.upper()}": r["seconds"] for p, r in fitted.items()})
            t1 = time.perf_counter()
            shown.say(f"demo: {cfg.method.name} — evaluate")
            evaluate_run(cfg, run, progress=progress)
            stages["evaluate"] = time.perf_counter() - t1
        else:
            shown.say(f"demo: {cfg.method.name} — finished run reused ({run.root})")
        timings[cfg.method.name] = time.perf_counter() - t0
        stage_times[cfg.method.name] = stages
        runs.append((cfg.method.name, run))
    shown.say("demo: report")
    return write_demo_report(out, runs, timings, stage_times)


def time_split_lines(results: list[tuple[str, dict]], stage_times: dict[str, dict[str, float]]) -> list[str]:
    """Report lines: each method's seconds by stage, and its evaluation's seconds by part."""
    lines = []
    for label, res in results:
        stages = stage_times.get(label)
        if not stages:
            continue
        lines.append(f"- {label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
        for protocol, r in res["protocols"].items():
            parts = r.get("seconds_by_part", {})
            lines.append(f"  - evaluate {protocol.upper()}: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
    return lines


def ca_lines(results: list[tuple[str, dict]]) -> list[str]:
    """Report lines: each method's clean / robust / corruption accuracy side by side (the benchmark's three)."""
    lines = []
    for label, res in results:
        for protocol, r in res["protocols"].items():
            c = r.get("corruptions")
            if c:
                key = next(iter(r["robust"]))
                lines.append(f"- {label} {protocol.upper()}: clean {100 * r['clean_acc']:.2f}% / {key} "
                             f"{100 * r['robust'][key]:.2f}% / {'CA' if c.get('standard') else 'corrupted'} "
                             f"**{100 * c['mean']:.2f}%** (clean on the same {c['n']} images "
                             f"{100 * c['clean_on_same_images']:.2f}%)")
    return ["Clean / robust / common-corruption accuracy:", *lines] if lines else []


def write_demo_report(out: Path, runs: list[tuple[str, RunDir]], timings: dict[str, float],
                      stage_times: dict[str, dict[str, float]] | None = None) -> Path:
    """report.md comparing the runs: table, gap in robust accuracy, loss-term and eps-curve plots."""
    results = [(label, run.read_results()) for label, run in runs]
    plot_loss_terms(runs, out / "plots" / "loss_terms.png")
    curves = [(f"{label} {p.upper()} ({r['branch']})", r["eps_curve"])
              for label, res in results for p, r in res["protocols"].items()]
    first = results[0][1]
    plot_eps_curves(curves, out / "plots" / "robust_vs_eps.png", first["attack"]["eps"])
    gaps = []
    by_label = dict(results)
    if "gbrcl" in by_label and "simclr" in by_label:
        for protocol in by_label["gbrcl"]["protocols"]:
            if protocol in by_label["simclr"]["protocols"]:
                g = by_label["gbrcl"]["protocols"][protocol]
                s = by_label["simclr"]["protocols"][protocol]
                key = next(iter(g["robust"]))
                gaps.append(f"- {protocol.upper()}: gbrcl {100 * g['robust'][key]:.2f}% ({g['branch']} branch) vs simclr "
                            f"{100 * s['robust'][key]:.2f}% ({s['branch']} branch): "
                            f"**{100 * (g['robust'][key] - s['robust'][key]):+.2f} points** under {key}")
    lines = [
        "# robustcl demo: gbrcl vs SimCLR on Fashion-MNIST", "",
        f"Test images: {first['eval_subset']}. Attack: {describe_attack(first)}.",
        "Each method is read through its headline BN branch (gbrcl: adversarial; SimCLR has only the benign one), "
        "the same branch for clean and robust accuracy. Linear-head epochs were selected on a validation split "
        "held out from the training data, never on the test set.", "",
        results_table(results), "", "Integrity checks (every evaluation):",
        *[line for label, res in results for line in integrity_lines(label, res)], "",
        "Robust-accuracy gap:", *gaps, "", *ca_lines(results), "",
        "Wall time per method (pretrain + fine-tune + evaluate; 0 when a finished run was reused): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ". Split:",
        *time_split_lines(results, stage_times or {}),
        f"Machine: {first.get('hardware', {}).get('device', platform.machine())} "
        f"(CPU capability {cpu_capability().describe()}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "precision (resolved from `auto`): " + ", ".join(
            f"{label} {res.get('hardware', {}).get('train_precision', '?')}" for label, res in results)
        + f", attacks {first.get('hardware', {}).get('eval_precision', '?')}.", "",
        "![loss terms](plots/loss_terms.png)", "", "![robust accuracy vs eps](plots/robust_vs_eps.png)", "",
        *corruption_section(results, out / "plots" / "corruptions.png"),
        "Run directories: " + ", ".join(f"`{run.root}`" for _, run in runs), "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report
