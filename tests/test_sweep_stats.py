"""The sweep summary's intervals and paired differences on synthetic results with known answers."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from robustcl.config import ConfigError
from robustcl.evaluation.per_image import PerImage, read_per_image, write_per_image
from robustcl.runs import RunDir
from robustcl.sweep.plan import PlannedRun, plan_sweep
from robustcl.sweep.spec import configurations, load_spec
from robustcl.sweep.stats import DIFF_COLUMNS, paired_differences, raw_rows, reading
from robustcl.sweep.summary import aggregate, write_summary

ATTACK = "pgd20-linf-0.1"
N = 400


def fake_run(root: Path, label: str, seed: int, clean: np.ndarray, robust: np.ndarray,
             index: np.ndarray | None = None, write_flags: bool = True) -> tuple[PlannedRun, dict]:
    """A finished run directory: results.json from the flags (SLF only) and, optionally, per_image.npz."""
    run = PlannedRun(label, seed, "smoke", (), root / f"{label}-s{seed}")
    index = np.arange(len(clean)) if index is None else index
    results = {"method": "gbrcl", "n_eval": len(clean), "eval_subset": f"random subset of {len(clean)}",
               "protocols": {"slf": {"branch": "adversarial", "clean_acc": float(clean.mean()),
                                     "robust": {ATTACK: float(robust.mean()), "cw20-linf-0.1": float(robust.mean()) - 0.01}}}}
    run.root.mkdir(parents=True)
    RunDir(run.root).write_json(RunDir(run.root).results, results)
    if write_flags:
        write_per_image(RunDir(run.root), PerImage(index, ATTACK, {"slf": clean}, {"slf": robust}))
    return run, results


def base_flags(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    clean = rng.random(N) < 0.6
    return clean, clean & (rng.random(N) < 0.6)


def improved(robust: np.ndarray, k: int) -> np.ndarray:
    """`robust` with the first k wrong images made right: exactly k / N more robust accuracy."""
    out = robust.copy()
    out[np.flatnonzero(~robust)[:k]] = True
    return out


def test_per_image_flags_round_trip(tmp_path):
    clean, robust = base_flags(0)
    index = np.random.default_rng(0).permutation(10_000)[:N]
    write_per_image(RunDir(tmp_path), PerImage(index, ATTACK, {"slf": clean, "alf": ~clean}, {"slf": robust, "alf": robust}))
    back = read_per_image(RunDir(tmp_path))
    assert back.attack == ATTACK and np.array_equal(back.index, index) and list(back.clean) == ["slf", "alf"]
    assert np.array_equal(back.clean["alf"], ~clean) and np.array_equal(back.robust["slf"], robust)
    with np.load(tmp_path / "per_image.npz", allow_pickle=False) as stored:  # packed bits, not one byte a flag
        assert stored["slf.robust"].dtype == np.uint8 and stored["slf.robust"].shape == (N // 8,)


def test_identical_runs_give_a_zero_width_difference(tmp_path):
    entries = []
    for seed in (0, 1, 2):
        clean, robust = base_flags(seed)
        entries += [fake_run(tmp_path, "base", seed, clean, robust), fake_run(tmp_path, "copy", seed, clean, robust)]
    diffs = {d.attack: d for d in paired_differences(entries, "base")}
    d = diffs[ATTACK]
    assert d.configuration == "copy" and d.seeds == (0, 1, 2)
    for interval in (d.clean_t, d.robust_t, d.clean_bootstrap, d.robust_bootstrap):
        assert (interval.estimate, interval.lo, interval.hi) == (0.0, 0.0, 0.0)
    assert d.primary is d.robust_t and reading(d.primary) == "not resolved (covers 0)"  # a zero-width 0 is no effect
    other = diffs["cw20-linf-0.1"]  # no per-image flags for this attack: the seed interval only
    assert (other.robust_t.lo, other.robust_t.hi) == (0.0, 0.0) and other.robust_bootstrap is None


def test_a_shifted_copy_recovers_the_shift(tmp_path):
    k = 20  # +5 points of robust accuracy on every seed, clean unchanged
    entries, deltas = [], []
    for seed in (0, 1, 2):
        clean, robust = base_flags(seed)
        better = improved(robust, k)
        deltas.append(better.astype(int) - robust.astype(int))
        entries += [fake_run(tmp_path, "base", seed, clean, robust), fake_run(tmp_path, "better", seed, clean, better)]
    d = next(d for d in paired_differences(entries, "base") if d.attack == ATTACK)
    shift = k / N
    assert (d.robust_t.estimate, d.robust_t.lo, d.robust_t.hi) == pytest.approx((shift, shift, shift), abs=1e-12)
    assert d.robust_bootstrap.estimate == pytest.approx(shift, abs=1e-12)
    assert 0 < d.robust_bootstrap.lo < shift < d.robust_bootstrap.hi
    # the seeds share the test images, so one resample of images serves all three: the statistic is the mean
    # over images of u_i = the seeds' average delta on image i, whose bootstrap sd is sd(u) / sqrt(N)
    u = np.mean(deltas, axis=0)
    half = 1.959964 * u.std() / math.sqrt(N)
    assert (d.robust_bootstrap.hi - d.robust_bootstrap.lo) / 2 == pytest.approx(half, rel=0.1)
    assert (d.clean_t.lo, d.clean_t.hi) == (0.0, 0.0)


def test_one_seed_has_only_the_bootstrap_and_it_is_primary(tmp_path):
    clean, robust = base_flags(0)
    entries = [fake_run(tmp_path, "base", 0, clean, robust), fake_run(tmp_path, "better", 0, clean, improved(robust, 40))]
    d = next(d for d in paired_differences(entries, "base") if d.attack == ATTACK)
    assert d.robust_t.lo is None and d.primary is d.robust_bootstrap and d.primary.lo > 0


def test_no_bootstrap_across_different_test_images_or_without_flags(tmp_path):
    clean, robust = base_flags(0)
    index = np.arange(N)
    entries = [fake_run(tmp_path, "base", 0, clean, robust, index),
               fake_run(tmp_path, "moved", 0, clean, robust, index + 1),
               fake_run(tmp_path, "old", 0, clean, robust, write_flags=False)]
    diffs = {d.configuration: d for d in paired_differences(entries, "base") if d.attack == ATTACK}
    assert diffs["moved"].robust_bootstrap is None and "different test images" in diffs["moved"].bootstrap_note
    assert diffs["old"].robust_bootstrap is None and "no per_image.npz" in diffs["old"].bootstrap_note


def test_stale_flags_are_not_used(tmp_path):
    clean, robust = base_flags(0)
    run, results = fake_run(tmp_path, "base", 0, clean, robust)
    write_per_image(RunDir(run.root), PerImage(np.arange(N), ATTACK, {"slf": clean}, {"slf": improved(robust, 5)}))
    entries = [(run, results), fake_run(tmp_path, "copy", 0, clean, robust)]
    d = next(d for d in paired_differences(entries, "base") if d.attack == ATTACK)
    assert d.robust_bootstrap is None and "does not reproduce its results.json" in d.bootstrap_note


def test_aggregate_t_interval_per_configuration(tmp_path):
    entries = []
    for seed, k in zip((0, 1, 2), (0, 8, 20)):
        clean, robust = base_flags(0)  # the same baseline flags each seed: robust differs by k / N exactly
        entries.append(fake_run(tmp_path, "a", seed, clean, improved(robust, k)))
    row = next(r for r in aggregate(entries) if r.attack == ATTACK)
    values = [float(improved(base_flags(0)[1], k).mean()) for k in (0, 8, 20)]
    mean = sum(values) / 3
    half = 4.302652729749464 * math.sqrt(sum((v - mean) ** 2 for v in values) / 2) / math.sqrt(3)
    assert (row.robust_ci.lo, row.robust_ci.hi) == pytest.approx((mean - half, mean + half), abs=1e-12)


SPEC = """\
# synthetic (test)
name: synth
seeds: [0, 1]
baseline: base
runs:
  - {name: base, config: smoke}
  - {name: better, config: smoke}
