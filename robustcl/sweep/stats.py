"""A sweep's raw per-seed rows and each configuration's paired difference to the spec's baseline.

Differences pair a configuration's run with the baseline's run of the same seed. Two intervals:
a t-interval over the seeds' differences (training randomness: the primary one with >= 2 paired
seeds) and a paired bootstrap over the test images within seeds (test-set noise given the trained
models; from per_image.npz, the headline PGD and clean accuracy only). docs/statistics.md says why.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from robustcl.config import INT_RANGE, SEED_RANGE
from robustcl.evaluation.per_image import PerImage, read_per_image
from robustcl.stats import Interval, paired_bootstrap, paired_t_interval

if TYPE_CHECKING:
    from robustcl.sweep.plan import PlannedRun

Entry = tuple["PlannedRun", dict[str, Any]]
BOOTSTRAP_REPS = 10_000
BOOTSTRAP_SEED = 0
FLAG_TOLERANCE = 1e-9  # per-image flags must reproduce results.json's accuracy (else they are stale)

RAW_COLUMNS = ["configuration", "seed", "run", "method", "protocol", "branch", "attack", "clean_acc", "robust_acc",
               "n_eval", "eval_subset", "headline_on_same_images", "integrity_failed", "corruption_acc"]
# headline_on_same_images: for an AutoAttack row on a subset, the headline PGD's accuracy on those same images
# (AutoAttack on the first 200 must be read against PGD on the same 200, not on all of them); else empty.
# integrity_failed: the protocol's failed integrity checks ("; "-joined: the run is SUSPECT), empty when all passed,
# NOT_RECORDED when results.json has none. Summaries written before the column existed lack it: not recorded.
# corruption_acc: the protocol's common-corruption accuracy (results.json's corruptions.mean), empty when not measured
OPTIONAL_COLUMNS = ("headline_on_same_images", "integrity_failed", "corruption_acc")  # older summaries lack them
NOT_RECORDED = "not recorded"
SUBSET_SEED = re.compile(r" \(seed -?\d+\)")  # results.json's eval_subset names the seed of a random subset

# What a summary.csv read back (`sweep --rows`) may hold, column by column: check_raw_row. Free text (configuration,
# run, method, protocol, branch, attack, eval_subset, integrity_failed) is refused, not escaped, where it could act:
# control characters (NUL, escape sequences, line breaks in one-line summaries), Unicode format and separator
# characters (bidirectional overrides), `|` (summary.md's tables), backticks, < and > (markdown code spans, HTML) and
# a leading = + - @ (a spreadsheet formula; configuration and run excepted: they must name one of the sweep's own
# runs, whose names the spec's rules allow). robustcl never writes any of them there.
ACCURACY_COLUMNS = ("clean_acc", "robust_acc", "headline_on_same_images", "corruption_acc")  # the last two may be empty
UNSAFE_TEXT = re.compile(r"[|`<>]")
FORMULA_START = ("=", "+", "-", "@")


# ----------------------------------------------------------------------------------- raw rows
def raw_rows(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """One row per run x protocol x attack: the numbers as results.json holds them (fractions in [0, 1])."""
    rows = []
    for planned, results in entries:
        for protocol, r in results["protocols"].items():
            for attack, acc in r["robust"].items():
                n_eval, subset = attack_images(results, r, attack)
                same = (r.get("autoattack") or {}).get("pgd_on_same_images", "") if attack.startswith("autoattack") else ""
                rows.append({"configuration": planned.label, "seed": planned.seed, "run": planned.name,
                             "method": results.get("method", ""), "protocol": protocol, "branch": r["branch"],
                             "attack": attack, "clean_acc": r["clean_acc"], "robust_acc": acc,
                             "n_eval": n_eval, "eval_subset": subset, "headline_on_same_images": same,
                             "integrity_failed": integrity_cell(integrity_failures(r)),
                             "corruption_acc": (r.get("corruptions") or {}).get("mean", "")})
    return rows


def _cell(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:30]!r}... ({len(text)} characters)"


def _unsafe_text(text: str, formula: bool) -> bool:
    return (bool(UNSAFE_TEXT.search(text)) or (formula and text.startswith(FORMULA_START))
            or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text))


def _check_cell(column: str, text: str) -> None:
    """ValueError naming the column when a raw row's cell is outside what summary.csv holds there."""
    if column == "seed":
        ok = text.isascii() and text.isdigit() and len(text) <= 20 and int(text) <= SEED_RANGE.hi
        want = f"a seed (an integer in [0, {SEED_RANGE.hi}])"
    elif column == "n_eval":
        ok = text == "" or (text.isascii() and text.isdigit() and len(text) <= 20 and 1 <= int(text) <= INT_RANGE.hi)
        want = "a count of test images (a positive integer)"
    elif column in ACCURACY_COLUMNS:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        ok = (column in ("headline_on_same_images", "corruption_acc") and text == "") or 0.0 <= number <= 1.0  # nan, inf fail
        want = "an accuracy (a fraction in [0, 1])"
    else:
        ok = not _unsafe_text(text, formula=column not in ("configuration", "run"))
        want = ("text without control characters, | ` < > or a leading = + - @ (they would break summary.md or run "
                "as spreadsheet formulas)")
    if not ok:
        raise ValueError(f"column {column} holds {_cell(text)}, not {want}")


