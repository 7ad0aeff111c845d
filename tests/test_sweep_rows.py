"""`robustcl sweep --rows`: a summary.csv read back as finished runs gives the summary the run directories give."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from robustcl.config import ConfigError
from robustcl.runs import RunDir
from robustcl.sweep.flow import summarize_sweep
from robustcl.sweep.plan import PlannedRun, plan_sweep
from robustcl.sweep.rows import merge_rows, read_rows, runs_from_rows
from robustcl.sweep.stats import raw_csv
from robustcl.sweep.summary import write_summary

PGD, AA = "pgd20-linf-0.1", "autoattack-linf-0.1"
SPEC = """\
# synthetic (test)
name: synth
seeds: [0, 1, 2]
baseline: base
runs:
  - {name: base, config: smoke}
  - {name: better, config: smoke}
"""


def results(seed: int, shift: float) -> dict:
    """results.json of a run with SLF and ALF, PGD on 2,000 images and AutoAttack on the first 200."""
    rng = np.random.default_rng(seed)
    out = {"method": "gbrcl", "n_eval": 2000, "eval_subset": "random subset of 2000 of 10000 test images",
           "attack": {"type": "pgd", "steps": 20, "norm": "linf", "eps": 0.1, "alpha": 0.025}, "protocols": {}}
    for protocol in ("slf", "alf"):
        clean, robust = 0.6 + rng.random() / 10, 0.4 + rng.random() / 10 + shift
        out["protocols"][protocol] = {"branch": "adversarial", "clean_acc": clean,
                                      "robust": {PGD: robust, AA: robust - 0.03},
                                      "autoattack": {"n": 200, "pgd_on_same_images": robust + 0.01}}
    return out


def finished(root: Path, label: str, seed: int, res: dict) -> None:
    run = RunDir(root / f"{label}-s{seed}")
    run.root.mkdir(parents=True)
    run.write_json(run.results, res)


@pytest.fixture
def full(tmp_path) -> tuple[Path, Path]:
    """A spec and a directory with all 6 runs finished (better = base + 2 points robust, every seed)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "full"
    for seed in (0, 1, 2):
        finished(out, "base", seed, results(seed, 0.0))
        finished(out, "better", seed, results(seed, 0.02))
    write_summary(plan_sweep(str(spec), out))
    return spec, out


def test_rows_round_trip_to_the_same_raw_rows(full):
    _, out = full
    text = (out / "summary.csv").read_text()
    runs = runs_from_rows(read_rows(out / "summary.csv"), out / "summary.csv")
    entries = [(PlannedRun(r.label, r.seed, "smoke", (), Path(r.name)), r.results) for r in runs]
    assert [r.name for r in runs] == ["base-s0", "base-s1", "base-s2", "better-s0", "better-s1", "better-s2"]
    assert raw_csv(entries) == text  # every accuracy, image count, subset and AutoAttack's same-image PGD
    with open(out / "summary.csv", newline="") as fh:  # results.json without integrity: unknown, not "passed"
        assert {r["integrity_failed"] for r in csv.DictReader(fh)} == {"not recorded"}
    assert all("integrity" not in p for r in runs for p in r.results["protocols"].values())


def test_summary_from_rows_equals_the_summary_from_directories(full, tmp_path):
    spec, out = full
    part = tmp_path / "part"  # seed 2 only here; seeds 0-1 from the full sweep's summary.csv
    for name in ("base-s2", "better-s2"):
        shutil.copytree(out / name, part / name)
    summary = summarize_sweep(str(spec), part, rows=[out / "summary.csv"]).read_text()
    assert (part / "summary_stats.csv").read_text() == (out / "summary_stats.csv").read_text()
    assert (part / "summary.csv").read_text() == (out / "summary.csv").read_text()
    with open(part / "summary_differences.csv", newline="") as a, open(out / "summary_differences.csv", newline="") as b:
        merged, direct = list(csv.DictReader(a)), list(csv.DictReader(b))
    t_columns = [c for c in direct[0] if c.startswith(("clean_t", "robust_t"))]
    assert [[r[c] for c in t_columns] for r in merged] == [[r[c] for c in t_columns] for r in direct]
    assert float(direct[0]["robust_t_estimate"]) == pytest.approx(0.02)
    assert all(r["robust_bootstrap_estimate"] == "" for r in merged)  # rows carry no per-image flags
    assert "4 runs from the raw rows of" in summary and "`base-s0`, `base-s1`, `better-s0`, `better-s1`" in summary
    assert "every accuracy equal: base-s2, better-s2." in summary and "Runs without results" not in summary
    assert not (part / "base-s0").exists()  # --summarize runs nothing


