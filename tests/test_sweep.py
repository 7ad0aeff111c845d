"""`robustcl sweep` on tiny smoke specs: table statistics, CSV, skip/resume, fail-fast, grid naming, shipped specs."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
import torch

import robustcl.train.pretrain as pretrain_module
from robustcl.cli import main
from robustcl.config import ConfigError, list_presets, load_config
from robustcl.methods import METHODS
from robustcl.methods.gbrcl import Gbrcl
from robustcl.runs import RunError
from robustcl.sweep.flow import run_sweep
from robustcl.sweep.plan import PlannedRun, plan_sweep
from robustcl.sweep.spec import GridSpec, configurations, grid_runs, list_sweeps, load_spec, safe_name
from robustcl.sweep.stats import RAW_COLUMNS
from robustcl.sweep.summary import CSV_COLUMNS, aggregate, mean_std, summary_markdown_table

FAST = ["train.max_steps=2", "finetune.protocols=[slf]", "eval.eps_curve=[]"]

TWO_BY_TWO = """\
# Two smoke configurations x two seeds (test).
name: tiny
seeds: [0, 1]
overrides: [train.max_steps=2, "finetune.protocols=[slf]", "eval.eps_curve=[]"]
runs:
  - {name: simclr, config: smoke, overrides: [method.name=simclr]}
grid:
  base: smoke
  axes: {method.critic.weight: [0.3]}
