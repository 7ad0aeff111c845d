"""report.md and plots/*.png for one run or a comparison of runs (matplotlib, headless)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from robustcl.runs.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from robustcl.runs.rundir import RunDir  # noqa: E402

LOSS_KEYS_SKIP = {"phase", "step", "epoch", "lr", "images_per_s"}


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_loss_terms(runs: Sequence[tuple[str, RunDir]], path: Path) -> None:
    """One panel per logged phase-1 term (loss terms, critic accuracy), a line per run."""
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for label, run in runs:
        for record in run.iter_metrics("pretrain"):
            for key, value in record.items():
                if key not in LOSS_KEYS_SKIP and isinstance(value, (int, float)):
                    xs, ys = series.setdefault(key, {}).setdefault(label, ([], []))
                    xs.append(record["step"])
                    ys.append(value)
    if not series:
        return
    keys = sorted(series)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, (xs, ys) in series[key].items():
            ax.plot(xs, ys, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_diagnostics(runs: Sequence[tuple[str, RunDir]], path: Path) -> bool:
    """k-NN clean / robust accuracy and critic accuracy against step (phase-1 diagnostics); False if none."""
    panels = {"k-NN accuracy (validation)": ("knn_clean", "knn_robust"),
              "critic accuracy (validation)": ("critic_acc",)}
    records = [(label, list(run.iter_metrics("diagnostics"))) for label, run in runs]
    if not any(rs for _, rs in records):
        return False
    present = {k for _, rs in records for r in rs for k in r}
    shown = {title: keys for title, keys in panels.items() if present & set(keys)}
    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], shown.items()):
        for label, rs in records:
            for key in keys:
                points = [(r["step"], 100 * r[key]) for r in rs if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", label=f"{label} {key}" if len(runs) > 1 else key)
        if "knn_clean" in keys and records[0][1]:
            ax.axhline(100 * records[0][1][-1].get("chance", 0), color="grey", lw=0.8, ls="--", label="chance")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def diagnostics_section(run: RunDir) -> list[str]:
    """report.md lines for the phase-1 diagnostics (empty when the run logged none)."""
    records = list(run.iter_metrics("diagnostics"))
    if not records:
        return []
    last = records[-1]
    critic = f", critic {100 * last['critic_acc']:.1f}%" if last.get("critic_acc") is not None else ""
    lines = ["## Diagnostics", "",
             f"k-NN (cosine, k={last.get('k')}, exp(cos/T)-weighted votes) of {last.get('branch')}-branch encoder "
             f"features on held-out validation images ({last.get('n_bank')} bank, {last.get('n_queries')} queries, "
             f"{last.get('n_attack')} attacked by feature-space PGD at eps {last.get('eps', 0):.4g}); "
             f"{len(records)} checks. At step {last['step']}: clean {100 * last['knn_clean']:.1f}%, "
             f"robust {100 * last['knn_robust']:.1f}%{critic}.", "", "![diagnostics](plots/diagnostics.png)", ""]
    groups: dict[str, list[tuple[int, str]]] = {}
    for r in records:
        for w in r.get("warnings", []):
            groups.setdefault(w.split(": ", 1)[0], []).append((r["step"], w))
    lines += [f"- {len(g)} check(s), steps {g[0][0]}-{g[-1][0]}; latest: {g[-1][1]}" for g in groups.values()]
    return lines + ([""] if groups else ["No warnings.", ""])


def plot_eps_curves(entries: Sequence[tuple[str, list[dict[str, float]]]], path: Path, eps_mark: float) -> None:
    """Robust accuracy against eps, a line per (run, protocol)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, curve in entries:
        ax.plot([c["eps"] for c in curve], [100 * c["accuracy"] for c in curve], marker="o", label=label)
    ax.axvline(eps_mark, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("L-inf eps (pixel scale)")
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    _save(fig, path)


def results_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table: one row per (run, protocol) with branch, clean and robust accuracy."""
    lines = ["| run | method | protocol | branch | clean acc (%) | robust acc (%) | attack | best epoch (val) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, results in rows:
        for protocol, r in results.get("protocols", {}).items():
            for attack, acc in r["robust"].items():
                lines.append(f"| {label} | {results['method']} | {protocol.upper()} | {r['branch']} | "
                             f"{100 * r['clean_acc']:.2f} | {100 * acc:.2f} | {attack} | "
                             f"{r['best_epoch']} ({r['selected_on']}) |")
    return "\n".join(lines)


def hardware_line(hw: dict[str, Any]) -> str:
    """Where a result was computed: device (CPU capability or GPU name), resolved precisions, threads."""
    return (f"Machine: {hw['device']}; phase 1/2 precision {hw['train_precision']} (resolved), attacks "
            f"{hw['eval_precision']}, {hw['threads']} threads.")


def write_report(run: RunDir, title: str | None = None) -> Path:
    """report.md for one run from its results.json and metrics.jsonl, with plots."""
    results = run.read_results()
    plot_loss_terms([(run.root.name, run)], run.plots / "loss_terms.png")
    curves = [(f"{p.upper()} ({r['branch']})", r["eps_curve"]) for p, r in results.get("protocols", {}).items()]
    if curves:
        plot_eps_curves(curves, run.plots / "robust_vs_eps.png", results["attack"]["eps"])
    text = [f"# {title or run.root.name}", "",
            f"Evaluated on {results.get('eval_subset', '?')}; attack: {describe_attack(results)}.",
            f"{results.get('branch_note', '')}; epochs selected on a validation split held out from the training data.",
            *([hardware_line(results["hardware"])] if "hardware" in results else []),
            "", results_table([(run.root.name, results)]), "", *integrity_lines(run.root.name, results), "",
            "![loss terms](plots/loss_terms.png)", "", "![robust accuracy vs eps](plots/robust_vs_eps.png)", ""]
    steps = [(f"{p.upper()} ({r['branch']})", r["steps_curve"]) for p, r in results.get("protocols", {}).items()
             if r.get("steps_curve")]
    if steps:
        plot_steps_curves(steps, run.plots / "robust_vs_steps.png")
        text += ["![robust accuracy vs PGD steps](plots/robust_vs_steps.png)", ""]
    extra = autoattack_lines(run.root.name, results)
    if extra:
        text += ["## AutoAttack", "", *extra, ""]
    text += corruption_section([(run.root.name, results)], run.plots / "corruptions.png")
    mixed = mixed_reading_lines(run.root.name, results)
    if mixed:
        text += ["## Mixed-branch reading (reference protocol; not a headline number)", "", *mixed, ""]
    reference = reference_reading_lines(run.root.name, results)
    if reference:
        text += ["## Reference reading (the authors' linear evaluation; not a headline number)", "", *reference, ""]
    if plot_diagnostics([(run.root.name, run)], run.plots / "diagnostics.png"):
        text += diagnostics_section(run)
    if run.bound_section.is_file():  # the "Bound terms" section written by `robustcl bound`
        text += [run.bound_section.read_text(encoding="utf-8"), ""]
    atomic_write_text(run.report, "\n".join(text))
    return run.report


def corruption_table(record: dict[str, Any]) -> list[str]:
    """Markdown: accuracy (%) per corruption (rows) and severity (columns), each row's mean, and CS-1..CS-5."""
    severities = [str(s) for s in record["severities"]]
    lines = ["| corruption | " + " | ".join(f"severity {s}" for s in severities) + " | mean |",
             "|---|" + "---|" * (len(severities) + 1)]
    for name, cells in record["per"].items():
        values = [cells[s] for s in severities]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in values)
                     + f" | {100 * sum(values) / len(values):.2f} |")
    lines.append("| **mean (CS-k; CA)** | " + " | ".join(f"**{100 * record['per_severity'][s]:.2f}**" for s in severities)
                 + f" | **{100 * record['mean']:.2f}** |")
    return lines


