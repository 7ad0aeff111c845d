"""The public Python API (robustcl/api.py) on the smoke preset: what each function returns and writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import robustcl
from robustcl.bound.measure import BoundSettings
from robustcl.config import Config, ConfigError
from robustcl.runs import RunError

ROOT = Path(__file__).resolve().parents[1]
# The smoke preset at its smallest: two phase-1 steps, SLF and ALF for one epoch, 32 test images.
FAST = ("train.max_steps=2", "train.threads=1", "finetune.epochs=1", "eval.eps_curve=[]", "eval.limit=32")
BOUND = BoundSettings(images=64, batch_size=32, rho=(0.5,), sharpness_steps=1, sharpness_images=32, critic_steps=20,
                      mmd_permutations=9, robust_loss=False)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return robustcl.run("smoke", out, FAST)


def test_import_robustcl_and_its_api_names_import_no_torch():
    code = ("import sys, robustcl\n"
            "fns = [getattr(robustcl, n) for n in ('pretrain', 'finetune', 'evaluate', 'run', 'bound_sweep',"
            " 'load_encoder', 'load_config')]\n"
            "assert all(callable(f) for f in fns)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (Path(robustcl.__file__).parent / "py.typed").is_file()


def test_every_documented_name_is_exported_and_callable():
    assert set(robustcl.__all__) >= {"pretrain", "finetune", "evaluate", "sweep", "bench", "bound", "load_encoder",
                                     "load_config", "run", "transfer"}
    for name in robustcl.API:
        assert callable(getattr(robustcl, name)), name


def test_the_submodules_named_like_api_functions_stay_modules_and_call_the_function(monkeypatch):
    import inspect

    import robustcl.api
    import robustcl.bound as bound_package
    from robustcl.sweep import plan_sweep

    assert bound_package.BoundSettings is BoundSettings and callable(plan_sweep)  # still the modules
    assert inspect.signature(robustcl.sweep) == inspect.signature(robustcl.api.sweep)
    calls = []
    monkeypatch.setattr(robustcl.api, "bench", lambda *a, **k: calls.append((a, k)) or "report")
    assert robustcl.bench("smoke", steps=1) == "report" and calls == [(("smoke",), {"steps": 1})]


def test_load_config_takes_a_name_a_path_or_a_config_with_overrides(tmp_path):
    cfg = robustcl.load_config("smoke", ["train.lr=0.5"])
    assert isinstance(cfg, Config) and cfg.train.lr == 0.5
    again = robustcl.load_config(cfg, ["seed=7", "method.critic.weight=0.3"])
    assert (again.seed, again.train.lr, again.method.critic.weight) == (7, 0.5, 0.3) and cfg.seed == 0
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(again.to_dict()))
    assert robustcl.load_config(path).to_dict() == again.to_dict()
    assert robustcl.load_config(again, ["method.name=simclr"]).method.name == "simclr"  # gbrcl's settings dropped
    with pytest.raises(ConfigError, match="unknown config key train.lrr"):
        robustcl.load_config(cfg, ["train.lrr=1"])


def test_run_returns_what_it_wrote(smoke_run):
    out = smoke_run
    assert out.run_dir.is_dir() and out.report == out.run_dir / "report.md" and out.report.is_file()
    assert out.pretrained.trained and out.pretrained.steps == 2 and out.pretrained.images_per_second > 0
    assert out.pretrained.encoder == out.run_dir / "encoder.safetensors" and out.pretrained.encoder.is_file()
    logged = [r for r in map(json.loads, (out.run_dir / "metrics.jsonl").read_text().splitlines())
              if r.get("phase") == "pretrain"][-1]
    assert out.pretrained.last and out.pretrained.last == {k: logged[k] for k in out.pretrained.last}
    assert set(out.heads) == {"slf", "alf"} and out.heads["alf"]["selected_on"] == "validation PGD accuracy"
    assert all((out.run_dir / "heads" / f"{p}.pt").is_file() for p in out.heads)
    assert out.results == json.loads((out.run_dir / "results.json").read_text())
    assert out.results["protocol"] == "slf" and set(out.results["protocols"]) == {"slf", "alf"}
    assert out.results["n_eval"] == 32 and out.results["suspect"] == {}
    encoder = robustcl.load_encoder(out.run_dir)
    features = encoder(torch.rand(3, 1, 16, 16))
    assert features.shape == (3, encoder.feature_dim) and not encoder.training


def test_pretrain_resume_of_a_finished_run_trains_nothing(smoke_run):
    again = robustcl.pretrain(None, smoke_run.run_dir, resume=True)
    assert (again.trained, again.steps, again.seconds, again.last) == (False, 2, None, {})
    with pytest.raises(ConfigError, match="pass resume=True"):
        robustcl.pretrain(None, smoke_run.run_dir)


def test_pretrain_takes_a_config_object(tmp_path):
    cfg = robustcl.load_config("smoke", [*FAST, "train.max_steps=1"])
    done = robustcl.pretrain(cfg, tmp_path / "p", ["seed=3"])
    assert done.trained and done.steps == 1 and done.run_dir == tmp_path / "p"
    stored = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert stored["seed"] == 3 and stored["train"]["max_steps"] == 1
    with pytest.raises(RunError, match="already holds a run"):  # nothing replaced without overwrite
        robustcl.pretrain(cfg, tmp_path / "p")


def test_finetune_and_evaluate_one_protocol(smoke_run):
    head = smoke_run.run_dir / "heads" / "slf.pt"
    with pytest.raises(RunError, match="already exists; pass --overwrite"):
        robustcl.finetune(smoke_run.run_dir, ["slf"])
    before = head.stat().st_mtime_ns
    records = robustcl.finetune(smoke_run.run_dir, ["slf"], ["finetune.epochs=2"], overwrite=True)
    assert set(records) == {"slf"} and records["slf"]["best_epoch"] in (1, 2)
    assert records["slf"]["finetune"]["epochs"] == 2 and head.stat().st_mtime_ns != before
    results = robustcl.evaluate(smoke_run.run_dir, ["eval.limit=16"], protocols=["slf"], report=False)
    assert results["n_eval"] == 16 and set(results["protocols"]) == {"slf"}
    assert results == json.loads((smoke_run.run_dir / "results.json").read_text())


def test_transfer_writes_a_new_run_and_leaves_the_source_alone(smoke_run, tmp_path):
    source_files = sorted(p.name for p in smoke_run.run_dir.iterdir())
    moved = robustcl.transfer(smoke_run.run_dir, "synthetic", val_size=32, out=tmp_path / "t", protocols=["slf"],
                              overrides=["data.synthetic.num_classes=3", "finetune.epochs=1"])
    assert moved.run_dir == tmp_path / "t" and moved.report.is_file()
    assert moved.results == json.loads((tmp_path / "t" / "results.json").read_text())
    assert set(moved.results["protocols"]) == {"slf"}
    assert torch.load(tmp_path / "t" / "heads" / "slf.pt", weights_only=True)["head"]["weight"].shape[0] == 3
    assert (tmp_path / "t" / "encoder.safetensors").read_bytes() == smoke_run.pretrained.encoder.read_bytes()
    assert sorted(p.name for p in smoke_run.run_dir.iterdir()) == source_files


def test_bound_measures_a_run_and_writes_bound_json(smoke_run):
    measured = robustcl.bound(smoke_run.run_dir, BOUND)
    assert measured == json.loads((smoke_run.run_dir / "bound.json").read_text())
    assert measured["data"]["images"] == 64 and [r["rho"] for r in measured["terms"]["sharpness"]["per_rho"]] == [0.5]
    with pytest.raises(ConfigError, match="threads=0 must be >= 1"):
        robustcl.bound(smoke_run.run_dir, BOUND, threads=0)


def test_bench_returns_the_report():
    report = robustcl.bench("smoke", ["data.synthetic.size=8", "model.widths=[4,4]", "method.attack.steps=1"],
                            batch_sizes=[4], precisions=["fp32"], steps=1, warmup=0, gemm_size=64, threads=1)
    assert report["schema"] == "robustcl.bench/1" and len(report["results"]) == 1
    case = report["results"][0]
    assert (case["config"], case["batch"], case["precision"]) == ("smoke", 4, "fp32") and case["images_per_s"] > 0


def test_sweep_and_bound_sweep(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("# one smoke run (test)\nname: one\nseeds: [0]\nruns:\n  - {name: a, config: smoke}\n")
    outcome = robustcl.sweep(spec, tmp_path / "sw", FAST)
    assert outcome.failed == {} and outcome.summary == tmp_path / "sw" / "summary.md" and outcome.summary.is_file()
    assert [r.name for r in outcome.plan.runs] == ["a-s0"] and (tmp_path / "sw" / "a-s0" / "results.json").is_file()
    measured = robustcl.bound_sweep(tmp_path / "sw", BOUND)
    assert measured.failed == {} and measured.summary == tmp_path / "sw" / "bound_summary.md"
    assert measured.summary.is_file() and (tmp_path / "sw" / "a-s0" / "bound.json").is_file()