def check_raw_row(row: dict[str, str | None]) -> None:
    """A summary.csv row read back must hold what raw_rows writes: finite accuracies in [0, 1], a positive n_eval,
    a seed in the config's seed range, and text that can neither break a summary nor act in a spreadsheet
    (ValueError naming the column otherwise)."""
    for column in RAW_COLUMNS:
        if column not in row and column in OPTIONAL_COLUMNS:
            continue  # a summary.csv older than the column
        text = row.get(column)
        if text is None:
            raise ValueError(f"column {column} is missing (a truncated row?)")
        _check_cell(column, text)


def integrity_failures(protocol: dict[str, Any]) -> list[str] | None:
    """The names of the protocol's failed integrity checks ([] when all passed), None when not recorded."""
    integrity = protocol.get("integrity")
    return None if integrity is None else list(integrity.get("failed", []))


def integrity_cell(failed: list[str] | None) -> str:
    """integrity_failed's value: the failed checks, "" when all passed, NOT_RECORDED when unknown."""
    return NOT_RECORDED if failed is None else "; ".join(failed)


def suspect_lines(entries: Sequence[Entry]) -> list[str]:
    """summary.md's integrity line: every SUSPECT run and protocol with its failed checks, or that all passed."""
    suspect, unknown = [], []
    for planned, results in entries:
        for protocol, r in results["protocols"].items():
            failed = integrity_failures(r)
            if failed is None:
                unknown.append(f"{planned.name} {protocol.upper()}")
            elif failed:
                suspect.append(f"`{planned.name}` {protocol.upper()} ({', '.join(failed)})")
    lines = [f"**SUSPECT** (integrity checks failed: docs/evaluation.md, \"Integrity checks\"): {s}" for s in suspect]
    if not suspect and len(unknown) < sum(len(res["protocols"]) for _, res in entries):
        lines.append("Integrity checks: every recorded one passed.")
    if unknown:
        lines.append(f"Integrity not recorded for: {', '.join(unknown)}.")
    return lines


def attack_images(results: dict[str, Any], protocol: dict[str, Any], attack: str) -> tuple[Any, str]:
    """How many test images `attack`'s accuracy was measured on, and which: AutoAttack runs on the first
    `eval.autoattack_limit` of the evaluated images, every other attack on all of them."""
    n_eval, subset = results.get("n_eval", ""), str(results.get("eval_subset", ""))
    autoattack = protocol.get("autoattack") or {}
    if attack.startswith("autoattack") and autoattack.get("n") is not None and autoattack["n"] != n_eval:
        return autoattack["n"], f"the first {autoattack['n']} of the {n_eval} evaluated: {subset}"
    return n_eval, subset