def corruption_headline(label: str, protocol: str, record: dict[str, Any], branch: str) -> str:
    """One line: a protocol's corruption accuracy against its clean accuracy on the same images."""
    what = ("CA (the benchmark's 15 corruptions x severities 1-5)" if record.get("standard")
            else f"mean over {len(record['names'])} corruption(s) x severities {record['severities']} "
                 "(not the benchmark's CA: another set of corruptions or severities)")
    return (f"- {label} {protocol.upper()} ({branch} branch): {what} **{100 * record['mean']:.2f}%** on "
            f"{record['n']} images per cell; clean accuracy on the same images {100 * record['clean_on_same_images']:.2f}%; "
            f"source: {record['source']}")


def plot_corruptions(entries: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Accuracy against severity (0: clean on the same images), a panel per model: each corruption thin, the mean bold."""
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 3.4), squeeze=False)
    for ax, (label, record) in zip(axes[0], entries):
        severities = [0, *record["severities"]]
        for name, cells in record["per"].items():
            ys = [record["clean_on_same_images"], *(cells[str(s)] for s in record["severities"])]
            ax.plot(severities, [100 * y for y in ys], lw=0.8, alpha=0.6, label=name)
        mean = [record["clean_on_same_images"], *(record["per_severity"][str(s)] for s in record["severities"])]
        ax.plot(severities, [100 * y for y in mean], color="black", lw=2.2, marker="o", label="mean")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("severity (0: clean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def corruption_section(runs: Sequence[tuple[str, dict[str, Any]]], plot: Path) -> list[str]:
    """report.md's "Common corruptions" section for the runs' protocols that measured them (else nothing)."""
    found = [(label, protocol, r) for label, results in runs for protocol, r in results.get("protocols", {}).items()
             if r.get("corruptions")]
    if not found:
        return []
    plot_corruptions([(f"{label} {p.upper()} ({r['branch']})", r["corruptions"]) for label, p, r in found], plot)
    lines = ["## Common corruptions", "",
             "Accuracy (%) on corrupted test images (Hendrycks & Dietterich 2019; docs/corruptions.md), through the "
             "same BN branch and head as the clean and robust numbers. CS-k: the mean over the corruptions at "
             "severity k; CA: the mean over every corruption and severity.", ""]
    for label, protocol, r in found:
        lines += [corruption_headline(label, protocol, r["corruptions"], r["branch"]), "",
                  *corruption_table(r["corruptions"]), ""]
    return lines + [f"![accuracy vs corruption severity](plots/{plot.name})", ""]


def autoattack_lines(label: str, results: dict[str, Any]) -> list[str]:
    """Report lines: AutoAttack's accuracy after each of its attacks, per protocol that ran it."""
    lines = []
    for protocol, r in results.get("protocols", {}).items():
        aa = r.get("autoattack")
        if aa:
            steps = ", ".join(f"{k.upper()} {100 * v:.1f}" for k, v in aa["after"].items())
            lines.append(f"- {label} {protocol.upper()}: standard AutoAttack ({aa['implementation']}, L-inf eps "
                         f"{aa['eps']:.4g}, {aa['n']} images, {aa['seconds']:.0f} s): **{100 * aa['accuracy']:.2f}%**; "
                         f"accuracy after each attack: {steps}" + (f"; warnings: {'; '.join(aa['warnings'])}"
                                                                   if aa["warnings"] else ""))
    return lines


def mixed_reading_lines(label: str, results: dict[str, Any]) -> list[str]:
    """Report lines for the reference protocol's mixed-branch reading, always labelled as such."""
    lines = []
    for protocol, r in results.get("protocols", {}).items():
        m = r.get("mixed_reading")
        if m:
            lines.append(f"- {label} {protocol.upper()}: clean {100 * m['clean_acc_benign_branch']:.2f}% (benign branch) / "
                         f"robust {100 * m['robust_acc_adversarial_branch']:.2f}% (adversarial branch), head trained on "
                         f"the {m['head_trained_on']} branch. **{m['label']}**")
    return lines


def reference_reading_lines(label: str, results: dict[str, Any]) -> list[str]:
    """Report lines for the authors' linear evaluation, each beside the honest reading of the same protocol."""
    reading = results.get("reference_reading")
    if not reading:
        return []
    a = reading["test_attack"]
    lines = [f"**{reading['label']}** Test attack: PGD-{a['steps']} L-inf, eps {a['eps']:.4g}, step {a['alpha']:.4g}, "
             f"{a['random_start']} random start."]
    for protocol, r in reading["protocols"].items():
        honest = results.get("protocols", {}).get(protocol)
        beside = ""
        if honest:
            pgd_key = next(iter(honest["robust"]))
            beside = (f"; honest reading: clean {100 * honest['clean_acc']:.2f}% / "
                      f"robust {100 * honest['robust'][pgd_key]:.2f}% "
                      f"({pgd_key}), both through the {honest['branch']} branch, epoch {honest['best_epoch']} picked on "
                      f"{honest['selected_on']}")
        lines.append(f"- {label} {protocol.upper()} (reference reading): clean {100 * r['clean_acc_benign_branch']:.2f}% "
                     f"(benign branch) / robust {100 * r['robust_acc_adversarial_branch']:.2f}% (adversarial branch), "
                     f"epoch {r['epoch']} of {r['epochs']} picked on TEST robust accuracy, head trained on the "
                     f"{r['head_trained_on']} branch{beside}")
    return lines


def plot_steps_curves(entries: Sequence[tuple[str, list[dict[str, float]]]], path: Path) -> None:
    """PGD accuracy against the number of attack steps, a line per protocol (a converged attack is flat)."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, curve in entries:
        ax.plot([c["steps"] for c in curve], [100 * c["accuracy"] for c in curve], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("PGD steps")
    ax.set_ylabel("PGD accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    _save(fig, path)


def integrity_lines(label: str, results: dict[str, Any]) -> list[str]:
    """Report lines: a bold SUSPECT line per protocol whose integrity checks failed, else one pass line."""
    lines = []
    for protocol, r in results.get("protocols", {}).items():
        integrity = r.get("integrity")
        if integrity is None:
            continue
        if integrity["passed"]:
            on = f" on {integrity['images']} images" if "images" in integrity else ""
            lines.append(f"- {label} {protocol.upper()}: integrity checks passed{on} ({len(integrity['checks'])}: "
                         + ", ".join(c["name"] for c in integrity["checks"]) + ")")
        else:
            failed = "; ".join(f"{c['name']}: {c['detail']}" for c in integrity["checks"] if not c["passed"])
            lines.append(f"- **SUSPECT: {label} {protocol.upper()} failed integrity checks: {failed}**")
    return lines


def describe_attack(results: dict[str, Any]) -> str:
    a = results.get("attack", {})
    return (f"{a.get('type')}-{a.get('steps')} {a.get('norm')}, eps {a.get('eps', 0):.4g}, step {a.get('alpha', 0):.4g}, "
            f"random start {a.get('random_start')}, {a.get('precision')}")
