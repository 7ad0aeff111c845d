"""A sweep's summary: summary.md, summary.csv (raw per-seed rows), summary_stats.csv, summary_differences.csv and
clean_vs_robust.png from every finished run's results.json (and runs joined from --rows files).

Each configuration's cells are the mean ± std and a 95% t-interval over seeds; paired differences to the
spec's `baseline` and its `comparisons` come from robustcl/sweep/stats.py.
"""
from __future__ import annotations

import csv
import io
import itertools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from robustcl.runs import atomic_write_bytes, atomic_write_text
from robustcl.runs.layout import SweepLayout
from robustcl.stats import Interval, t_interval
from robustcl.sweep.plan import PlannedRun, SweepPlan, finished_results
from robustcl.sweep.rows import MergedRows
from robustcl.sweep.spec import comparisons
from robustcl.sweep.stats import (SUBSET_SEED, differences_csv, differences_markdown, paired_differences, raw_csv,
                                  suspect_lines)

MARKERS = {"slf": "o", "alf": "^"}
EXTRA_MARKERS = ("s", "D", "v", "P", "X", "*")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1) over seeds; std is None for a single seed."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class SummaryRow:
    """One (configuration, protocol, attack) cell group, aggregated over the configuration's seeds."""
    configuration: str
    method: str
    protocol: str
    branch: str
    attack: str
    seeds: tuple[int, ...]
    clean: tuple[float, float | None]
    robust: tuple[float, float | None]
    clean_ci: Interval | None = None    # 95% t-interval over seeds (no bounds for one seed)
    robust_ci: Interval | None = None
    corruption: tuple[float, float | None] | None = None  # common-corruption accuracy (CA) when every seed has it
    corruption_ci: Interval | None = None


def aggregate(entries: Sequence[tuple[PlannedRun, dict[str, Any]]]) -> list[SummaryRow]:
    """Group runs by configuration and average each protocol's clean and per-attack robust accuracy."""
    cells: dict[tuple[str, str, str], list[tuple[int, dict[str, Any], float, float]]] = {}
    for planned, results in entries:
        for protocol, r in results["protocols"].items():
            for attack, acc in r["robust"].items():
                cells.setdefault((planned.label, protocol, attack), []).append(
                    (planned.seed, {"method": results["method"], "branch": r["branch"],
                                    "corruption_acc": (r.get("corruptions") or {}).get("mean")}, r["clean_acc"], acc))
    rows = []
    for (label, protocol, attack), items in cells.items():
        row = SummaryRow(label, items[0][1]["method"], protocol, items[0][1]["branch"], attack,
                         tuple(i[0] for i in items), mean_std([i[2] for i in items]),
                         mean_std([i[3] for i in items]), t_interval([i[2] for i in items]),
                         t_interval([i[3] for i in items]))
        ca = [i[1].get("corruption_acc") for i in items]
        if ca and all(v is not None for v in ca):
            row.corruption, row.corruption_ci = mean_std(ca), t_interval(ca)
        rows.append(row)
    return rows


def _pct(stat: tuple[float, float | None]) -> str:
    mean, std = stat
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _ci(interval: Interval | None) -> str:
    if interval is None or interval.lo is None or interval.hi is None:
        return "-"
    return f"[{100 * interval.lo:.2f}, {100 * interval.hi:.2f}]"


def summary_markdown_table(rows: Sequence[SummaryRow]) -> str:
    """Markdown: one row per configuration x protocol x attack, mean ± std and the 95% t-interval in percent, n seeds."""
    with_ca = any(r.corruption is not None for r in rows)  # the CA columns only when some run measured it
    lines = ["| configuration | method | protocol | branch | attack | seeds | clean acc (%) | robust acc (%) | "
             "clean 95% CI | robust 95% CI |" + (" CA (%) | CA 95% CI |" if with_ca else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_ca else "")]
    for r in rows:
        ca = (f" {_pct(r.corruption) if r.corruption else '-'} | {_ci(r.corruption_ci)} |" if with_ca else "")
        lines.append(f"| {r.configuration} | {r.method} | {r.protocol.upper()} | {r.branch} | {r.attack} | "
                     f"{len(r.seeds)} | {_pct(r.clean)} | {_pct(r.robust)} | {_ci(r.clean_ci)} | {_ci(r.robust_ci)} |"
                     + ca)
    return "\n".join(lines)