def shared_test_set(subset: Any) -> str:
    """An eval_subset with a per-seed subset's seed removed: runs of one sweep share it."""
    return SUBSET_SEED.sub("", str(subset))


def raw_csv(entries: Sequence[Entry]) -> str:
    """summary.csv: RAW_COLUMNS, a row per run x protocol x attack (accuracies exactly as stored)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RAW_COLUMNS)
    for row in raw_rows(entries):
        writer.writerow([repr(v) if isinstance(v, float) else v for v in (row[c] for c in RAW_COLUMNS)])
    return buffer.getvalue()


# -------------------------------------------------------------------------------- differences
@dataclass
class Difference:
    """configuration minus baseline for one protocol and attack, over the seeds both have."""
    configuration: str
    protocol: str
    attack: str
    seeds: tuple[int, ...]
    clean_t: Interval
    robust_t: Interval
    clean_bootstrap: Interval | None
    robust_bootstrap: Interval | None
    bootstrap_note: str = ""
    baseline: str = ""
    corruption_t: Interval | None = None  # the common-corruption accuracy's (CA) difference over seeds, when measured

    @property
    def primary(self) -> Interval:
        """The robust-accuracy interval the summary reads: over seeds when >= 2 are paired, else over images."""
        if self.robust_t.lo is not None or self.robust_bootstrap is None:
            return self.robust_t
        return self.robust_bootstrap


def _usable_flags(run: "PlannedRun", results: dict[str, Any], protocol: str, attack: str) -> tuple[PerImage | None, str]:
    """The run's per-image flags for (protocol, headline attack), or None and why not."""
    if results.get("from_rows"):
        return None, f"{run.name} is a row of {results['from_rows']} (rows carry no per-image flags)"
    flags = read_per_image(run.run)
    if flags is None:
        return None, f"{run.name} has no per_image.npz (evaluated before it was stored; rerun `robustcl evaluate`)"
    if flags.attack != attack:
        return None, f"per-image flags are stored for the headline attack {flags.attack} only"
    if protocol not in flags.robust:
        return None, f"{run.name}'s per_image.npz has no {protocol} flags"
    r = results["protocols"][protocol]
    if (abs(flags.clean[protocol].mean() - r["clean_acc"]) > FLAG_TOLERANCE
            or abs(flags.robust[protocol].mean() - r["robust"][attack]) > FLAG_TOLERANCE):
        return None, f"{run.name}'s per_image.npz does not reproduce its results.json (stale; rerun `robustcl evaluate`)"
    return flags, ""


def _image_group(index: np.ndarray) -> int:
    """An id of a test-image set (the same images in the same order share it)."""
    return int.from_bytes(hashlib.sha1(np.ascontiguousarray(index, dtype=np.int64).tobytes()).digest()[:8], "big")


def _bootstrap(pairs: list[tuple[Entry, Entry]], protocol: str, attack: str) -> tuple[Interval | None, Interval | None, str]:
    """Paired bootstrap over test images of the clean and robust difference, or (None, None, why not)."""
    clean, robust = [], []
    for (run, res), (base, base_res) in pairs:
        a, why = _usable_flags(run, res, protocol, attack)
        b, why_b = _usable_flags(base, base_res, protocol, attack) if a is not None else (None, why)
        if a is None or b is None:
            return None, None, why or why_b
        if not a.matches(b):
            return None, None, f"{run.name} and {base.name} were evaluated on different test images"
        group = _image_group(a.index)
        clean.append((a.clean[protocol].astype(np.int8) - b.clean[protocol].astype(np.int8), group))
        robust.append((a.robust[protocol].astype(np.int8) - b.robust[protocol].astype(np.int8), group))
    return (paired_bootstrap(clean, BOOTSTRAP_REPS, BOOTSTRAP_SEED),
            paired_bootstrap(robust, BOOTSTRAP_REPS, BOOTSTRAP_SEED), "")


