"""`robustcl bound` end to end on a tiny smoke run: bound.json, report section, reuse, errors, sweep summary."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from robustcl.bound.measure import BoundSettings, resolve_attack
from robustcl.bound.summary import correlations, flat_terms
from robustcl.cli import main
from robustcl.config import AttackConfig
from robustcl.runs import RunDir
from robustcl.runs.report import write_report

SMOKE = ["train.max_steps=2", "train.threads=1", "finetune.protocols=[slf]", "finetune.epochs=1", "eval.eps_curve=[]",
         "eval.limit=32"]
FAST = ["--images", "64", "--batch-size", "32", "--rho", "0.5", "1.0", "--sharpness-steps", "2",
        "--sharpness-images", "32", "--critic-steps", "60", "--mmd-permutations", "19", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bound") / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", *SMOKE]) == 0
    assert main(["finetune", "--run", str(out), "--quiet"]) == 0
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 0
    return RunDir(out)


@pytest.fixture(scope="module")
def measured(tiny_run):
    assert main(["bound", "--run", str(tiny_run.root), *FAST]) == 0
    return json.loads((tiny_run.root / "bound.json").read_text())


def numbers(value, path=""):
    """Every number in a JSON tree with its path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from numbers(v, f"{path}[{i}]")


def test_bound_json_holds_every_term_finite_on_held_out_data(tiny_run, measured):
    b = measured
    assert b["data"]["images"] == 64 and b["data"]["batches"] == 2 and b["data"]["batch_size"] == 32
    assert b["data"]["val_size"] == 64  # the smoke preset holds 64 images out of phase 1
    assert b["attack"]["eps"] == 0.1 and b["attack"]["steps"] == 2  # the run's phase-1 attack (smoke.yaml)
    t = b["terms"]
    assert t["benign_nce"] == pytest.approx(sum(t["benign_nce_per_batch"]) / 2)
    assert 0 < t["benign_nce"] < math.log(2 * 32 - 1) + 2 / 0.5  # NT-Xent with 63 candidates at tau = 0.5
    sharp = t["sharpness"]
    assert sharp["mode"] == "asam" and [r["rho"] for r in sharp["per_rho"]] == [0.5, 1.0]
    assert sharp["images"] == 32 and sharp["batches"] == 1
    for r in sharp["per_rho"]:
        assert r["max"] >= r["sam_step"] and len(r["steps"]) == 2 and r["perturbation_norm"] <= r["rho"] + 1e-6
    for space in ("z", "h", "h_head"):
        d = t["divergence"][space]
        assert {"js", "kl", "reverse_kl", "pearson", "hellinger", "mmd2", "mmd_bandwidth", "mmd_p_value"} <= set(d)
        assert d["js"]["bound"] <= math.log(2) and d["js"]["n_test"] == 32
    p2 = b["phase2"]["protocols"]["slf"]
    results = json.loads(tiny_run.results.read_text())
    assert p2["robust_error"] == pytest.approx(1 - results["protocols"]["slf"]["robust"][b["phase2"]["attack"]])
    assert p2["recomputed_matches_results"] is True and p2["n_test"] == 32 and p2["robust_loss"] > 0
    for path, value in numbers(b):
        assert math.isfinite(value), path
    # the parameters were restored after the sharpness ascent: the checkpoint's model is untouched on disk,
    # and the run's own files are unchanged apart from bound.json, bound.md, report.md
    assert {p.name for p in tiny_run.root.iterdir()} >= {"bound.json", "bound.md", "report.md"}


def test_report_has_the_bound_terms_section(tiny_run, measured):
    report = tiny_run.report.read_text()
    assert "## Bound terms" in report and "adversarial InfoNCE" in report and "| SLF |" in report
    assert report.count("## Bound terms") == 1
    # `evaluate` and `sweep` rewrite report.md with write_report: the section stays (report.py includes bound.md)
    write_report(tiny_run)
    assert tiny_run.report.read_text().count("## Bound terms") == 1


def strip_timing(bound: dict) -> dict:
    return {k: v for k, v in bound.items() if k not in ("seconds", "geometry")}