def test_a_run_that_disagrees_with_its_row_is_named(full, tmp_path):
    spec, out = full
    part = tmp_path / "part"
    shutil.copytree(out / "better-s2", part / "better-s2")
    path = RunDir(part / "better-s2").results
    changed = json.loads(path.read_text())
    changed["protocols"]["alf"]["robust"][AA] += 0.005
    path.write_text(json.dumps(changed))
    summary = summarize_sweep(str(spec), part, rows=[out / "summary.csv"]).read_text()
    assert "**Disagrees with its row** (the directory's run is used): better-s2 alf autoattack-linf-0.1:" in summary


def test_rows_of_another_sweep_or_file_are_refused(full, tmp_path):
    spec, out = full
    with pytest.raises(ConfigError, match=r"run base-s2 is not a run of sweep synth with these seeds"):
        merge_rows(plan_sweep(str(spec), tmp_path / "x", seeds=[0, 1]), [out / "summary.csv"])
    with pytest.raises(ConfigError, match=r"summary_stats.csv is not a sweep's summary.csv \(no column seed\)"):
        merge_rows(plan_sweep(str(spec), tmp_path / "x"), [out / "summary_stats.csv"])
    with pytest.raises(ConfigError, match=r"cannot read --rows .*nope.csv"):
        merge_rows(plan_sweep(str(spec), tmp_path / "x"), [tmp_path / "nope.csv"])


def test_cli_summarize_with_rows(full, tmp_path, capsys):
    from robustcl.cli import main

    spec, out = full
    assert main(["sweep", "--spec", str(spec), "--out", str(tmp_path / "p"), "--summarize",
                 "--rows", str(out / "summary.csv")]) == 0
    assert (tmp_path / "p" / "summary_stats.csv").read_text() == (out / "summary_stats.csv").read_text()
    assert main(["sweep", "--spec", str(spec), "--out", str(tmp_path / "q"), "--summarize", "--seeds", "0",
                 "--rows", str(out / "summary.csv")]) != 0
    assert "is not a run of sweep synth" in capsys.readouterr().err


