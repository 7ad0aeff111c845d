"""The run directory end to end on the smoke preset: CLI, results, exact resume, errors, exports."""
from __future__ import annotations

import json

import pytest
import torch

from robustcl import load_encoder
from robustcl.cli import main
from robustcl.config import dump_yaml, load_config
from robustcl.methods import METHODS
from robustcl.methods.gbrcl import Gbrcl
from robustcl.runs import RunDir, RunError
from robustcl.train.pretrain import NonFiniteLoss, pretrain


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet"]) == 0
    assert main(["finetune", "--run", str(out), "--quiet"]) == 0
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 0
    return RunDir(out)


def test_run_directory_holds_everything(smoke_run):
    for path in (smoke_run.config, smoke_run.metrics, smoke_run.checkpoint, smoke_run.encoder, smoke_run.results,
                 smoke_run.report, smoke_run.plots / "loss_terms.png", smoke_run.plots / "robust_vs_eps.png"):
        assert path.is_file(), path
    results = json.loads(smoke_run.results.read_text())
    assert {"clean_acc", "robust", "branch", "protocol", "n_eval"} <= set(results)
    assert results["branch"] == "adversarial" and results["n_eval"] == 64
    assert set(results["protocols"]) == {"slf", "alf"}
    assert isinstance(results["suspect"], dict)
    for r in results["protocols"].values():
        assert {c["name"] for c in r["integrity"]["checks"]} == {
            "eval-mode-batch-independent", "eps-zero-equals-clean", "non-increasing-in-eps",
            "non-increasing-in-steps", "large-eps-to-chance", "square-not-beating-white-box"}
        assert 0 <= r["robust"]["pgd3-linf-0.1"] <= r["clean_acc"] <= 1 or r["clean_acc"] == 0
        assert r["eps_curve"][0] == {"eps": 0.0, "accuracy": r["clean_acc"]}
    records = [json.loads(line) for line in smoke_run.metrics.read_text().splitlines()]
    assert {"benign", "adversarial", "divergence", "critic_acc", "images_per_s"} <= set(records[0])


def test_checkpoint_loads_with_weights_only(smoke_run):
    state = torch.load(smoke_run.checkpoint, weights_only=True)
    assert state["step"] == 4
    assert {"model", "optimizer", "critic_optimizer", "sam", "scheduler", "rng"} <= set(state)
    assert state["sam"] == {"rho": 1.0, "adaptive": True}


def test_load_encoder_returns_a_plain_module_through_the_branch(smoke_run):
    enc = load_encoder(smoke_run.root)
    assert enc.branch == "adversarial" and not enc.training
    x = torch.rand(3, 1, 16, 16)
    feats = enc(x)
    assert feats.shape == (3, 32)
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    benign = load_encoder(smoke_run.encoder, branch="benign")
    assert not torch.allclose(benign(x), feats)