CSV_COLUMNS = ["configuration", "method", "protocol", "branch", "attack", "n_seeds", "seeds",
               "clean_acc_mean", "clean_acc_std", "robust_acc_mean", "robust_acc_std",
               "clean_acc_ci_lo", "clean_acc_ci_hi", "robust_acc_ci_lo", "robust_acc_ci_hi",
               "corruption_acc_mean", "corruption_acc_std", "corruption_acc_ci_lo", "corruption_acc_ci_hi"]


def summary_csv(rows: Sequence[SummaryRow]) -> str:
    """summary_stats.csv with CSV_COLUMNS; fractions in [0, 1], std and the 95% t-interval empty for one seed."""
    def bound(interval: Interval | None, side: str) -> str:
        value = None if interval is None else getattr(interval, side)
        return "" if value is None else repr(value)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r.configuration, r.method, r.protocol, r.branch, r.attack, len(r.seeds),
                         " ".join(map(str, r.seeds)), repr(r.clean[0]), "" if r.clean[1] is None else repr(r.clean[1]),
                         repr(r.robust[0]), "" if r.robust[1] is None else repr(r.robust[1]),
                         bound(r.clean_ci, "lo"), bound(r.clean_ci, "hi"), bound(r.robust_ci, "lo"),
                         bound(r.robust_ci, "hi"), *_corruption_cells(r, bound)])
    return buffer.getvalue()


def _corruption_cells(r: SummaryRow, bound: Any) -> list[str]:
    """summary_stats.csv's corruption_acc_* cells (empty without a corruption accuracy)."""
    if r.corruption is None:
        return ["", "", "", ""]
    return [repr(r.corruption[0]), "" if r.corruption[1] is None else repr(r.corruption[1]),
            bound(r.corruption_ci, "lo"), bound(r.corruption_ci, "hi")]


