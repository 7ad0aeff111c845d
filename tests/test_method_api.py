"""The method API (docs/methods.md): registration by subclassing, the hooks' defaults, one branch resolution."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from robustcl.config import AttackConfig, ConfigError, load_config
from robustcl.export import resolve_branch
from robustcl.methods import METHODS, Method, MethodConfig, StepContext, method_class
from robustcl.methods.sections import SamConfig
from robustcl.models import reported_branch
from robustcl.methods.factory import build_method
from robustcl.train.diagnostics import Diagnostics


def smoke(name: str, *overrides: str):
    """The smoke preset switched to method `name` (its own defaults), one attack step where it attacks."""
    extra = [] if method_class(name).attack_free(method_class(name).config_class()) else ["method.attack.steps=1"]
    return load_config("smoke", [f"method.name={name}", *extra, *overrides])


# ------------------------------------------------------------------------------------ registration
def test_a_method_class_with_a_name_registers_itself_and_configs_find_it(registry):
    @dataclass
    class EchoConfig(MethodConfig):
        name: str = "echo-test"
        scale: float = 2.0

    class Echo(Method):
        name = "echo-test"
        config_class = EchoConfig

    assert registry["echo-test"] is Echo and method_class("echo-test") is Echo
    cfg = load_config("smoke", ["method.name=echo-test", "method.scale=3.0"])
    assert isinstance(cfg.method, EchoConfig) and cfg.method.scale == 3.0
    assert type(build_method(cfg, 1, (0.5,), (0.25,))) is Echo


def test_a_base_class_without_a_name_is_not_registered_and_a_taken_name_is_refused(registry):
    before = set(registry)

    class Intermediate(Method):  # shares code, names no method
        pass

    assert set(registry) == before
    with pytest.raises(TypeError, match="already taken"):
        class Impostor(Method):  # noqa: F841 - the class statement itself must fail
            name = "gbrcl"
    assert registry["gbrcl"].__module__ == "robustcl.methods.gbrcl"


def test_an_unknown_method_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="known methods: " + ", ".join(sorted(METHODS))):
        method_class("no-such-method")


def test_the_config_imports_no_method_and_an_empty_registry_says_what_to_import():
    """The registry sits below the config (robustcl.config.registry): building a config without having imported
    robustcl.methods is a clear error, not a silent upward import."""
    code = ("import sys\n"
            "from robustcl.config import load_config\n"
            "assert not [m for m in sys.modules if m.startswith('robustcl.methods')], 'the config imported methods'\n"
            "try:\n"
            "    load_config('smoke')\n"
            "except RuntimeError as exc:\n"
            "    print(exc)\n"
            "import robustcl.methods\n"
            "print(type(load_config('smoke').method).__name__)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()
    assert "import robustcl.methods" in first and second == "GbrclConfig"


# ------------------------------------------------------------------------------------ hooks
@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_states_its_attack_sam_view_and_divergence_through_hooks(name):
    cfg = smoke(name)
    method = build_method(cfg, 1, (0.5,), (0.25,))
    attack = method.attack_config()
    assert (attack is None) == method_class(name).attack_free(cfg.method)
    if attack is not None:
        assert isinstance(attack, AttackConfig) and attack is cfg.method.attack
    assert isinstance(method.sam_config(), SamConfig)
    assert method.attack_view() == getattr(cfg.method, "attack_view", "strong")
    assert method.divergence() == (cfg.method.divergence if method.critic is not None else None)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_default_param_groups_cover_f_g_and_d_once_with_their_own_settings(name):
    cfg = smoke(name)
    method = build_method(cfg, 1, (0.5,), (0.25,))
    groups = method.param_groups(cfg.train)
    assert set(groups) == ({"encoder", "critic"} if method.critic is not None else {"encoder"})
    (encoder,) = groups["encoder"]
    assert (encoder["lr"], encoder["momentum"], encoder["weight_decay"]) == \
        (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay)
    grouped = [p for key in groups for g in groups[key] for p in g["params"]]
    auxiliary = {id(p) for m in method.auxiliary_modules().values() for p in m.parameters()}  # frozen: never stepped
    trained = [p for p in method.parameters() if id(p) not in auxiliary]
    assert len({id(p) for p in grouped}) == len(grouped) == len(trained) and not auxiliary & {id(p) for p in grouped}
    if method.critic is not None:
        c = cfg.method.critic
        assert (groups["critic"][0]["lr"], groups["critic"][0]["momentum"]) == (c.lr, c.momentum)


def test_the_other_hooks_default_to_doing_nothing():
    method = build_method(smoke("gbrcl"), 1, (0.5,), (0.25,))
    assert method.auxiliary_modules() == {} and method.epoch_metrics() == {}
    ctx = StepContext(method, torch.optim.SGD(method.encoder_parameters(), lr=0.1), None, None, (),
                      torch.Generator(), torch.no_grad)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.on_epoch_start(0, 1.0, ctx)
    method.on_step_end(1, 2, ctx)
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())


# ------------------------------------------------------------------------------------ branches
@pytest.mark.parametrize("requested", ["headline", "benign", "adversarial"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_report_branch_is_the_one_resolution_for_methods_and_exported_encoders(name, requested):
    method = build_method(smoke(name), 1, (0.5,), (0.25,))
    cls = type(method)
    expected = cls.headline_branch if requested == "headline" else requested
    expected = expected if method.encoder.dual_bn else "benign"
    assert method.report_branch(requested) == expected
    meta = {"headline_branch": cls.headline_branch, "dual_bn": method.encoder.dual_bn}
    assert resolve_branch(requested, meta) == expected


def test_reported_branch_refuses_an_unknown_branch():
    with pytest.raises(ValueError, match="branch must be one of"):
        reported_branch("clean", "adversarial", True)


def test_diagnostics_read_the_branch_phase_2_reads():
    """The k-NN checks honour finetune.branch (a dual-BN run fine-tuned on benign is measured on benign)."""
    images, labels = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8), torch.arange(12) % 2
    for requested, expected in (("headline", "adversarial"), ("benign", "benign")):
        cfg = smoke("gbrcl", f"finetune.branch={requested}")
        method = build_method(cfg, 1, (0.5,), (0.25,))
        diagnostics = Diagnostics(cfg, method, images, labels, 2, torch.device("cpu"), torch.no_grad, lambda x: x)
        assert diagnostics.branch == expected