"""


def test_summary_files_with_a_baseline(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    for seed in (0, 1):
        clean, robust = base_flags(seed)
        fake_run(out, "base", seed, clean, robust)
        fake_run(out, "better", seed, clean, improved(robust, 20))
    summary = write_summary(plan_sweep(str(spec), out)).read_text()
    assert "## Paired difference to the baseline `base`" in summary
    assert f"| better | base | SLF | {ATTACK} | 2 | +0.00 [+0.00, +0.00] |" in summary
    assert "+5.00 [+5.00, +5.00]" in summary and "| higher |" in summary
    with open(out / "summary_differences.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == DIFF_COLUMNS
    row = next(r for r in rows if r["attack"] == ATTACK)
    assert float(row["robust_t_estimate"]) == pytest.approx(0.05) and row["primary"] == "t" and row["reading"] == "higher"
    with open(out / "summary.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 2 * 2  # runs x attacks, one protocol: the raw rows


def test_autoattack_rows_name_the_images_it_ran_on():
    """AutoAttack runs on the first eval.autoattack_limit images: its raw row must say 200, not the PGD count."""
    results = {"method": "gbrcl", "n_eval": 2000, "eval_subset": "random subset of 2000 of 10000 test images",
               "protocols": {"slf": {"branch": "adversarial", "clean_acc": 0.6,
                                     "robust": {ATTACK: 0.4, "autoattack-linf-0.1": 0.35},
                                     "autoattack": {"n": 200, "accuracy": 0.35, "pgd_on_same_images": 0.37}}}}
    rows = {r["attack"]: r for r in raw_rows([(PlannedRun("g", 0, "smoke", (), Path("g-s0")), results)])}
    assert rows[ATTACK]["n_eval"] == 2000 and rows[ATTACK]["eval_subset"] == results["eval_subset"]
    assert rows[ATTACK]["headline_on_same_images"] == "" and rows["autoattack-linf-0.1"]["headline_on_same_images"] == 0.37
    assert rows["autoattack-linf-0.1"]["n_eval"] == 200
    assert rows["autoattack-linf-0.1"]["eval_subset"] == "the first 200 of the 2000 evaluated: " + results["eval_subset"]


def test_baseline_must_name_a_configuration(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("baseline: base", "baseline: nope"))
    with pytest.raises(ConfigError, match=r"baseline 'nope' is not one of the configurations \(base, better\)"):
        configurations(load_spec(str(spec)))


def test_shipped_ladder_and_lambda_d_name_their_baselines():
    assert load_spec("fmnist-ladder").spec.baseline == "adv-only"
    assert load_spec("fmnist-lambda-d").spec.baseline == "critic.weight=0.0"
    for name in ("fmnist-ladder", "fmnist-lambda-d"):
        configurations(load_spec(name))  # the baseline is one of them


def test_evaluation_writes_flags_that_reproduce_results(tmp_path):
    """A real (smoke) run: per_image.npz exists and its flags give exactly results.json's accuracies."""
    from robustcl.cli import main

    out = tmp_path / "r"
    assert main(["run", "--config", "smoke", "--out", str(out), "--quiet", "train.max_steps=2",
                 "eval.eps_curve=[]", "eval.limit=40"]) == 0
    results = json.loads((out / "results.json").read_text())
    flags = read_per_image(RunDir(out))
    assert flags is not None and len(flags.index) == 40 and flags.attack == next(iter(results["robust"]))
    for protocol, r in results["protocols"].items():
        assert flags.clean[protocol].mean() == r["clean_acc"]
        assert flags.robust[protocol].mean() == r["robust"][flags.attack]