def paired_differences(entries: Sequence[Entry], baseline: str) -> list[Difference]:
    """Every configuration's difference to `baseline` per protocol and attack, over the seeds both finished."""
    by_key: dict[tuple[str, int], Entry] = {(p.label, p.seed): (p, res) for p, res in entries}
    labels = list(dict.fromkeys(p.label for p, _ in entries if p.label != baseline))
    out = []
    for label in labels:
        seeds = [s for (lab, s) in by_key if lab == label and (baseline, s) in by_key]
        if not seeds:
            continue
        pairs = [(by_key[(label, s)], by_key[(baseline, s)]) for s in seeds]
        first, first_base = pairs[0][0][1], pairs[0][1][1]
        for protocol, r in first["protocols"].items():
            for attack in r["robust"]:
                usable = [(a, b) for a, b in pairs
                          if protocol in b[1]["protocols"] and attack in b[1]["protocols"][protocol]["robust"]
                          and protocol in a[1]["protocols"] and attack in a[1]["protocols"][protocol]["robust"]]
                if not usable:
                    continue
                cell = lambda e, key: (e[1]["protocols"][protocol]["clean_acc"] if key == "clean"  # noqa: E731
                                       else e[1]["protocols"][protocol]["robust"][attack])
                clean_t = paired_t_interval([cell(a, "clean") for a, _ in usable], [cell(b, "clean") for _, b in usable])
                robust_t = paired_t_interval([cell(a, "robust") for a, _ in usable],
                                             [cell(b, "robust") for _, b in usable])
                headline = next(iter(first_base["protocols"][protocol]["robust"])) if protocol in first_base["protocols"] else None
                if attack == headline:
                    clean_b, robust_b, note = _bootstrap(usable, protocol, attack)
                else:
                    clean_b, robust_b, note = None, None, "per-image flags are stored for the headline PGD only"
                out.append(Difference(label, protocol, attack, tuple(a[0].seed for a, _ in usable), clean_t, robust_t,
                                      clean_b, robust_b, note, baseline, corruption_difference(usable, protocol)))
    return out


def corruption_difference(pairs: Sequence[tuple[Entry, Entry]], protocol: str) -> Interval | None:
    """The paired t-interval over seeds of the CA difference, when every run of both sides measured it."""
    def ca(entry: Entry) -> float | None:
        return (entry[1]["protocols"][protocol].get("corruptions") or {}).get("mean")

    values = [(ca(a), ca(b)) for a, b in pairs]
    if not values or any(v is None or w is None for v, w in values):
        return None
    return paired_t_interval([v for v, _ in values], [w for _, w in values])  # type: ignore[misc]


# --------------------------------------------------------------------------------- formatting
def points(interval: Interval | None) -> str:
    """'+1.20 [-0.40, +2.80]' in percentage points; the estimate alone when there is no interval."""
    if interval is None:
        return "-"
    if interval.lo is None or interval.hi is None:
        return f"{100 * interval.estimate:+.2f} (1 seed)"
    return f"{100 * interval.estimate:+.2f} [{100 * interval.lo:+.2f}, {100 * interval.hi:+.2f}]"


def reading(interval: Interval) -> str:
    """higher / lower when the 95% interval excludes 0, else not resolved."""
    if interval.lo is None or interval.hi is None:
        return "no interval"
    if interval.lo > 0:
        return "higher"
    if interval.hi < 0:
        return "lower"
    return "not resolved (covers 0)"