"""


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def one_run_spec(folder: Path, extra: str = "", seeds: str = "[0]") -> Path:
    return write_spec(folder, f"# one smoke run (test)\nname: one\nseeds: {seeds}\n"
                              f"runs:\n  - {{name: g, config: smoke, overrides: [{extra}]}}\n")


@pytest.fixture
def count_pretrain(monkeypatch):
    """Wrap the real pretrain and record the resume flag of every call."""
    calls: list[bool] = []
    real = pretrain_module.pretrain

    def counting(cfg, run, resume=False, overwrite=False, progress=True):
        calls.append(resume)
        return real(cfg, run, resume=resume, overwrite=overwrite, progress=progress)

    monkeypatch.setattr(pretrain_module, "pretrain", counting)
    return calls


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    spec = write_spec(folder, TWO_BY_TWO)
    outcome = run_sweep(str(spec), folder / "out", progress=False, echo=lambda _: None)
    return spec, outcome


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------- the table
def test_sweep_writes_every_run_and_the_comparison(swept):
    _, outcome = swept
    out = outcome.plan.out
    names = [r.name for r in outcome.plan.runs]
    assert names == ["simclr-s0", "simclr-s1", "critic.weight=0.3-s0", "critic.weight=0.3-s1"]
    for name in names:
        assert (out / name / "results.json").is_file()
    for path in ("summary.md", "summary.csv", "clean_vs_robust.png", "sweep.yaml"):
        assert (out / path).is_file(), path
    assert outcome.summary == out / "summary.md" and not outcome.failed
    assert load_config(str(out / "simclr-s1" / "config.yaml")).seed == 1


def test_csv_has_the_expected_columns_and_rows(swept):
    _, outcome = swept
    rows = _csv_rows(outcome.plan.out / "summary_stats.csv")
    assert list(rows[0]) == CSV_COLUMNS
    assert [(r["configuration"], r["method"], r["protocol"], r["attack"], r["n_seeds"], r["seeds"]) for r in rows] == [
        ("simclr", "simclr", "slf", "pgd3-linf-0.1", "2", "0 1"),
        ("critic.weight=0.3", "gbrcl", "slf", "pgd3-linf-0.1", "2", "0 1")]


def test_summary_csv_holds_the_raw_per_seed_rows(swept):
    _, outcome = swept
    out = outcome.plan.out
    rows = _csv_rows(out / "summary.csv")
    assert list(rows[0]) == RAW_COLUMNS
    assert [(r["configuration"], r["seed"], r["run"], r["protocol"]) for r in rows] == [
        ("simclr", "0", "simclr-s0", "slf"), ("simclr", "1", "simclr-s1", "slf"),
        ("critic.weight=0.3", "0", "critic.weight=0.3-s0", "slf"), ("critic.weight=0.3", "1", "critic.weight=0.3-s1", "slf")]
    for r in rows:
        stored = json.loads((out / r["run"] / "results.json").read_text())["protocols"]["slf"]
        assert float(r["clean_acc"]) == stored["clean_acc"] and float(r["robust_acc"]) == stored["robust"][r["attack"]]


def test_table_mean_and_std_match_the_runs_results(swept):
    _, outcome = swept
    out = outcome.plan.out
    rows = {r["configuration"]: r for r in _csv_rows(out / "summary_stats.csv")}
    text = (out / "summary.md").read_text()
    for label in ("simclr", "critic.weight=0.3"):
        results = [json.loads((out / f"{label}-s{s}" / "results.json").read_text())["protocols"]["slf"] for s in (0, 1)]
        clean = [r["clean_acc"] for r in results]
        robust = [r["robust"]["pgd3-linf-0.1"] for r in results]
        row = rows[label]
        assert float(row["clean_acc_mean"]) == pytest.approx(sum(clean) / 2, abs=1e-12)
        assert float(row["clean_acc_std"]) == pytest.approx(abs(clean[0] - clean[1]) / 2 ** 0.5, abs=1e-12)
        assert float(row["robust_acc_mean"]) == pytest.approx(sum(robust) / 2, abs=1e-12)
        assert float(row["robust_acc_std"]) == pytest.approx(abs(robust[0] - robust[1]) / 2 ** 0.5, abs=1e-12)
        cells = (f"{100 * sum(clean) / 2:.2f} ± {100 * abs(clean[0] - clean[1]) / 2 ** 0.5:.2f} | "
                 f"{100 * sum(robust) / 2:.2f} ± {100 * abs(robust[0] - robust[1]) / 2 ** 0.5:.2f} |")
        assert f"| {label} | " in text and cells in text


def _fake(label: str, seed: int, clean: float, robust: float) -> tuple[PlannedRun, dict]:
    run = PlannedRun(label, seed, "smoke", (), Path(f"/nonexistent/{label}-s{seed}"))
    protocol = {"branch": "adversarial", "clean_acc": clean, "robust": {"pgd20-linf-0.1": robust}}
    return run, {"method": "gbrcl", "protocols": {"slf": protocol, "alf": dict(protocol, clean_acc=clean / 2)}}


def test_aggregate_groups_seeds_with_mean_and_sample_std():
    entries = [_fake("a", 0, 0.5, 0.2), _fake("a", 1, 0.7, 0.4), _fake("a", 2, 0.9, 0.3), _fake("b", 0, 0.6, 0.1)]
    rows = {(r.configuration, r.protocol): r for r in aggregate(entries)}
    a = rows[("a", "slf")]
    assert a.seeds == (0, 1, 2)
    assert a.clean == pytest.approx((0.7, 0.2))
    assert a.robust == pytest.approx((0.3, 0.1))
    assert rows[("a", "alf")].clean == pytest.approx((0.35, 0.1))
    assert rows[("b", "slf")].clean == (0.6, None)
    table = summary_markdown_table(list(rows.values()))
    assert "| a | gbrcl | SLF | adversarial | pgd20-linf-0.1 | 3 | 70.00 ± 20.00 | 30.00 ± 10.00 |" in table
    assert "| b | gbrcl | SLF | adversarial | pgd20-linf-0.1 | 1 | 60.00 | 10.00 |" in table


def test_mean_std_closed_form():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, statistics.stdev([1.0, 2.0, 3.0, 4.0])))
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert mean_std([0.25]) == (0.25, None)


# ------------------------------------------------------------------------------ skip and resume
def test_second_invocation_skips_finished_runs(swept, count_pretrain):
    spec, outcome = swept
    out = outcome.plan.out
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")}
    checkpoints = {p: p.read_bytes() for p in out.glob("*/checkpoints/last.pt")}
    log: list[str] = []
    again = run_sweep(str(spec), out, progress=False, echo=log.append)
    assert count_pretrain == []
    assert all("done, skipped" in line for line in log) and len(log) == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/results.json")} == mtimes
    assert all(p.read_bytes() == b for p, b in checkpoints.items())
    assert again.summary.is_file()


def test_a_finished_run_with_another_config_is_never_reused_or_overwritten(swept, count_pretrain, capsys):
    spec, outcome = swept
    out = outcome.plan.out
    before = (out / "simclr-s0" / "results.json").read_bytes()
    with pytest.raises(RunError, match=r"another config \(train.max_steps: 2 -> 3\); pass --overwrite") as info:
        run_sweep(str(spec), out, ["train.max_steps=3"], progress=False, echo=lambda _: None)
    assert "\n" not in str(info.value) and count_pretrain == []
    assert (out / "simclr-s0" / "results.json").read_bytes() == before
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(" done ") == 4 and "critic.weight=0.3-s1" in listing and "method.name=simclr seed=0" in listing


def test_interrupted_run_is_resumed_not_restarted(tmp_path, monkeypatch, count_pretrain):
    spec = one_run_spec(tmp_path, "train.max_steps=4, train.checkpoint_every=2, 'finetune.protocols=[slf]', "
                                  "'eval.eps_curve=[]'")
    out = tmp_path / "out"
    original = Gbrcl.training_step
    calls = {"n": 0}

    def dying(self, images, ctx):
        calls["n"] += 1
        if calls["n"] == 3:  # the checkpoint at step 2 is written, step 3 dies
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(spec), out, progress=False, echo=lambda _: None)
    run = out / "g-s0"
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "results.json").exists()
    assert [r.status for r in plan_sweep(str(spec), out).runs] == ["resume"]

    calls["n"] = -100  # no more deaths; count the steps the resumed run trains
    run_sweep(str(spec), out, progress=False, echo=lambda _: None)
    assert calls["n"] == -100 + 2  # steps 3 and 4 only: resumed from step 2, not restarted
    assert count_pretrain == [False, True]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert (run / "results.json").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["phase"] == "pretrain"]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, "# two runs (test)\nname: two\nruns:\n  - {name: bad, config: smoke}\n"
                                "  - {name: good, config: smoke}\n")
    real = pretrain_module.pretrain

    def diverging(cfg, run, resume=False, overwrite=False, progress=True):
        if run.root.name == "bad-s0":
            raise pretrain_module.NonFiniteLoss("non-finite loss (adversarial) before step 1")
        return real(cfg, run, resume=resume, overwrite=overwrite, progress=progress)

    monkeypatch.setattr(pretrain_module, "pretrain", diverging)
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--quiet", *FAST]) == 1
    captured = capsys.readouterr()
    assert "run bad-s0 failed: non-finite loss" in captured.err
    assert (out / "good-s0" / "results.json").is_file()
    summary = (out / "summary.md").read_text()
    assert "`bad-s0` failed: non-finite loss" in summary and "| good |" in summary


# ------------------------------------------------------------------------------------ fail fast
def test_a_typo_in_any_run_fails_before_any_run_starts(tmp_path, count_pretrain, capsys):
    spec = write_spec(tmp_path, "# typo (test)\nname: typo\nseeds: [0, 1]\nruns:\n"
                                "  - {name: fine, config: smoke}\n  - {name: typo, config: smoke, overrides: [train.lrr=1]}\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as info:
        run_sweep(str(spec), out, FAST, progress=False, echo=lambda _: None)
    assert str(info.value) == "sweep run typo-s0 (smoke): unknown config key train.lrr (did you mean train.lr?)"
    assert count_pretrain == [] and not out.exists()
    assert main(["sweep", "--spec", str(spec), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustcl: error: sweep run typo-s0") and "\n" not in err and not out.exists()


@pytest.mark.parametrize("text, message", [
    ("name: x\ngird: {base: smoke}\n", "unknown config key gird (did you mean grid?)"),
    ("name: x\nruns: [{config: smoke}]\n", "sweep runs entry (config 'smoke') needs a name"),
    ("name: x\nruns: [{name: ../up, config: smoke}]\n", "sweep run name '../up' must be"),
    ("name: x\nruns: [{name: a, config: smoke, overides: []}]\n", "unknown config key runs[0].overides"),
    ("name: x\nruns: [{name: a, config: smoke, overrides: [seed=3]}]\n", "sets the seed"),
    ("name: x\nruns: [{name: a, config: smoke}, {name: a, config: smoke}]\n", "two runs are named 'a'"),
    ("name: x\ngrid: {base: smoke, axes: {train.lr: 0.1}}\n", "grid.axes.train.lr must be a non-empty list"),
    ("name: x\nseeds: []\nruns: [{name: a, config: smoke}]\n", "seeds [] must be a non-empty list"),
    ("name: x\n", "needs `runs`, `grid` or both"),
    ("name: x\nruns: [{name: a, config: smoke, overrides: [trainlr]}]\n", "must look like key=value"),
])
def test_bad_specs_are_one_line_errors_naming_the_key(tmp_path, text, message):
    spec = write_spec(tmp_path, "# bad (test)\n" + text)
    with pytest.raises(ConfigError) as info:
        configurations(load_spec(str(spec)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_spec_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="unknown sweep spec 'nope'; shipped specs: .*fmnist-lambda-d"):
        load_spec("nope")


# --------------------------------------------------------------------------------------- naming
def test_grid_is_the_product_of_the_axes_with_readable_names():
    grid = GridSpec("smoke", {"method.critic.weight": [0.0, 0.3], "method.attack.eps": ["8/255", 0.1]}, ("train.lr=0.1",))
    runs = grid_runs(grid)
    assert [r.name for r in runs] == ["critic.weight=0.0,attack.eps=8_255", "critic.weight=0.0,attack.eps=0.1",
                                      "critic.weight=0.3,attack.eps=8_255", "critic.weight=0.3,attack.eps=0.1"]
    assert runs[1].overrides == ("train.lr=0.1", "method.critic.weight=0.0", "method.attack.eps=0.1")
    assert load_config("smoke", list(runs[0].overrides)).method.attack.eps == pytest.approx(8 / 255)


def test_grid_names_use_full_keys_when_short_ones_clash():
    runs = grid_runs(GridSpec("smoke", {"method.attack.eps": [0.1], "finetune.attack.eps": [0.2],
                                        "finetune.protocols": [["slf", "alf"]], "train.channels_last": [True]}))
    assert [r.name for r in runs] == ["method.attack.eps=0.1,finetune.attack.eps=0.2,finetune.protocols=slf+alf,"
                                      "train.channels_last=true"]
    assert load_config("smoke", list(runs[0].overrides)).finetune.protocols == ("slf", "alf")


def test_safe_name_keeps_names_inside_the_sweep_directory():
    assert safe_name("a/b c") == "a_b_c"
    assert safe_name("../etc") == "_._etc"
    assert safe_name("-x") == "_x"


# ------------------------------------------------------------------------------------ the package
LAYERS = ["spec", "options", "plan", "run", "launch", "stats", "rows", "summary", "flow"]  # robustcl/sweep/__init__.py


def test_the_package_re_exports_resolve_and_its_modules_import_only_downward():
    """`from robustcl.sweep import NAME` works for every name it lists; a module imports only the ones above it
    in LAYERS (no import circle), and no private name crosses modules."""
    import ast

    import robustcl.sweep as package

    assert all(getattr(package, name) is not None for name in package.__all__)
    folder = Path(package.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted([*LAYERS, "__init__"])
    for k, module in enumerate(LAYERS):
        for node in ast.walk(ast.parse((folder / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("robustcl.sweep"):
                parts = node.module.split(".")
                assert len(parts) == 3 and parts[2] in LAYERS[:k], f"{module} imports {node.module}"
                assert not [a.name for a in node.names if a.name.startswith("_")], f"{module}: {node.module}"


# ------------------------------------------------------------------------------- shipped specs
def test_shipped_specs_parse_and_every_existing_config_loads():
    assert {"fmnist-ladder", "fmnist-lambda-d", "fmnist-methods", "cifar10-methods"} <= set(list_sweeps())
    presets = set(list_presets())
    for name, description in list_sweeps().items():
        sweep = load_spec(name)
        assert description and sweep.spec.name == name
        for entry in configurations(sweep):
            if entry.config in presets:
                load_config(entry.config, [*sweep.spec.overrides, *entry.overrides, f"seed={sweep.spec.seeds[0]}"])


def test_shipped_ladder_and_lambda_d_specs():
    ladder = configurations(load_spec("fmnist-ladder"))
    assert [(e.name, e.config) for e in ladder] == [
        ("adv-only", "fmnist-ablation-adv-only"), ("+benign", "fmnist-ablation-benign"),
        ("+sam", "fmnist-ablation-sam"), ("+critic", "fmnist-gbrcl")]
    grid = configurations(load_spec("fmnist-lambda-d"))
    assert [e.name for e in grid] == [f"critic.weight={w}" for w in ("0.0", "0.1", "0.3", "1.0")]
    assert [load_config(e.config, list(e.overrides)).method.critic.weight for e in grid] == [0.0, 0.1, 0.3, 1.0]
    methods = configurations(load_spec("cifar10-methods"))
    assert [e.config for e in methods] == [f"cifar10-{e.name}" for e in methods]  # each run named by its preset
    trained = {load_config(e.config).method.name for e in methods}
    assert "gbrcl" in trained and trained <= set(METHODS)  # the paper's method among registered ones


def test_configs_lists_the_sweep_specs(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "sweep specs" in out and "fmnist-lambda-d" in out and "smoke" in out


# ------------------------------------------------------------------------------------------ CLI
def test_cli_sweep_runs_prints_the_summary_and_overwrite_redoes(tmp_path, capsys, count_pretrain):
    spec = one_run_spec(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--dry-run", *FAST]) == 0
    assert "g-s0  new" in capsys.readouterr().out and not out.exists()
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--quiet", *FAST]) == 0
    assert f"summary: {out / 'summary.md'}" in capsys.readouterr().out
    assert load_config(str(out / "g-s0" / "config.yaml")).train.max_steps == 2  # command-line overrides applied
    first = (out / "g-s0" / "results.json").stat().st_mtime_ns
    assert main(["sweep", "--spec", str(spec), "--out", str(out), "--quiet", "--overwrite", *FAST]) == 0
    assert count_pretrain == [False, False]
    assert (out / "g-s0" / "results.json").stat().st_mtime_ns != first


def test_a_run_made_before_a_setting_existed_is_still_reused(swept, count_pretrain):
    """config.yaml written by an older robustcl lacks settings added since; at their defaults they are no change."""
    spec, outcome = swept
    out = outcome.plan.out
    path = out / "simclr-s0" / "config.yaml"
    original = path.read_text()
    stored = yaml.safe_load(original)
    del stored["eval"]["restarts"], stored["finetune"]["aff"]
    path.write_text(yaml.safe_dump(stored, sort_keys=False))
    try:
        log: list[str] = []
        run_sweep(str(spec), out, progress=False, echo=log.append)
        assert count_pretrain == [] and all("done, skipped" in line for line in log)
    finally:
        path.write_text(original)


def test_a_run_another_process_finished_after_planning_is_skipped_not_overwritten(swept, count_pretrain,
                                                                                   monkeypatch):
    """Two sweeps sharing a directory: a run planned as new but finished by the other one meanwhile is skipped."""
    import robustcl.sweep.flow as flow_module

    spec, outcome = swept
    out = outcome.plan.out
    results = {p: p.read_bytes() for p in out.glob("*/results.json")}
    real_plan = flow_module.plan_sweep

    def stale_plan(*args, **kwargs):  # the statuses this process saw before the other one finished the runs
        plan = real_plan(*args, **kwargs)
        for run in plan.runs:
            run.status = "new"
        return plan

    monkeypatch.setattr(flow_module, "plan_sweep", stale_plan)
    log: list[str] = []
    run_sweep(str(spec), out, progress=False, echo=log.append)
    assert count_pretrain == [] and all("done, skipped" in line for line in log) and len(log) == 4
    assert {p: p.read_bytes() for p in out.glob("*/results.json")} == results
