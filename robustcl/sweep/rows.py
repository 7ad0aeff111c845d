"""A sweep's raw rows read back: another machine's or session's summary.csv as finished runs of this sweep.

Run directories hold checkpoints and stay where they were made; summary.csv (stats.RAW_COLUMNS) is what
gets committed or copied. `robustcl sweep --rows FILE` turns its rows back into results, so one summary can
cover runs finished elsewhere. Rows carry no per-image flags: their differences have the interval over seeds
only (docs/statistics.md). A run present in the sweep directory wins over a row, and a disagreement is named.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustcl.config import ConfigError, inputs
from robustcl.sweep.plan import PlannedRun, SweepPlan, finished_results
from robustcl.sweep.stats import NOT_RECORDED, OPTIONAL_COLUMNS, RAW_COLUMNS, Entry, check_raw_row, shared_test_set

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
    """The rows of a summary.csv, read by the bounded reader (a regular file of at most MAX_ROWS_BYTES); ConfigError
    naming the file when it is not one."""
    try:
        text = inputs.read_bounded(path, "--rows file", inputs.MAX_ROWS_BYTES).decode("utf-8")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in RAW_COLUMNS if c not in (reader.fieldnames or []) and c not in OPTIONAL_COLUMNS]
        if missing:
            raise ConfigError(f"{path} is not a sweep's summary.csv (no column {missing[0]}); pass the summary.csv "
                              "a sweep directory holds")
        return list(reader)
    except OSError as exc:
        raise ConfigError(f"cannot read --rows {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path} is not a sweep's summary.csv (not CSV text: {exc}); pass the summary.csv "
                          "a sweep directory holds") from None


def _add_row(runs: dict[str, RowRun], row: dict[str, str], source: Path) -> None:
    """Add one raw row to its run's rebuilt results (ValueError/KeyError/AttributeError on a malformed row, and on a
    value outside what summary.csv holds: stats.check_raw_row)."""
    check_raw_row(row)
    name = row["run"]
    run = runs.get(name)
    if run is None:
        run = runs[name] = RowRun(row["configuration"], int(row["seed"]), name,
                                  {"method": row["method"], "protocols": {}, "from_rows": str(source)}, source)
    protocol = run.results["protocols"].setdefault(row["protocol"], {"branch": row["branch"], "robust": {},
                                                                     "clean_acc": float(row["clean_acc"])})
    if float(row["clean_acc"]) != protocol["clean_acc"] or (
            row["attack"] in protocol["robust"] and protocol["robust"][row["attack"]] != float(row["robust_acc"])):
        raise ValueError(f"run {name} {row['protocol']} {row['attack']} appears twice with different accuracies")
    protocol["robust"][row["attack"]] = float(row["robust_acc"])
    if row.get("corruption_acc"):  # the common-corruption accuracy, when the run measured it
        protocol["corruptions"] = {"mean": float(row["corruption_acc"])}
    failed = row.get("integrity_failed", NOT_RECORDED)
    if failed != NOT_RECORDED:
        protocol["integrity"] = {"failed": [c for c in failed.split("; ") if c]}
    n_eval = _number(row["n_eval"])
    same = row.get("headline_on_same_images", "")
    if same or row["eval_subset"].startswith("the first "):
        protocol["autoattack"] = {"n": n_eval}
        if same:
            protocol["autoattack"]["pgd_on_same_images"] = float(same)
    else:
        run.results.setdefault("n_eval", n_eval)
        run.results.setdefault("eval_subset", row["eval_subset"])


def _headline_first(robust: dict[str, float]) -> dict[str, float]:
    """The headline (non-AutoAttack) attack first, as evaluation writes it, even from a re-sorted file."""
    return dict(sorted(robust.items(), key=lambda item: item[0].startswith("autoattack")))


def runs_from_rows(rows: Sequence[dict[str, str]], source: Path) -> list[RowRun]:
    """Group rows by run and rebuild the parts of results.json the summary reads (accuracies exactly as stored)."""
    runs: dict[str, RowRun] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        try:
            _add_row(runs, row, source)
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise ConfigError(f"{source} line {line} is not a valid summary.csv row ({exc}); pass the summary.csv "
                              "a sweep wrote, unedited (join files with --rows A B, not by concatenating)") from None
    for run in runs.values():
        for protocol in run.results["protocols"].values():
            protocol["robust"] = _headline_first(protocol["robust"])
    return list(runs.values())


def _disagreement(name: str, stored: dict[str, Any], row: dict[str, Any], source: Path) -> str | None:
    """How the directory's results differ from the row's (test images, protocols, attacks, accuracies), or None."""
    if str(stored.get("eval_subset")) != str(row.get("eval_subset")):
        return f"{name}: evaluated on {stored.get('eval_subset')} in the run directory, {row.get('eval_subset')} in {source}"
    if set(stored.get("protocols", {})) != set(row["protocols"]):
        return (f"{name}: protocols {', '.join(stored.get('protocols', {}))} in the run directory, "
                f"{', '.join(row['protocols'])} in {source}")
    for protocol, r in row["protocols"].items():
        mine = stored["protocols"][protocol]
        if set(mine["robust"]) != set(r["robust"]):
            return f"{name} {protocol}: attacks {', '.join(mine['robust'])} in the run directory, {', '.join(r['robust'])} in {source}"
        pairs = [("clean", mine["clean_acc"], r["clean_acc"])]
        pairs += [(attack, mine["robust"][attack], acc) for attack, acc in r["robust"].items()]
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


def _check_same_evaluation(finished: Sequence[dict[str, Any]], runs: Any) -> None:
    """Rows must come from the evaluation this directory's finished runs used (test images, headline attack)."""
    if not finished:
        return
    subsets = {shared_test_set(res.get("eval_subset")) for res in finished}
    headlines = {next(iter(p["robust"])) for res in finished for p in res["protocols"].values()}
    for run in runs:
        subset = shared_test_set(run.results.get("eval_subset"))
        heads = {next(iter(p["robust"])) for p in run.results["protocols"].values()}
        if subset not in subsets or not heads <= headlines:
            raise ConfigError(f"{run.source}: run {run.name} was evaluated on {subset} with {', '.join(sorted(heads))}, "
                              f"this directory's runs on {' / '.join(sorted(subsets))} with "
                              f"{', '.join(sorted(headlines))}; join rows of the same evaluation only")


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
    finished = {p.name: res for p, res in finished_results(plan)}  # this directory's runs, read once
    _check_same_evaluation(list(finished.values()), seen.values())
    entries, agreed, disagreements = [], [], []
    for name, run in seen.items():
        stored = finished.get(name)
        if stored is not None:
            problem = _disagreement(name, stored, run.results, run.source)
            if problem:
                disagreements.append(problem)
            else:
                agreed.append(name)
            continue
        entries.append((planned[name], run.results))
    return MergedRows(entries, agreed, disagreements, sorted({r.source for r in seen.values()}))
