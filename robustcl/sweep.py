"""`robustcl sweep`: a list or grid of configs through pretrain -> finetune -> evaluate, one comparison table.

A spec (YAML: shipped in robustcl/presets/sweeps/, or a path) names runs explicitly and/or as a grid
(a base config x the product of override axes); every run is repeated per seed in <out>/<name>-s<seed>.
Finished runs (results.json) are skipped, interrupted ones (checkpoints/last.pt) resumed, and
summary.md, summary_stats.csv and clean_vs_robust.png aggregate all results.json files (mean ± std and a 95%
t-interval over seeds; paired differences to the spec's `baseline`, robustcl/sweep_stats.py); summary.csv
keeps the raw per-seed rows.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from robustcl.config import Config, ConfigError, build, dump_yaml, first_difference, from_mapping, load_config
from robustcl.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text
from robustcl.stats import Interval, t_interval
from robustcl.sweep_launch import LaunchSettings, run_local_processes, run_submitit, shard_runs

if TYPE_CHECKING:
    from robustcl.sweep_rows import MergedRows

SWEEP_PACKAGE = "robustcl.presets"
SWEEP_FOLDER = "sweeps"
NAME_RE = re.compile(r"^[A-Za-z0-9_+=][A-Za-z0-9._=+,-]*$")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=+,-]")
SUBSET_SEED = re.compile(r" \(seed -?\d+\)")  # results.json's eval_subset names the seed of a random subset
MARKERS = {"slf": "o", "alf": "^"}
EXTRA_MARKERS = ("s", "D", "v", "P", "X", "*")


# ------------------------------------------------------------------------------------------ spec
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_overrides(items: Sequence[str], where: str) -> None:
    """Overrides must be key=value and may not set the seed (the spec's `seeds` does)."""
    for item in items:
        _check("=" in item, f"{where}: override {item!r} must look like key=value, e.g. train.max_steps=50")
        _check(item.split("=", 1)[0].strip() != "seed",
               f"{where}: override {item!r} sets the seed; list seeds in the spec's `seeds` instead")


@dataclass
class RunEntry:
    """One explicit run of a spec: a configuration name, a preset or YAML path, overrides."""
    name: str = ""
    config: str = ""
    overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(bool(self.name), f"sweep runs entry (config {self.config!r}) needs a name")
        _check(bool(NAME_RE.match(self.name)),
               f"sweep run name {self.name!r} must be letters, digits and . _ = + , - (no / or leading . or -)")
        _check(bool(self.config), f"sweep run {self.name} needs config: <preset name or YAML path>")
        _check_overrides(self.overrides, f"sweep run {self.name}")


@dataclass
class GridSpec:
    """A base config crossed with the product of override axes ({dotted.key: [values]})."""
    base: str = ""
    axes: Any = None
    overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(bool(self.base), "sweep grid needs base: <preset name or YAML path>")
        _check(isinstance(self.axes, dict) and len(self.axes) > 0,
               f"sweep grid.axes must be a non-empty mapping {{dotted.key: [values]}}, got {self.axes!r}")
        for key, values in self.axes.items():
            _check(isinstance(key, str) and bool(key) and "=" not in key, f"sweep grid.axes key {key!r} is not a dotted config key")
            _check(key != "seed", "sweep grid.axes.seed: list seeds in the spec's `seeds` instead")
            _check(isinstance(values, list) and len(values) > 0,
                   f"sweep grid.axes.{key} must be a non-empty list of values, got {values!r}")
        _check_overrides(self.overrides, "sweep grid")


@dataclass
class SweepSpec:
    """The YAML schema of a sweep spec."""
    name: str = ""
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()
    runs: tuple[RunEntry, ...] = ()
    grid: GridSpec | None = None
    baseline: str = ""   # a configuration name: the summary adds every other one's paired difference to it
    comparisons: tuple[str, ...] = ()  # "A vs B" pairs: the summary adds A's paired difference to B, for each

    def validate(self) -> None:
        _check(bool(NAME_RE.match(self.name)), f"sweep name {self.name!r} must be letters, digits and . _ = + , -")
        _check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
               f"sweep seeds {list(self.seeds)!r} must be a non-empty list of distinct integers")
        _check(bool(self.runs) or self.grid is not None, "sweep spec needs `runs`, `grid` or both")
        _check_overrides(self.overrides, "sweep overrides")


