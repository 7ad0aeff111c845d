"""A sweep's raw rows read back: another machine's or session's summary.csv as finished runs of this sweep.

Run directories hold checkpoints and stay where they were made; summary.csv (sweep_stats.RAW_COLUMNS) is what
gets committed or copied. `robustcl sweep --rows FILE` turns its rows back into results, so one summary can
cover runs finished elsewhere. Rows carry no per-image flags: their differences have the interval over seeds
only (docs/statistics.md). A run present in the sweep directory wins over a row, and a disagreement is named.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustcl.config import ConfigError
from robustcl.sweep_stats import NOT_RECORDED, OPTIONAL_COLUMNS, RAW_COLUMNS, Entry

if TYPE_CHECKING:
    from robustcl.sweep import PlannedRun, SweepPlan

AGREEMENT_TOLERANCE = 1e-12  # a rerun of the same config and seed on the same CPU kind reproduces every digit


@dataclass
class RowRun:
    """One run's results rebuilt from its summary.csv rows, and the file they came from."""
    label: str
    seed: int
    name: str
    results: dict[str, Any]
    source: Path


def _number(text: str) -> int | str:
    return int(text) if text.strip().lstrip("-").isdigit() else text


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a summary.csv; ConfigError naming the file when it is not one."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in RAW_COLUMNS if c not in (reader.fieldnames or []) and c not in OPTIONAL_COLUMNS]
            if missing:
                raise ConfigError(f"{path} is not a sweep's summary.csv (no column {missing[0]}); pass the summary.csv "
                                  "a sweep directory holds, not summary_stats.csv")
            return list(reader)
    except OSError as exc:
        raise ConfigError(f"cannot read --rows {path}: {exc.strerror}") from None


def runs_from_rows(rows: Sequence[dict[str, str]], source: Path) -> list[RowRun]:
    """Group rows by run and rebuild the parts of results.json the summary reads (accuracies exactly as stored)."""
    runs: dict[str, RowRun] = {}
    for row in rows:
        name = row["run"]
        run = runs.get(name)
        if run is None:
            run = runs[name] = RowRun(row["configuration"], int(row["seed"]), name,
                                      {"method": row["method"], "protocols": {}, "from_rows": str(source)}, source)
        protocol = run.results["protocols"].setdefault(row["protocol"], {"branch": row["branch"], "robust": {},
                                                                         "clean_acc": float(row["clean_acc"])})
        protocol["robust"][row["attack"]] = float(row["robust_acc"])
        failed = row.get("integrity_failed", NOT_RECORDED)
        if failed != NOT_RECORDED:
            protocol["integrity"] = {"failed": [c for c in failed.split("; ") if c]}
        n_eval = _number(row["n_eval"])
        if row["headline_on_same_images"] or row["eval_subset"].startswith("the first "):
            protocol["autoattack"] = {"n": n_eval}
            if row["headline_on_same_images"]:
                protocol["autoattack"]["pgd_on_same_images"] = float(row["headline_on_same_images"])
        else:
            run.results.setdefault("n_eval", n_eval)
            run.results.setdefault("eval_subset", row["eval_subset"])
    return list(runs.values())


def _disagreement(name: str, stored: dict[str, Any], row: dict[str, Any], source: Path) -> str | None:
    """How the directory's results differ from the row's, or None when every accuracy agrees."""
    for protocol, r in row["protocols"].items():
        mine = stored.get("protocols", {}).get(protocol)
        if mine is None:
            return f"{name}: {source} has {protocol} results, the run directory does not"
        pairs = [("clean", mine["clean_acc"], r["clean_acc"])]
        pairs += [(attack, mine["robust"].get(attack, math.nan), acc) for attack, acc in r["robust"].items()]
        for what, a, b in pairs:
            if not abs(a - b) <= AGREEMENT_TOLERANCE:
                return f"{name} {protocol} {what}: {a!r} in the run directory, {b!r} in {source}"
    return None


@dataclass
class MergedRows:
    """Entries the rows add to a sweep's own, and how the rows compared with the runs both have."""
    entries: list[Entry]
    agreed: list[str]
    disagreements: list[str]
    sources: list[Path]


def merge_rows(plan: SweepPlan, paths: Sequence[Path | str]) -> MergedRows:
    """The rows' runs that this sweep's directory has not finished, as entries; a row outside the plan is an error."""
    planned: dict[str, PlannedRun] = {r.name: r for r in plan.runs}
    seen: dict[str, RowRun] = {}
    for path in map(Path, paths):
        for run in runs_from_rows(read_rows(path), path):
            target = planned.get(run.name)
            if target is None or (target.label, target.seed) != (run.label, run.seed):
                raise ConfigError(f"{path}: run {run.name} is not a run of sweep {plan.sweep.spec.name} with these "
                                  "seeds; pass --rows files of this sweep, or the spec and --seeds that made them")
            if run.name in seen and _disagreement(run.name, seen[run.name].results, run.results, path):
                raise ConfigError(f"{path} and {seen[run.name].source} disagree on {run.name}; keep one of them")
            seen.setdefault(run.name, run)
    entries, agreed, disagreements = [], [], []
    for name, run in seen.items():
        stored = planned[name].run.read_results()
        if stored.get("protocols"):
            problem = _disagreement(name, stored, run.results, run.source)
            if problem:
                disagreements.append(problem)
            else:
                agreed.append(name)
            continue
        entries.append((planned[name], run.results))
    return MergedRows(entries, agreed, disagreements, sorted({r.source for r in seen.values()}))