def test_existing_run_is_not_overwritten(smoke_run, capsys):
    before = smoke_run.checkpoint.read_bytes()
    assert main(["pretrain", "--config", "smoke", "--out", str(smoke_run.root), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run; pass --resume" in err and "\n" not in err
    assert smoke_run.checkpoint.read_bytes() == before


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    assert main(["pretrain", "--config", "smoke", "--out", str(tmp_path / "x"), "train.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "robustcl: error: unknown config key train.lrr (did you mean train.lr?)"
    assert not (tmp_path / "x").exists()


def _final_state(run: RunDir) -> dict:
    return torch.load(run.checkpoint, weights_only=True)


def test_killed_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["train.max_steps=6", "train.checkpoint_every=2"])
    straight = RunDir(tmp_path / "straight")
    pretrain(cfg, straight, progress=False)

    killed = RunDir(tmp_path / "killed")
    original = Gbrcl.training_step
    calls = {"n": 0}

    def dying(self, images, ctx):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at step 2... and step 3 ran
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, killed, progress=False)
    assert _final_state(killed)["step"] == 2
    monkeypatch.setattr(Gbrcl, "training_step", original)
    pretrain(cfg, killed, resume=True, progress=False)
    a, b = _final_state(straight), _final_state(killed)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = [r["step"] for r in killed.iter_metrics("pretrain")]
    assert steps == sorted(set(steps))  # no duplicate records after the resume


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1"])
    original = Gbrcl.loss_terms
    calls = {"n": 0}

    def poisoned(self, p, q, q_adv, only=None):
        terms = original(self, p, q, q_adv, only)
        if only is None:
            calls["n"] += 1
            if calls["n"] == 3:
                terms["adversarial"] = terms["adversarial"] * float("nan")
        return terms

    monkeypatch.setattr(Gbrcl, "loss_terms", poisoned)
    run = RunDir(tmp_path / "nan")
    with pytest.raises(NonFiniteLoss, match="non-finite loss \\(adversarial"):
        pretrain(cfg, run, progress=False)
    state = _final_state(run)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


SINGLE_BN = sorted(name for name, cls in METHODS.items() if not cls.dual_bn)


@pytest.mark.parametrize("name", SINGLE_BN)
def test_a_single_bn_method_smoke_run_reads_through_the_benign_branch(tmp_path, name):
    out = tmp_path / name
    attack = [] if METHODS[name].attack_free(METHODS[name].config_class()) else ["method.attack.steps=1"]
    assert main(["run", "--config", "smoke", "--out", str(out), "--quiet", f"method.name={name}", *attack,
                 "finetune.protocols=[slf]"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == name and results["branch"] == "benign"
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["critic_optimizer"] is None) == (not any(k.startswith("critic.") for k in state["model"]))
    assert not any(".adversarial." in k for k in state["model"])  # a single-BN encoder


def test_overwrite_replaces_the_old_run(tmp_path):
    out = tmp_path / "r"
    assert main(["run", "--config", "smoke", "--out", str(out), "--quiet", "finetune.protocols=[slf]"]) == 0
    assert (out / "heads" / "slf.pt").is_file()
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert not (out / "heads").exists() and not (out / "results.json").exists()


def test_resume_refuses_a_changed_phase1_setting_but_allows_operational_ones(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["train.max_steps=4", "train.checkpoint_every=2"])
    run = RunDir(tmp_path / "r")
    original = Gbrcl.training_step
    calls = {"n": 0}

    def dying(self, images, ctx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, images, ctx)

    monkeypatch.setattr(Gbrcl, "training_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, run, progress=False)
    monkeypatch.setattr(Gbrcl, "training_step", original)
    changed = load_config("smoke", ["train.max_steps=4", "train.checkpoint_every=2", "method.benign_weight=0.5"])
    with pytest.raises(RunError, match=r"changed phase-1 setting \(method.benign_weight: 2.0 -> 0.5\)"):
        pretrain(changed, run, resume=True, progress=False)
    allowed = load_config("smoke", ["train.max_steps=4", "train.checkpoint_every=2", "eval.limit=32"])
    pretrain(allowed, run, resume=True, progress=False)
    assert load_config(str(run.config)).eval.limit == 32


def test_demo_refuses_to_reuse_a_run_made_with_other_settings(tmp_path):
    from robustcl.demo import run_demo

    out = tmp_path / "demo"
    (out / "gbrcl").mkdir(parents=True)
    (out / "gbrcl" / "config.yaml").write_text(dump_yaml(load_config("fmnist-gbrcl", ["train.max_steps=7"])))
    with pytest.raises(RunError, match=r"other settings \(train.max_steps: 7 -> 200\)"):
        run_demo(out, progress=False)


def test_a_run_that_cannot_start_leaves_no_directory_behind(tmp_path, capsys):
    out = tmp_path / "missing-data"
    assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "data.name=fashion-mnist",
                 f"data.root={tmp_path / 'empty'}"]) == 2
    assert "fashion-mnist not found in root" in capsys.readouterr().err
    assert not out.exists()


def test_finetune_does_not_refit_existing_heads_unless_asked(smoke_run, capsys):
    before = smoke_run.head("slf").read_bytes()
    assert main(["finetune", "--run", str(smoke_run.root), "--quiet", "--protocol", "slf"]) == 2
    assert "heads/slf.pt already exists; pass --overwrite" in capsys.readouterr().err
    assert smoke_run.head("slf").read_bytes() == before
    saved = torch.load(smoke_run.head("slf"), weights_only=True)
    assert saved["finetune"]["epochs"] == 2


def test_evaluate_reports_cw_and_l2_attacks_when_asked(smoke_run):
    assert main(["evaluate", "--run", str(smoke_run.root), "--quiet", "eval.attacks=[pgd, cw, pgd-l2]"]) == 0
    robust = json.loads(smoke_run.results.read_text())["robust"]
    assert set(robust) == {"pgd3-linf-0.1", "cw3-linf-0.1", "pgd20-l2-0.5"}
    assert all(0 <= v <= 1 for v in robust.values())