def test_comparisons_pair_each_configuration_with_its_own_twin(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("baseline: base\n", "comparisons: [a.ref vs a, b.ref vs b]\n").replace(
        "  - {name: better, config: smoke}\n",
        "  - {name: better, config: smoke}\n  - {name: a, config: smoke}\n  - {name: a.ref, config: smoke}\n"
        "  - {name: b, config: smoke}\n  - {name: b.ref, config: smoke}\n"))
    out = tmp_path / "out"
    for seed in (0, 1):
        clean, robust = base_flags(seed)
        fake_run(out, "a", seed, clean, robust)
        fake_run(out, "a.ref", seed, clean, improved(robust, 20))   # a.ref - a: +5 points exactly
        fake_run(out, "b", seed, clean, improved(robust, 40))
        fake_run(out, "b.ref", seed, clean, improved(robust, 40))   # b.ref - b: 0 exactly (b - a would be +10)
    summary = write_summary(plan_sweep(str(spec), out)).read_text()
    robust_cells = {line.split(" | ")[0].lstrip("| "): line for line in summary.splitlines() if f"| {ATTACK} |" in line
                    and " minus " not in line and line.count("[") >= 3}
    assert "| a | SLF |" in robust_cells["a.ref"] and "+5.00 [+5.00, +5.00]" in robust_cells["a.ref"]
    assert "| b | SLF |" in robust_cells["b.ref"] and "+0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] | +0.00" in \
        robust_cells["b.ref"].split(f"| {ATTACK} | 2 | ")[1]
    with open(out / "summary_differences.csv", newline="") as fh:
        baselines = {(r["configuration"], r["baseline"]) for r in csv.DictReader(fh)}
    assert baselines == {("a.ref", "a"), ("b.ref", "b")}
    spec.write_text(SPEC.replace("baseline: base\n", "comparisons: [better vs nope]\n"))
    with pytest.raises(ConfigError, match=r"comparison 'better vs nope' names 'nope'"):
        configurations(load_spec(str(spec)))