def plot_clean_vs_robust(entries: Sequence[tuple[PlannedRun, dict[str, Any]]], path: Path) -> bool:
    """Scatter of clean vs robust accuracy: a point per run and protocol, colour per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not entries:
        return False
    labels = list(dict.fromkeys(p.label for p, _ in entries))
    protocols = list(dict.fromkeys(pr for _, res in entries for pr in res["protocols"]))
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colours = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    extra = itertools.cycle(EXTRA_MARKERS)
    markers = {p: MARKERS.get(p) or next(extra) for p in protocols}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    attacks = set()
    for planned, results in entries:
        for protocol, r in results["protocols"].items():
            attack, acc = next(iter(r["robust"].items()))
            attacks.add(attack)
            ax.scatter(100 * r["clean_acc"], 100 * acc, color=colours[planned.label], marker=markers[protocol],
                       s=42, edgecolors="black", linewidths=0.4)
    for get, set_ in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        lo, hi = get()
        set_(max(lo, -1.0), max(hi, 1.0))  # accuracies: no axis far below 0 when every point is at 0
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%){' under ' + next(iter(attacks)) if len(attacks) == 1 else ''}")
    handles = [Line2D([], [], ls="", marker="o", color=colours[label], label=label) for label in labels]
    handles += [Line2D([], [], ls="", marker=markers[p], color="grey", label=p.upper()) for p in protocols]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _configuration_lines(plan: SweepPlan) -> list[str]:
    """What each configuration is: its config and the overrides that distinguish it."""
    common = len(plan.sweep.spec.overrides)
    seen: dict[str, str] = {}
    for r in plan.runs:
        own = r.overrides[common:len(r.overrides) - len(plan.overrides) - 1]
        seen.setdefault(r.label, f"- `{r.label}`: {r.config}" + (f" with {' '.join(own)}" if own else ""))
    return list(seen.values())


def _evaluation_lines(entries: Sequence[tuple[PlannedRun, dict[str, Any]]]) -> list[str]:
    """Each distinct test set and attack, once (a per-seed random subset is said so)."""
    from robustcl.runs.report import describe_attack

    rows = [res for _, res in entries if res.get("from_rows")]
    entries = [(p, res) for p, res in entries if not res.get("from_rows")]
    if not entries and rows:  # rows only: their test set as their summary.csv names it (attacks: the table's)
        return [f"Evaluated on {s} (from --rows)." for s in dict.fromkeys(SUBSET_SEED.sub("", str(r.get("eval_subset")))
                                                                           for r in rows)]
    subsets = [str(res.get("eval_subset", "?")) for _, res in entries]
    per_seed = any(SUBSET_SEED.search(s) for s in subsets)
    setups = dict.fromkeys(f"{SUBSET_SEED.sub('', s)}; attack {describe_attack(res)}"
                           for s, (_, res) in zip(subsets, entries))
    note = ["The test subset is drawn from each run's seed, so the ± also covers which test images were drawn."]
    return [f"Evaluated on {s}." for s in setups] + (note if per_seed else [])


def _rows_lines(merged: MergedRows | None) -> list[str]:
    """Which runs came from --rows files and whether the runs both have agree."""
    if merged is None:
        return []
    lines = [f"{len(merged.entries)} runs from the raw rows of {', '.join(map(str, merged.sources))} "
             f"(`--rows`: finished elsewhere; no per-image flags, so their differences have the seed interval only): "
             + (", ".join(f"`{p.name}`" for p, _ in merged.entries) or "none") + "."]
    if merged.agreed:
        lines.append(f"Runs in both the directory and the rows, every accuracy equal: {', '.join(merged.agreed)}.")
    lines += [f"**Disagrees with its row** (the directory's run is used): {d}" for d in merged.disagreements]
    return lines


def write_summary(plan: SweepPlan, failed: dict[str, str] | None = None, merged: MergedRows | None = None,
                  elsewhere: Sequence[str] = ()) -> Path:
    """summary.md, summary.csv (raw per-seed rows), summary_stats.csv, summary_differences.csv (with a baseline)
    and clean_vs_robust.png in the sweep directory (`SweepLayout`; the caller has claimed it); returns summary.md.
    `merged`: runs from other summary.csv files (robustcl/sweep/rows.py) for runs this directory lacks;
    `elsewhere`: runs another live process was running (said so while they have no results)."""
    files = SweepLayout(plan.out)
    entries = finished_results(plan)
    if merged is not None:
        order = {r.name: i for i, r in enumerate(plan.runs)}
        entries = sorted([*entries, *merged.entries], key=lambda e: order[e[0].name])
    rows = aggregate(entries)
    atomic_write_text(files.summary_csv, raw_csv(entries))
    atomic_write_text(files.stats_csv, summary_csv(rows))
    plotted = plot_clean_vs_robust(entries, files.plot)
    spec = plan.sweep.spec
    lines = [f"# Sweep {spec.name}", "", plan.sweep.description, "",
             f"Spec: {plan.sweep.origin}; {len(entries)} of {len(plan.runs)} runs finished; seeds {list(spec.seeds)}. "
             "Each cell is the mean ± sample standard deviation (n-1) over seeds, in percent; `seeds` is n; the 95% CI "
             "is Student's t over seeds, mean ± t(0.975, n-1)·s/√n (docs/statistics.md; none for one seed); CA, when "
             "measured, is the common-corruption accuracy (docs/corruptions.md) with the same statistics. "
             "Accuracy is read through the branch named (the same one for clean and robust). summary.csv holds "
             "every run's raw numbers, summary_stats.csv this table.",
             *_evaluation_lines(entries), *suspect_lines(entries), *_rows_lines(merged), "",
             summary_markdown_table(rows), ""]
    if spec.baseline or spec.comparisons:
        diffs = paired_differences(entries, spec.baseline) if spec.baseline else []
        for label, base in comparisons(spec):
            diffs += paired_differences([e for e in entries if e[0].label in (label, base)], base)
        atomic_write_text(files.differences_csv, differences_csv(diffs, spec.baseline))
        lines += [*differences_markdown(diffs, spec.baseline), ""]
    lines += ["Configurations:", *_configuration_lines(plan), ""]
    if spec.overrides or plan.overrides:
        lines += [f"Overrides for every run: {' '.join((*spec.overrides, *plan.overrides))}", ""]
    lines += _unfinished_lines(plan, {p.name for p, _ in entries}, failed or {}, elsewhere)
    if plotted:
        lines += ["![clean vs robust accuracy](clean_vs_robust.png)", ""]
    lines += ["Run directories: " + ", ".join(f"`{r.name}`" for r in plan.runs), ""]
    atomic_write_text(files.summary, "\n".join(lines))
    return files.summary


def _unfinished_lines(plan: SweepPlan, finished: set[str], failed: dict[str, str], elsewhere: Sequence[str]) -> list[str]:
    """The runs without results (those another process is running said apart) and the runs that failed."""
    running = [name for name in elsewhere if name not in finished]
    missing = [r.name for r in plan.runs if r.name not in finished and r.name not in running]
    lines = []
    if missing:
        lines += [f"Runs without results: {', '.join(missing)}", ""]
    if running:
        lines += [(f"Running in another process when this summary was written (that sweep writes the summary again "
                   f"when it ends): {', '.join(running)}"), ""]
    if failed:
        lines += [*(f"- `{name}` failed: {message}" for name, message in failed.items()), ""]
    return lines
