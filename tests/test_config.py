"""Config schema: presets load, overrides apply, bad keys and values fail with one-line errors."""
from __future__ import annotations

import pytest

from robustcl.config import ConfigError, dump_yaml, list_presets, load_config
from robustcl.methods import METHODS


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    assert cfg.method.name in METHODS
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)).to_dict() == cfg.to_dict()


def test_cifar10_preset_has_the_reference_values():
    cfg = load_config("cifar10-gbrcl")
    m, t = cfg.method, cfg.train
    assert (t.batch_size, t.epochs, t.lr, t.momentum, t.weight_decay, t.warmup_epochs) == (512, 500, 0.5, 0.9, 1e-4, 10)
    assert (m.temperature, m.attack.eps, m.attack.alpha, m.attack.steps) == (0.5, 8 / 255, 2 / 255, 7)
    assert (m.benign_weight, m.sam.mode, m.sam.rho, m.sam.terms) == (2.0, "asam", 1.0, ("benign",))
    c = m.critic
    assert (c.weight, c.lr, c.momentum, c.in_attack, c.order) == (0.1, 0.2, 0.9, True, 3)
    assert cfg.model.arch == "resnet18" and cfg.model.proj_dim == 128


def test_overrides_parse_values_and_fractions():
    cfg = load_config("smoke", ["train.lr=0.05", "method.attack.eps=8/255", "method.sam.mode=off",
                                "eval.eps_curve=[0.1, 1/10]"])
    assert cfg.train.lr == 0.05
    assert cfg.method.attack.eps == pytest.approx(8 / 255)
    assert cfg.method.sam.mode == "off"
    assert cfg.eval.eps_curve == (0.1, 0.1)


def test_simclr_preset_replaces_the_method_section():
    cfg = load_config("fmnist-simclr")
    assert cfg.method.name == "simclr" and not hasattr(cfg.method, "attack")
    assert cfg.model == load_config("fmnist-gbrcl").model


@pytest.mark.parametrize("override, message", [
    (["train.lrr=0.1"], "unknown config key train.lrr (did you mean train.lr?)"),
    (["train.lr=-1"], "config value train.lr=-1.0 must be > 0"),
    (["method.attack.steps=0"], "method.attack.steps=0 must be >= 1"),
    (["train.precision=fp8"], "train.precision must be one of auto, fp32, bf16"),
    (["method.name=nope"], "unknown method.name 'nope'"),
    (["train.batch_size=abc"], "train.batch_size must be an integer"),
    (["method.attack.eps=1/0"], "must be a number"),
    (["trainlr"], "must look like key=value"),
])
def test_bad_input_is_a_one_line_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", override)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*smoke"):
        load_config("no-such-preset")


def test_missing_yaml_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("override, message", [
    (["method.benign_weight=0"], "method.sam.terms=['benign'] names a term that method.benign_weight=0 removes"),
    (["method.critic.momentum=7"], "method.critic.momentum=7.0 must be in [0, 1)"),
    (["train.min_lr=1.0"], "train.min_lr=1.0 must be in [0, train.lr=0.1]"),
    (["finetune.protocols=[slf, slf]"], "must not repeat a protocol"),
    (["model.critic_hidden=-3"], "model.critic_hidden=-3 must be >= 0"),
    (["eval.attack.eps=0"], "eval.attack.eps=0.0 must be > 0"),
    (["data.val_size=0"], "data.val_size=0 must be >= 1"),
    (["views.strong.blur_sigma=[2.0, 0.1]"], "config section views.strong:"),
])
def test_impossible_values_are_rejected_at_load_time(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", override)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_eval_attacks_must_include_pgd():
    with pytest.raises(ConfigError, match="eval.attacks=.* must include pgd"):
        load_config("smoke", ["eval.attacks=[cw]"])


def test_one_view_schema_serves_the_config_and_the_view_functions():
    """views.strong / views.weak are the very classes strong_view / weak_view take; code-only fields stay out of YAML."""
    from robustcl import views
    from robustcl.config import StrongViewConfig, WeakViewConfig

    cfg = load_config("smoke", ["views.strong.blur_p=0.3", "views.weak.padding=2"])
    assert type(cfg.views.strong) is views.StrongViewConfig is StrongViewConfig
    assert type(cfg.views.weak) is views.WeakViewConfig is WeakViewConfig
    assert cfg.views.strong.blur_p == 0.3 and cfg.views.weak.padding == 2
    assert list(cfg.to_dict()["views"]["strong"]) == ["crop_scale", "flip_p", "jitter", "jitter_p", "gray_p", "blur_p",
                                                      "blur_sigma"]
    with pytest.raises(ConfigError, match="unknown config key views.strong.crop_ratio"):
        load_config("smoke", ["views.strong.crop_ratio=[1, 1]"])
    with pytest.raises(ValueError, match="views.strong.crop_scale"):
        views.StrongViewConfig(crop_scale=(0.8, 0.2))  # the same check, constructed in code