@dataclass
class Sweep:
    """A loaded spec with where it came from (relative config paths resolve against `folder`)."""
    spec: SweepSpec
    origin: str
    description: str
    folder: Path | None


def _sweep_entries() -> dict[str, Any]:
    folder = resources.files(SWEEP_PACKAGE) / SWEEP_FOLDER
    if not folder.is_dir():
        return {}
    return {e.name[:-5]: e for e in sorted(folder.iterdir(), key=lambda p: p.name) if e.name.endswith(".yaml")}


def _first_comment(text: str) -> str:
    """A spec's first line, a comment saying what the sweep answers and its source."""
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def list_sweeps() -> dict[str, str]:
    """Shipped sweep spec name -> first comment line (what it answers and its source)."""
    return {name: _first_comment(entry.read_text()) for name, entry in _sweep_entries().items()}


def _read_spec_text(name_or_path: str) -> tuple[str, str, Path | None]:
    """(text, origin, folder) of a shipped spec name or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        _check(path.is_file(), f"sweep spec file {path} does not exist; give a shipped spec name (robustcl configs) or a YAML path")
        return path.read_text(), str(path), path.resolve().parent
    entries = _sweep_entries()
    _check(name_or_path in entries, f"unknown sweep spec {name_or_path!r}; shipped specs: {', '.join(entries)}")
    return entries[name_or_path].read_text(), f"sweep spec {name_or_path}", None


def load_spec(name_or_path: str) -> Sweep:
    """Parse and validate a sweep spec; errors are one line naming the bad key."""
    text, origin, folder = _read_spec_text(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        spec = build(SweepSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return Sweep(spec, origin, _first_comment(text), folder)


# ---------------------------------------------------------------------------------------- naming
def safe_name(text: str) -> str:
    """A directory-safe run name: anything outside [A-Za-z0-9._=+,-] becomes '_', no leading '.' or '-'."""
    name = UNSAFE_CHARS.sub("_", text)
    return "_" + name[1:] if name[:1] in (".", "-") else name


def _label_value(value: Any) -> str:
    """An axis value as it reads in a run name (0.3, true, slf+alf)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "+".join(_label_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _axis_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short axis names (last two dotted parts, e.g. critic.weight); full keys where short ones clash."""
    short = {k: ".".join(k.split(".")[-2:]) for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


def grid_runs(grid: GridSpec) -> list[RunEntry]:
    """The grid's runs: base x product of axes (first axis slowest), named from the axis values."""
    keys = list(grid.axes)
    labels = _axis_labels(keys)
    out = []
    for values in itertools.product(*(grid.axes[k] for k in keys)):
        name = safe_name(",".join(f"{labels[k]}={_label_value(v)}" for k, v in zip(keys, values)))
        axis_overrides = tuple(f"{k}={json.dumps(v)}" for k, v in zip(keys, values))
        out.append(RunEntry(name, grid.base, tuple(grid.overrides) + axis_overrides))
    return out


def configurations(sweep: Sweep) -> list[RunEntry]:
    """Every configuration of the spec in order: explicit runs, then the grid; names must be unique."""
    entries = list(sweep.spec.runs) + (grid_runs(sweep.spec.grid) if sweep.spec.grid else [])
    seen: set[str] = set()
    for entry in entries:
        _check(entry.name not in seen, f"{sweep.origin}: two runs are named {entry.name!r}; names must be unique")
        seen.add(entry.name)
    baseline = sweep.spec.baseline
    _check(not baseline or baseline in seen,
           f"{sweep.origin}: baseline {baseline!r} is not one of the configurations ({', '.join(e.name for e in entries)})")
    for pair in comparisons(sweep.spec):
        for name in pair:
            _check(name in seen, f"{sweep.origin}: comparison {' vs '.join(pair)!r} names {name!r}, which is not one of "
                                 f"the configurations ({', '.join(e.name for e in entries)})")
    return entries


def comparisons(spec: SweepSpec) -> list[tuple[str, str]]:
    """The spec's `comparisons` as (configuration, baseline) pairs; "A vs B" reads A minus B."""
    pairs = []
    for item in spec.comparisons:
        parts = [p.strip() for p in item.split(" vs ")]
        _check(len(parts) == 2 and all(parts), f"sweep comparison {item!r} must read 'A vs B' (two configuration names)")
        pairs.append((parts[0], parts[1]))
    return pairs


# -------------------------------------------------------------------------------------- planning
@dataclass
class PlannedRun:
    """One (configuration, seed) of a sweep: its resolved config, directory and status."""
    label: str
    seed: int
    config: str
    overrides: tuple[str, ...]
    root: Path
    cfg: Config = field(repr=False, default=None)  # type: ignore[assignment]
    status: str = "new"

    @property
    def name(self) -> str:
        """The run directory's name, <configuration>-s<seed>."""
        return self.root.name

    @property
    def run(self) -> RunDir:
        """The run directory."""
        return RunDir(self.root)


@dataclass
class SweepPlan:
    """A sweep resolved against an output directory: every run loaded and given a status."""
    sweep: Sweep
    out: Path
    overrides: tuple[str, ...]
    runs: list[PlannedRun]


def _config_ref(ref: str, folder: Path | None) -> str:
    """A run's config: a preset name, or a YAML path (relative paths first tried beside the spec file)."""
    if folder is not None and Path(ref).suffix in (".yaml", ".yml") and not Path(ref).is_absolute():
        beside = folder / ref
        if beside.is_file():
            return str(beside)
    return ref


def _is_finished(run: RunDir, cfg: Config) -> bool:
    """results.json exists and covers every protocol the config fine-tunes."""
    results = run.read_results()
    return bool(results) and set(cfg.finetune.protocols) <= set(results.get("protocols", {}))


def run_status(planned: PlannedRun, overwrite: bool) -> str:
    """done | resume | new, or 'conflict: ...' when the directory holds something else."""
    run, cfg = planned.run, planned.cfg
    if not run.root.exists() or not any(run.root.iterdir()):
        return "new"
    if not run.config.is_file():
        return f"conflict: {run.root} exists but is not a robustcl run; choose another --out"
    if overwrite:
        return "new"
    stored = yaml.safe_load(run.config.read_text()) or {}
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with

    try:  # through today's schema: settings added since the run was made compare at their defaults
        stored = yaml.safe_load(dump_yaml(from_mapping(stored)))
    except ConfigError:
        pass  # a key the schema no longer has: the raw comparison below names it
    from robustcl.runtime import resolve_device, resolve_runtime

    try:  # `auto` precision/threads as this run resolved them (a started run keeps its precision)
        cfg = resolve_runtime(cfg, resolve_device(cfg.train.device), stored)
    except (RuntimeError, ConfigError):
        pass  # train.device=cuda without CUDA: pretrain reports it
    diff = first_difference(stored, yaml.safe_load(dump_yaml(cfg)), ignore=("train.threads",))
    if diff:
        return f"conflict: {run.root} was made with another config ({diff}); pass --overwrite to redo it or choose another --out"
    if _is_finished(run, cfg):
        return "done"
    if run.checkpoint.is_file() or (run.pretrain_done.is_file() and run.encoder.is_file()):
        return "resume"
    return "new"


def _load_run_config(run: PlannedRun) -> Config:
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with

    try:
        return load_config(run.config, list(run.overrides))
    except ConfigError as exc:
        raise ConfigError(f"sweep run {run.name} ({run.config}): {exc}") from None


def plan_sweep(spec: str | Sweep, out: Path | str | None = None, overrides: Sequence[str] = (),
               overwrite: bool = False, seeds: Sequence[int] | None = None) -> SweepPlan:
    """Resolve every run (config loaded with its overrides: a typo fails here) and its status.

    `seeds`, when given, replaces the spec's seed list (e.g. one seed for a quick pass).
    """
    sweep = load_spec(spec) if isinstance(spec, str) else spec
    if seeds:
        sweep.spec.seeds = tuple(int(s) for s in seeds)
        sweep.spec.validate()
    _check_overrides(overrides, "sweep command-line overrides")
    root = Path(out) if out is not None else Path("runs") / "sweeps" / sweep.spec.name
    runs = []
    for entry in configurations(sweep):
        for seed in sweep.spec.seeds:
            all_overrides = (*sweep.spec.overrides, *entry.overrides, *overrides, f"seed={seed}")
            runs.append(PlannedRun(entry.name, seed, _config_ref(entry.config, sweep.folder), all_overrides,
                                   root / f"{entry.name}-s{seed}"))
    for run in runs:
        run.cfg = _load_run_config(run)
    for run in runs:
        run.status = run_status(run, overwrite)
    return SweepPlan(sweep, root, tuple(overrides), runs)


def format_plan(plan: SweepPlan) -> str:
    """The runs a sweep would do: name, config, overrides, status (the --dry-run listing)."""
    lines = [f"sweep {plan.sweep.spec.name} ({plan.sweep.origin}) -> {plan.out}: {len(plan.runs)} runs"]
    width = max((len(r.name) for r in plan.runs), default=0)
    config_width = max((len(r.config) for r in plan.runs), default=0)
    for r in plan.runs:
        lines.append(f"  {r.name:{width}s}  {r.status:6s}  {r.config:{config_width}s}  {' '.join(r.overrides)}")
    return "\n".join(lines)


def write_sweep_yaml(plan: SweepPlan) -> Path:
    """sweep.yaml: the resolved list of runs (directory, configuration, seed, config, overrides)."""
    data = {
        "name": plan.sweep.spec.name, "spec": plan.sweep.origin, "question": plan.sweep.description,
        "overrides": list(plan.overrides),
        "runs": [{"name": r.name, "configuration": r.label, "seed": r.seed, "config": r.config,
                  "overrides": list(r.overrides)} for r in plan.runs],
    }
    path = plan.out / "sweep.yaml"
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


# ------------------------------------------------------------------------------------- execution
@dataclass
class SweepOutcome:
    """What a sweep produced: the summary, the plan, and runs that failed (name -> message)."""
    summary: Path
    plan: SweepPlan
    failed: dict[str, str]


def execute_run(planned: PlannedRun, progress: bool) -> None:
    """pretrain (fresh, resumed or overwriting) -> finetune -> evaluate -> report for one run."""
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.runs.report import write_report
    from robustcl.train.finetune import finetune
    from robustcl.train.pretrain import pretrain

    run, cfg = planned.run, planned.cfg
    resume = planned.status == "resume"
    redo = not resume and run.root.exists() and any(run.root.iterdir())  # checked: our run, unfinished or --overwrite
    pretrain(cfg, run, resume=resume, overwrite=redo, progress=progress)
    finetune(cfg, run, progress=progress, overwrite=True)  # this flow owns the run
    evaluate_run(cfg, run, progress=progress)
    write_report(run)


def run_sweep(spec: str | Sweep, out: Path | str | None = None, overrides: Sequence[str] = (),
              overwrite: bool = False, progress: bool = True,
              echo: Callable[[str], None] = print, seeds: Sequence[int] | None = None,
              launch: LaunchSettings | None = None, rows: Sequence[Path | str] = ()) -> SweepOutcome:
    """Run every not-finished run (of `launch.shard` only, when given), then write the comparison; returns its paths.

    By default runs go one after another in this process; `launch` may spread them over local processes
    (jobs > 1) or submitit jobs (robustcl/sweep_launch.py). The summary covers every finished run of the sweep.
    """
    from robustcl.train.pretrain import NonFiniteLoss

    launch = launch or LaunchSettings()
    launch.validate()
    plan = plan_sweep(spec, out, overrides, overwrite, seeds)
    _merged(plan, rows)  # a bad --rows file fails before anything runs (merged again after the runs)
    mine = shard_runs(plan.runs, launch.shard)  # another shard's runs may be mid-write: only ours are checked
    blocked = [r.status for r in mine if r.status.startswith("conflict")]
    if blocked:
        raise RunError(blocked[0])
    plan.out.mkdir(parents=True, exist_ok=True)
    write_sweep_yaml(plan)
    if launch.launcher == "submitit":
        failed = run_submitit(mine, plan, launch, overwrite, echo)
    elif not launch.serial:
        failed = run_local_processes(mine, plan, launch, overwrite, echo)
    else:
        failed = {}
        for i, planned in enumerate(mine, 1):
            # decided afresh: since planning, another process (a second sweep, shard or job sharing the
            # directory) may have finished or started this run, and a stale "new" would overwrite it
            planned.status = run_status(planned, overwrite) if planned.status != "done" else "done"
            if planned.status == "done":
                echo(f"[{i}/{len(mine)}] {planned.name}: done, skipped")
                continue
            if planned.status.startswith("conflict"):
                failed[planned.name] = planned.status
                echo(f"[{i}/{len(mine)}] {planned.name}: failed: {planned.status}")
                continue
            echo(f"[{i}/{len(mine)}] {planned.name}: {planned.status}")
            t0 = time.perf_counter()
            try:
                execute_run(planned, progress)
            except (NonFiniteLoss, RunError) as exc:
                failed[planned.name] = str(exc)
                echo(f"[{i}/{len(mine)}] {planned.name}: failed: {exc}")
                continue
            echo(f"[{i}/{len(mine)}] {planned.name}: finished in {time.perf_counter() - t0:.0f} s")
    return SweepOutcome(write_summary(plan, failed, _merged(plan, rows)), plan, failed)


def _merged(plan: SweepPlan, rows: Sequence[Path | str]) -> "MergedRows | None":
    from robustcl.sweep_rows import merge_rows

    return merge_rows(plan, rows) if rows else None


def summarize_sweep(spec: str | Sweep, out: Path | str | None = None, overrides: Sequence[str] = (),
                    seeds: Sequence[int] | None = None, rows: Sequence[Path | str] = ()) -> Path:
    """Write the summary of the runs finished so far (and of `rows`' runs) without running anything."""
    plan = plan_sweep(spec, out, overrides, seeds=seeds)
    merged = _merged(plan, rows)
    plan.out.mkdir(parents=True, exist_ok=True)
    return write_summary(plan, None, merged)


# --------------------------------------------------------------------------------------- summary
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


def finished_results(plan: SweepPlan) -> list[tuple[PlannedRun, dict[str, Any]]]:
    """Each run of the plan whose directory holds results, with them (the summary's entries)."""
    return [(r, res) for r in plan.runs if (res := r.run.read_results()).get("protocols")]


def aggregate(entries: Sequence[tuple[PlannedRun, dict[str, Any]]]) -> list[SummaryRow]:
    """Group runs by configuration and average each protocol's clean and per-attack robust accuracy."""
    cells: dict[tuple[str, str, str], list[tuple[int, dict[str, Any], float, float]]] = {}
    for planned, results in entries:
        for protocol, r in results["protocols"].items():
            for attack, acc in r["robust"].items():
                cells.setdefault((planned.label, protocol, attack), []).append(
                    (planned.seed, {"method": results["method"], "branch": r["branch"]}, r["clean_acc"], acc))
    rows = []
    for (label, protocol, attack), items in cells.items():
        rows.append(SummaryRow(label, items[0][1]["method"], protocol, items[0][1]["branch"], attack,
                               tuple(i[0] for i in items), mean_std([i[2] for i in items]),
                               mean_std([i[3] for i in items]), t_interval([i[2] for i in items]),
                               t_interval([i[3] for i in items])))
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
    lines = ["| configuration | method | protocol | branch | attack | seeds | clean acc (%) | robust acc (%) | "
             "clean 95% CI | robust 95% CI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.configuration} | {r.method} | {r.protocol.upper()} | {r.branch} | {r.attack} | "
                     f"{len(r.seeds)} | {_pct(r.clean)} | {_pct(r.robust)} | {_ci(r.clean_ci)} | {_ci(r.robust_ci)} |")
    return "\n".join(lines)


CSV_COLUMNS = ["configuration", "method", "protocol", "branch", "attack", "n_seeds", "seeds",
               "clean_acc_mean", "clean_acc_std", "robust_acc_mean", "robust_acc_std",
               "clean_acc_ci_lo", "clean_acc_ci_hi", "robust_acc_ci_lo", "robust_acc_ci_hi"]


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
                         bound(r.robust_ci, "hi")])
    return buffer.getvalue()


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


