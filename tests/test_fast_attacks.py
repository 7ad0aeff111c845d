"""FGSM-RS as a phase-1 attack mode: one step of 1.25 eps from a random start, validated config."""
from __future__ import annotations

import pytest
import torch

from robustcl.config import AttackConfig, ConfigError, load_config
from robustcl.data import DatasetInfo
from robustcl.methods import METHODS
from robustcl.methods.step_inputs import eval_pgd
from robustcl.methods.factory import build_training


def _method_and_ctx(overrides: list[str]):
    cfg = load_config("smoke", overrides)
    training = build_training(cfg, DatasetInfo("synthetic", 4, 1, 16, 16, (0.5,), (0.25,)), torch.device("cpu"),
                              generator_seed=3)
    return cfg, training.method, training.ctx


def test_fgsm_rs_mode_is_one_step_of_one_and_a_quarter_eps_from_a_uniform_start():
    cfg, method, ctx = _method_and_ctx(["method.attack.mode=fgsm-rs", "method.attack.steps=1"])
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    direction = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))

    def objective(z: torch.Tensor) -> torch.Tensor:
        return (z * direction).sum()  # gradient = direction everywhere
    eps = cfg.method.attack.eps
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    start = (x + (2 * noise - 1) * eps).clamp(0, 1)
    expected = torch.min(torch.max(start + 1.25 * eps * direction.sign(), x - eps), x + eps).clamp(0, 1)
    x_adv = eval_pgd(method, objective, x, cfg.method.attack, ctx)
    assert torch.equal(x_adv, expected)
    pgd_cfg = AttackConfig(eps=eps, alpha=cfg.method.attack.alpha, steps=1)
    ctx.generator.manual_seed(3)
    assert not torch.equal(eval_pgd(method, objective, x, pgd_cfg, ctx), expected)  # alpha, not 1.25 eps


def test_fgsm_rs_mode_trains_every_attacking_method(tmp_path):
    from robustcl.cli import main

    attacking = [name for name, cls in sorted(METHODS.items()) if not cls.attack_free(cls.config_class())]
    assert attacking
    for name in attacking:
        out = tmp_path / name
        assert main(["pretrain", "--config", "smoke", "--out", str(out), "--quiet", f"method.name={name}",
                     "method.attack.mode=fgsm-rs", "method.attack.steps=1", "train.max_steps=2"]) == 0
        assert (out / "encoder.safetensors").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["method.attack.mode=fgsm-rs"], "method.attack.steps=2 must be 1 with mode fgsm-rs"),
    (["method.attack.mode=fgsm-rs", "method.attack.steps=1", "method.attack.random_start=false"],
     "random_start=False must be true with mode fgsm-rs"),
    (["eval.attack.mode=fgsm-rs", "eval.attack.steps=1"], "eval.attack.mode='fgsm-rs' must be pgd"),
    (["method.attack.mode=free"], "method.attack.mode"),
])
def test_fast_attack_modes_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("smoke", overrides)


def test_the_overfitting_guard_stops_at_a_robust_collapse_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch,
                                                                                          capsys):
    """Held-out robust k-NN 0.8, 0.8, then 0.1 with clean 0.9: FGSM-RS's catastrophic overfitting signature."""
    from robustcl.cli import main
    from robustcl.train import diagnostics

    robust = iter([0.8, 0.8, 0.1, 0.1])
    monkeypatch.setattr(diagnostics.Diagnostics, "measure",
                        lambda self, step: {"knn_clean": 0.9, "knn_robust": next(robust)})
    out = tmp_path / "run"
    args = ["pretrain", "--config", "smoke", "--out", str(out), "--quiet", "method.attack.mode=fgsm-rs",
            "method.attack.steps=1", "train.checkpoint_every=1", "diagnostics.every=1"]
    assert main([*args, "diagnostics.on_collapse=stop"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 3: robust-collapse" in err and "method.attack.mode=pgd" in err
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # the state before it
    assert not (out / "encoder.safetensors").exists()
    robust = iter([0.1, 0.1])
    assert main(["pretrain", "--out", str(out), "--resume", "--quiet", "diagnostics.on_collapse=warn"]) == 0
    assert (out / "encoder.safetensors").exists()


def test_the_overfitting_guard_needs_diagnostics():
    with pytest.raises(ConfigError, match="diagnostics.on_collapse='stop' needs diagnostics.every > 0"):
        load_config("smoke", ["diagnostics.on_collapse=stop", "diagnostics.every=0"])