def test_suspect_runs_are_named_and_survive_the_rows(tmp_path):
    """A protocol whose integrity checks failed is SUSPECT in summary.md and summary.csv, and so after --rows."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "full"
    for seed in (0, 1, 2):
        for label, shift in (("base", 0.0), ("better", 0.02)):
            res = results(seed, shift)
            for protocol, r in res["protocols"].items():
                bad = (label, seed, protocol) == ("better", 1, "slf")
                r["integrity"] = {"passed": not bad, "failed": ["square-vs-whitebox", "autoattack-at-most-pgd"] if bad else []}
            finished(out, label, seed, res)
    summary = write_summary(plan_sweep(str(spec), out)).read_text()
    line = "`better-s1` SLF (square-vs-whitebox, autoattack-at-most-pgd)"
    assert "**SUSPECT** (integrity checks failed" in summary and line in summary
    assert summary.count("**SUSPECT**") == 1 and "every recorded one passed" not in summary
    with open(out / "summary.csv", newline="") as fh:
        flagged = {(r["run"], r["protocol"]) for r in csv.DictReader(fh) if r["integrity_failed"]}
    assert flagged == {("better-s1", "slf")}
    part = tmp_path / "part"
    assert line in summarize_sweep(str(spec), part, rows=[out / "summary.csv"]).read_text()
    old = tmp_path / "old.csv"  # a summary.csv written before the column existed
    with open(out / "summary.csv", newline="") as src, open(old, "w", newline="") as dst:
        rows = list(csv.DictReader(src))
        writer = csv.DictWriter(dst, [c for c in rows[0] if c != "integrity_failed"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize_sweep(str(spec), tmp_path / "p2", rows=[old]).read_text()
    assert "**SUSPECT**" not in summary and "Integrity not recorded for: base-s0 SLF, base-s0 ALF" in summary


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """dst: src's rows after edit(rows, columns) -> (rows, columns)."""
    with open(src, newline="") as fh:
        reader = csv.DictReader(fh)
        rows, columns = edit(list(reader), list(reader.fieldnames))
    with open(dst, "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_older_summaries_and_resorted_rows_read_back(full, tmp_path):
    """A summary.csv from before headline_on_same_images / integrity_failed, and one with its rows re-sorted."""
    spec, out = full
    pgd_only = _rewrite(out / "summary.csv", tmp_path / "old.csv", lambda rows, cols: (
        [r for r in rows if r["attack"] == PGD], [c for c in cols if c not in ("headline_on_same_images", "integrity_failed")]))
    runs = runs_from_rows(read_rows(pgd_only), pgd_only)
    assert len(runs) == 6 and all(list(p["robust"]) == [PGD] for r in runs for p in r.results["protocols"].values())
    resorted = _rewrite(out / "summary.csv", tmp_path / "sorted.csv", lambda rows, cols: (
        sorted(rows, key=lambda r: (r["attack"], r["run"])), cols))  # autoattack rows before pgd rows
    runs = runs_from_rows(read_rows(resorted), resorted)
    assert all(list(p["robust"]) == [PGD, AA] for r in runs for p in r.results["protocols"].values())
    summary = summarize_sweep(str(spec), tmp_path / "p", rows=[resorted]).read_text()
    assert "Evaluated on random subset of 2000 of 10000 test images (from --rows)." in summary
    assert (tmp_path / "p" / "summary_stats.csv").read_text() == (out / "summary_stats.csv").read_text()


def test_malformed_or_conflicting_rows_are_one_line_errors(full, tmp_path):
    spec, out = full
    plan = plan_sweep(str(spec), tmp_path / "x")
    text = (out / "summary.csv").read_text()
    (tmp_path / "cat.csv").write_text(text + text)  # two files concatenated: a header inside the rows
    with pytest.raises(ConfigError, match=r"cat.csv line 26 is not a valid summary.csv row .*not by concatenating"):
        merge_rows(plan, [tmp_path / "cat.csv"])
    (tmp_path / "cut.csv").write_text(text[: text.rindex(",", 0, len(text) - 40)])  # a truncated last row
    with pytest.raises(ConfigError, match=r"cut.csv line 25 is not a valid summary.csv row"):
        merge_rows(plan, [tmp_path / "cut.csv"])
    (tmp_path / "plot.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"plot.csv is not a sweep's summary.csv"):
        merge_rows(plan, [tmp_path / "plot.csv"])
    twice = _rewrite(out / "summary.csv", tmp_path / "twice.csv", lambda rows, cols: (
        [*rows, {**rows[0], "robust_acc": "0.05"}], cols))
    with pytest.raises(ConfigError, match=r"run base-s0 slf pgd20-linf-0.1 appears twice with different accuracies"):
        merge_rows(plan, [twice])
    part = tmp_path / "part"  # rows evaluated on other test images than the directory's runs
    shutil.copytree(out / "base-s2", part / "base-s2")
    other = _rewrite(out / "summary.csv", tmp_path / "other.csv", lambda rows, cols: (
        [{**r, "eval_subset": "random subset of 500 of 10000 test images"} if r["attack"] == PGD else r
         for r in rows], cols))
    with pytest.raises(ConfigError, match=r"run base-s0 was evaluated on random subset of 500 .* this directory's "
                                          r"runs on random subset of 2000"):
        merge_rows(plan_sweep(str(spec), part), [other])


def test_a_rerun_on_other_test_images_disagrees_with_its_row(full, tmp_path):
    spec, out = full
    part = tmp_path / "part"
    shutil.copytree(out / "base-s2", part / "base-s2")
    shutil.copytree(out / "better-s2", part / "better-s2")
    path = RunDir(part / "better-s2").results
    changed = json.loads(path.read_text())
    changed["eval_subset"] = "random subset of 2000 of 10000 test images (subset seed 7)"
    path.write_text(json.dumps(changed))
    summary = summarize_sweep(str(spec), part, rows=[out / "summary.csv"]).read_text()
    assert "**Disagrees with its row** (the directory's run is used): better-s2: evaluated on random subset of 2000 " \
           "of 10000 test images (subset seed 7) in the run directory" in summary
    assert "every accuracy equal: base-s2." in summary


# -------------------------------------------------- issue 23: values a summary.csv cannot hold are refused
ROW_FIX = "; pass the summary.csv a sweep wrote, unedited (join files with --rows A B, not by concatenating)"


def _refused_rows(spec: Path, tmp_path: Path, bad: Path, capsys) -> str:
    """The one error line of `sweep --summarize --rows bad` (exit 2, no summary written)."""
    from robustcl.cli import main

    assert main(["sweep", "--spec", str(spec), "--out", str(tmp_path / "p"), "--summarize", "--rows", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p" / "summary.md").exists()
    return err.strip()


def _first_line_of(path: Path, label: str) -> int:
    with open(path, newline="") as fh:
        return 2 + next(i for i, r in enumerate(csv.DictReader(fh)) if r["configuration"] == label)


@pytest.mark.parametrize("column, value, want", [
    ("clean_acc", "7.5", "an accuracy (a fraction in [0, 1])"),
    ("robust_acc", "-3", "an accuracy (a fraction in [0, 1])"),
    ("robust_acc", "inf", "an accuracy (a fraction in [0, 1])"),
    ("robust_acc", "nan", "an accuracy (a fraction in [0, 1])"),
    ("clean_acc", "1e400", "an accuracy (a fraction in [0, 1])"),
    ("headline_on_same_images", "2", "an accuracy (a fraction in [0, 1])"),
    ("n_eval", "0", "a count of test images (a positive integer)"),
    ("n_eval", "-5", "a count of test images (a positive integer)"),
    ("n_eval", "1.5", "a count of test images (a positive integer)"),
    ("seed", str(2 ** 70), "a seed (an integer in [0, 4294967295])"),
])
def test_numbers_a_summary_cannot_hold_are_refused_naming_file_line_and_column(full, tmp_path, capsys, column, value,
                                                                                 want):
    """clean_acc=7.5 and robust_acc=-3 once published "750.00 / -300.00 %" and a "+720.31 points" difference."""
    spec, out = full
    bad = _rewrite(out / "summary.csv", tmp_path / "bad.csv", lambda rows, cols: (
        [{**r, column: value} if r["configuration"] == "better" else r for r in rows], cols))
    line = _first_line_of(bad, "better")
    assert _refused_rows(spec, tmp_path, bad, capsys) == (
        f"robustcl: error: {bad} line {line} is not a valid summary.csv row (column {column} holds {value!r}, "
        f"not {want}){ROW_FIX}")


@pytest.mark.parametrize("column, value", [
    ("method", "=cmd|' /C calc'!A0"),
    ("method", "@SUM(A1:A9)"),
    ("attack", "pgd20|linf"),
    ("eval_subset", "all 10000\x00 test images"),
    ("integrity_failed", "\x1b[31mnone"),
    ("branch", "<img src=x onerror=alert(1)>"),
    ("protocol", "slf\u202e"),
    ("eval_subset", "two\nlines"),
    ("run", "base-s0|x"),
])
def test_free_text_that_could_act_in_a_spreadsheet_or_break_a_summary_is_refused(full, tmp_path, capsys, column, value):
    spec, out = full
    bad = _rewrite(out / "summary.csv", tmp_path / "bad.csv", lambda rows, cols: (
        [{**r, column: value} if r["configuration"] == "better" else r for r in rows], cols))
    line = _first_line_of(bad, "better")
    assert _refused_rows(spec, tmp_path, bad, capsys).startswith(
        f"robustcl: error: {bad} line {line} is not a valid summary.csv row (column {column} holds {value!r}, not "
        "text without control characters, | ` < > or a leading = + - @")


def test_text_robustcl_writes_still_reads_back(full, tmp_path):
    """Names with + and = inside (dynacl++, grid names such as lr=0.1,weight=2) and the subset wording pass."""
    spec, out = full
    edited = _rewrite(out / "summary.csv", tmp_path / "ok.csv", lambda rows, cols: (
        [{**r, "method": "dynacl++", "eval_subset": "the first 200 of the 2000 evaluated: random subset of 2000 of "
          "10000 test images (subset seed 0)"} for r in rows], cols))
    runs = runs_from_rows(read_rows(edited), edited)
    assert {r.results["method"] for r in runs} == {"dynacl++"}