def _rows_lines(merged: "MergedRows | None") -> list[str]:
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


def write_summary(plan: SweepPlan, failed: dict[str, str] | None = None, merged: "MergedRows | None" = None) -> Path:
    """summary.md, summary.csv (raw per-seed rows), summary_stats.csv, summary_differences.csv (with a baseline)
    and clean_vs_robust.png in the sweep directory; returns summary.md. `merged`: runs from other summary.csv
    files (robustcl/sweep_rows.py) for runs this directory lacks."""
    from robustcl.sweep_stats import differences_csv, differences_markdown, paired_differences, raw_csv, suspect_lines

    entries = finished_results(plan)
    if merged is not None:
        order = {r.name: i for i, r in enumerate(plan.runs)}
        entries = sorted([*entries, *merged.entries], key=lambda e: order[e[0].name])
    rows = aggregate(entries)
    atomic_write_text(plan.out / "summary.csv", raw_csv(entries))
    atomic_write_text(plan.out / "summary_stats.csv", summary_csv(rows))
    plotted = plot_clean_vs_robust(entries, plan.out / "clean_vs_robust.png")
    spec = plan.sweep.spec
    finished = {p.name for p, _ in entries}
    missing = [r.name for r in plan.runs if r.name not in finished]
    lines = [f"# Sweep {spec.name}", "", plan.sweep.description, "",
             f"Spec: {plan.sweep.origin}; {len(entries)} of {len(plan.runs)} runs finished; seeds {list(spec.seeds)}. "
             "Each cell is the mean ± sample standard deviation (n-1) over seeds, in percent; `seeds` is n; the 95% CI "
             "is Student's t over seeds, mean ± t(0.975, n-1)·s/√n (docs/statistics.md; none for one seed). "
             "Accuracy is read through the branch named (the same one for clean and robust). summary.csv holds "
             "every run's raw numbers, summary_stats.csv this table.",
             *_evaluation_lines(entries), *suspect_lines(entries), *_rows_lines(merged), "",
             summary_markdown_table(rows), ""]
    if spec.baseline or spec.comparisons:
        diffs = paired_differences(entries, spec.baseline) if spec.baseline else []
        for label, base in comparisons(spec):
            diffs += paired_differences([e for e in entries if e[0].label in (label, base)], base)
        atomic_write_text(plan.out / "summary_differences.csv", differences_csv(diffs, spec.baseline))
        lines += [*differences_markdown(diffs, spec.baseline), ""]
    lines += ["Configurations:", *_configuration_lines(plan), ""]
    if spec.overrides or plan.overrides:
        lines += [f"Overrides for every run: {' '.join((*spec.overrides, *plan.overrides))}", ""]
    if missing:
        lines += [f"Runs without results: {', '.join(missing)}", ""]
    if failed:
        lines += [*(f"- `{name}` failed: {message}" for name, message in failed.items()), ""]
    if plotted:
        lines += ["![clean vs robust accuracy](clean_vs_robust.png)", ""]
    lines += ["Run directories: " + ", ".join(f"`{r.name}`" for r in plan.runs), ""]
    path = plan.out / "summary.md"
    atomic_write_text(path, "\n".join(lines))
    return path