def test_remeasuring_with_the_same_seed_is_bit_identical_and_reuse_needs_same_settings(tiny_run, measured, capsys):
    assert main(["bound", "--run", str(tiny_run.root), *FAST, "--overwrite"]) == 0
    again = json.loads((tiny_run.root / "bound.json").read_text())
    assert strip_timing(again) == strip_timing(measured)
    capsys.readouterr()
    assert main(["bound", "--run", str(tiny_run.root), *FAST]) == 0  # same settings: reused, not re-measured
    assert "reused:" in capsys.readouterr().out
    assert main(["bound", "--run", str(tiny_run.root), *FAST, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustcl: error: ") and "measured with other settings (seed 0 -> 1)" in err
    assert "--overwrite" in err and "\n" not in err


def test_each_stage_is_a_line_off_a_terminal_nothing_when_quiet_and_the_terms_do_not_change(tiny_run, measured,
                                                                                             tmp_path, capsys):
    """`robustcl bound` takes tens of seconds on the demo's run: each stage says when it is done (a bar on a
    terminal); the numbers are the same with or without it."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.root, copy)
    capsys.readouterr()
    loud = [a for a in FAST if a != "--quiet"]
    assert main(["bound", "--run", str(copy), *loud, "--overwrite"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("robustcl bound ")]
    stages = [re.match(r"robustcl bound (.+): (\d+) images? in \d+\.\d s", line).groups() for line in lines]
    assert stages == [("features and attack", "64"), ("sharpness", "32"), ("divergence", "64"),
                      ("slf/robust loss", "32")]
    shown = json.loads((copy / "bound.json").read_text())
    assert main(["bound", "--run", str(copy), *FAST, "--overwrite"]) == 0
    assert capsys.readouterr().err == ""
    assert strip_timing(json.loads((copy / "bound.json").read_text())) == strip_timing(shown)


def test_geometry_plot(tiny_run, measured):
    assert main(["bound", "--run", str(tiny_run.root), *FAST, "--geometry"]) == 0
    png = tiny_run.plots / "geometry.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bound = json.loads((tiny_run.root / "bound.json").read_text())
    assert bound["geometry"]["path"] == "plots/geometry.png" and len(bound["geometry"]["explained_variance"]) == 2
    assert strip_timing(bound) == strip_timing(measured)  # the terms were reused, not re-measured
    assert "![feature geometry](plots/geometry.png)" in tiny_run.report.read_text()


def test_run_without_checkpoint_is_a_one_line_error(tiny_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run.config, bare / "config.yaml")
    assert main(["bound", "--run", str(bare)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustcl: error: ") and "has no checkpoints/last.pt" in err and "\n" not in err
    assert main(["bound", "--run", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["bound", "--run", str(bare), "--images", "4"]) == 2
    assert "--images 4 must be >= 8" in capsys.readouterr().err
    assert not (bare / "bound.json").exists()


def test_sweep_gathers_reuses_and_measures(tiny_run, measured, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_run.root, sweep / "a-s0")            # holds bound.json: reused
    shutil.copytree(tiny_run.root, sweep / "b-s0", ignore=shutil.ignore_patterns("bound.*"))  # measured
    (sweep / "broken-s0").mkdir()
    shutil.copy(tiny_run.config, sweep / "broken-s0" / "config.yaml")  # no checkpoint: reported, not fatal
    assert main(["bound", "--sweep", str(sweep), *FAST[:-1]]) == 1
    out = capsys.readouterr()
    assert "a-s0: bound.json reused" in out.out and "b-s0: measured in" in out.out
    assert "broken-s0: failed:" in out.out
    assert "robustcl bound b-s0/features and attack: 64 images in " in out.err  # each stage, named by its run
    assert "robustcl bound a-s0/" not in out.err  # reused: nothing measured
    with open(sweep / "bound_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["a-s0", "b-s0"]
    assert float(rows[0]["js_z"]) == measured["terms"]["divergence"]["z"]["js"]["bound"]
    assert rows[0]["js_z"] == rows[1]["js_z"]  # same checkpoint, same seed: the same numbers
    md = (sweep / "bound_summary.md").read_text()
    assert "Spearman" in md and "`broken-s0` not measured" in md
    assert (sweep / "bound_vs_robust.png").read_bytes()[:4] == b"\x89PNG"
    plots = {p.name for p in (sweep / "bound_plots").iterdir()}
    assert {"bound_sum.png", "js_z.png", "sharpness_asam_rho=0.5.png"} <= plots and len(plots) == len(flat_terms(measured))
    assert "| bound_sum |" in md and "Reading (p < 0.05" in md


def test_correlations_rank_terms_against_robust_error(measured):
    def fake(benign: float, error: float) -> dict:
        b = json.loads(json.dumps(measured))
        b["terms"]["benign_nce"] = benign
        b["phase2"]["protocols"]["slf"]["robust_error"] = error
        return b
    rows = [("r1", fake(1.0, 0.5)), ("r2", fake(2.0, 0.7)), ("r3", fake(3.0, 0.6)), ("r4", fake(4.0, 0.9))]
    corr = {(c["term"], c["target"]): c for c in correlations(rows)}
    c = corr[("benign_nce", "slf_robust_error")]
    assert c["n"] == 4 and c["rho"] == pytest.approx(0.8) and c["p_exact"] == pytest.approx(8 / 24)
    assert math.isnan(corr[("adversarial_nce", "slf_robust_error")]["rho"])  # constant across these fakes
    assert set(flat_terms(measured)) >= {"benign_nce", "sharpness_asam_rho=0.5", "js_z", "mmd2_h_head", "bound_sum"}
    assert c["p"] == c["p_exact"] and c["p_method"] == "exact" and c["ci"].lo <= 0.8 <= c["ci"].hi
    t = flat_terms(measured)
    largest = max(r["rho"] for r in measured["terms"]["sharpness"]["per_rho"])
    assert t["bound_sum"] == pytest.approx(t["adversarial_nce"] + t["benign_nce"] + t["js_z"]
                                           + t[f"sharpness_asam_rho={largest:g}"], rel=1e-12)
    assert torch.get_num_threads() >= 1


def test_the_attack_raises_the_adversarial_nce_and_eps_zero_leaves_the_head_features_unchanged(tiny_run, measured,
                                                                                                 tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.root, copy, ignore=shutil.ignore_patterns("bound.*"))
    assert main(["bound", "--run", str(copy), *FAST, "--eps", "0", "--no-robust-loss"]) == 0
    zero = json.loads((copy / "bound.json").read_text())
    assert zero["attack"]["eps"] == 0 and "changed by --eps" in zero["attack"]["source"]
    assert "robust_loss" not in zero["phase2"]["protocols"]["slf"]
    # the first batch's views are drawn before any attack noise, so they are the same in both measurements:
    # PGD on q maximises NCE(z_b(p), z_a(q')), so the attacked value is the larger one
    assert measured["terms"]["adversarial_nce_per_batch"][0] > zero["terms"]["adversarial_nce_per_batch"][0]
    assert measured["terms"]["benign_nce_per_batch"][0] == zero["terms"]["benign_nce_per_batch"][0]
    # eps = 0: q' = q, so through one branch the two feature samples coincide
    assert zero["terms"]["divergence"]["h_head"]["mean_feature_distance"] == 0.0
    assert measured["terms"]["divergence"]["h_head"]["mean_feature_distance"] > 0.0


def _method_with(attack):
    """A stand-in method whose `attack_config` hook (what bound reads) returns `attack`."""
    return SimpleNamespace(attack_config=lambda: attack)


def test_resolve_attack_takes_the_runs_budget_and_scales_alpha_with_eps():
    run_attack = AttackConfig(eps=0.1, alpha=0.04, steps=3)
    cfg = SimpleNamespace(eval=SimpleNamespace(attack=AttackConfig(eps=0.2, alpha=0.05, steps=20)))
    same, source = resolve_attack(cfg, _method_with(run_attack), BoundSettings())
    assert (same.eps, same.alpha, same.steps) == (0.1, 0.04, 3) and "phase-1 attack" in source
    half, source = resolve_attack(cfg, _method_with(run_attack), BoundSettings(eps=0.05, steps=7))
    assert (half.eps, half.alpha, half.steps) == (0.05, pytest.approx(0.02), 7) and "changed by" in source
    fallback, source = resolve_attack(cfg, _method_with(None), BoundSettings())
    assert (fallback.eps, fallback.steps) == (0.2, 20) and "no phase-1 attack" in source


@pytest.mark.skipif(not hasattr(AttackConfig(), "mode"), reason="this checkout has no FGSM-RS attack mode")
def test_resolve_attack_turns_fgsm_rs_into_one_step_of_one_and_a_quarter_eps():
    run_attack = AttackConfig(eps=0.1, alpha=0.04, steps=1, mode="fgsm-rs")
    got, _ = resolve_attack(SimpleNamespace(), _method_with(run_attack), BoundSettings())
    assert (got.eps, got.alpha, got.steps, got.random_start) == (0.1, pytest.approx(0.125), 1, True)