def differences_markdown(diffs: Sequence[Difference], baseline: str) -> list[str]:
    """The summary's section on paired differences (to the baseline, or each comparison's): a table and how to read it."""
    own = sorted({d.baseline for d in diffs} - {baseline})
    title = (f"## Paired difference to the baseline `{baseline}`" if not own
             else "## Paired differences (" + ", ".join(f"`{b}`" for b in ([baseline] if baseline else []) + own) + ")")
    lines = [title, "",
             "Configuration minus baseline in percentage points, each run paired with the baseline's run of the "
             "same seed on the same test images; 95% intervals. **t (seeds)**: Student-t interval of the per-seed "
             "differences (n-1 degrees of freedom): it covers training randomness, the question a new seed asks, "
             "and is the primary reading whenever two or more seeds are paired. **bootstrap (images)**: paired "
             f"bootstrap over test images ({BOOTSTRAP_REPS} resamples, seeds sharing a test set resampled "
             "jointly): test-set noise given these trained models, the only interval with one seed, and narrower "
             "than the seed interval when seeds differ more than images do (headline PGD and clean accuracy only). "
             "`reading` is the primary interval's: higher / lower when it excludes 0.", "",
             "| configuration | minus | protocol | attack | paired seeds | Δ clean, t (seeds) | Δ clean, bootstrap (images) | "
             "Δ robust, t (seeds) | Δ robust, bootstrap (images) | reading (robust) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    with_ca = any(d.corruption_t is not None for d in diffs)  # the Δ CA column only when some pair measured it
    if with_ca:
        lines[-2:] = [lines[-2] + " Δ CA, t (seeds) |", lines[-1] + "---|"]
    for d in diffs:
        lines.append(f"| {d.configuration} | {d.baseline or baseline} | {d.protocol.upper()} | {d.attack} | {len(d.seeds)} | "
                     f"{points(d.clean_t)} | "
                     f"{points(d.clean_bootstrap)} | {points(d.robust_t)} | {points(d.robust_bootstrap)} | "
                     f"{reading(d.primary)} |" + (f" {points(d.corruption_t)} |" if with_ca else ""))
        if d.bootstrap_note and d.robust_bootstrap is None and d.bootstrap_note not in notes:
            notes.append(d.bootstrap_note)
    if notes:
        lines += ["", "No bootstrap where: " + "; ".join(notes) + "."]
    return lines


DIFF_COLUMNS = ["configuration", "baseline", "protocol", "attack", "n_seeds", "seeds",
                *(f"{k}_{m}_{part}" for k in ("clean", "robust") for m in ("t", "bootstrap")
                  for part in ("estimate", "lo", "hi")), "primary", "reading", "bootstrap_note",
                *(f"corruption_t_{part}" for part in ("estimate", "lo", "hi"))]


def differences_csv(diffs: Sequence[Difference], baseline: str) -> str:
    """summary_differences.csv: DIFF_COLUMNS, fractions (not points); empty where an interval does not exist."""
    def parts(interval: Interval | None) -> list[str]:
        if interval is None:
            return ["", "", ""]
        return [repr(interval.estimate), "" if interval.lo is None else repr(interval.lo),
                "" if interval.hi is None else repr(interval.hi)]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(DIFF_COLUMNS)
    for d in diffs:
        writer.writerow([d.configuration, d.baseline or baseline, d.protocol, d.attack, len(d.seeds), " ".join(map(str, d.seeds)),
                         *parts(d.clean_t), *parts(d.clean_bootstrap), *parts(d.robust_t), *parts(d.robust_bootstrap),
                         d.primary.method, reading(d.primary), d.bootstrap_note, *parts(d.corruption_t)])
    return buffer.getvalue()


__all__ = ["ACCURACY_COLUMNS", "DIFF_COLUMNS", "Difference", "NOT_RECORDED", "OPTIONAL_COLUMNS", "RAW_COLUMNS",
           "SUBSET_SEED", "FORMULA_START", "UNSAFE_TEXT", "Entry", "attack_images", "check_raw_row",
           "corruption_difference", "differences_csv", "differences_markdown", "integrity_cell", "integrity_failures",
           "paired_differences", "points", "raw_csv", "raw_rows", "reading", "shared_test_set", "suspect_lines"]
