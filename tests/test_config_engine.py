"""The config engine on its own (robustcl/config/engine.py): conversion of any dataclass, validation, plain data."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from robustcl.config.engine import CODE_ONLY, ConfigError, build, config_fields, dump_yaml, first_difference, plain


@dataclass
class Inner:
    where_checked: list[str] = field(default_factory=list, metadata=CODE_ONLY)
    eps: float = 0.5

    def validate(self, where: str) -> None:  # needs its key: the parent's to call, never the engine's
        self.where_checked.append(where)


@dataclass
class Outer:
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = field(default_factory=Inner)
    limit: int | None = None

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"config value limit={self.limit} must be >= 1")
        self.inner.validate("outer.inner")


def test_build_converts_types_fractions_and_nested_sections_and_calls_argument_free_validators():
    obj = build(Outer, {"mode": "b", "sizes": [3, 4, 5], "inner": {"eps": "8/255"}, "limit": 2})
    assert (obj.mode, obj.sizes, obj.limit) == ("b", (3, 4, 5), 2)
    assert obj.inner.eps == pytest.approx(8 / 255)
    assert obj.inner.where_checked == ["outer.inner"]  # once, by its parent: validate(where) is not the engine's


@pytest.mark.parametrize("mapping, message", [
    ({"mode": "c"}, "config key mode must be one of a, b"),
    ({"sizes": 3}, "config key sizes must be a list"),
    ({"limit": 0}, "limit=0 must be >= 1"),
    ({"inner": {"where_checked": []}}, "unknown config key inner.where_checked (valid: eps)"),
    ({"mdoe": "a"}, "unknown config key mdoe (did you mean mode?)"),
])
def test_build_errors_are_one_line_and_name_the_key(mapping, message):
    with pytest.raises(ConfigError) as info:
        build(Outer, mapping)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plain_and_dump_yaml_keep_config_keys_only_and_first_difference_finds_the_changed_one():
    obj = build(Outer, {"limit": 3})
    assert [f.name for f in config_fields(Inner)] == ["eps"]
    assert plain(obj) == {"mode": "a", "sizes": [1, 2], "inner": {"eps": 0.5}, "limit": 3}
    assert "where_checked" not in dump_yaml(obj)
    changed = build(Outer, {"limit": 3, "inner": {"eps": 0.25}})
    assert first_difference(plain(obj), plain(changed)) == "inner.eps: 0.5 -> 0.25"
    assert first_difference(plain(obj), plain(changed), ignore=("inner",)) is None


def test_the_package_exports_the_public_names_of_its_parts_and_no_private_one():
    import robustcl.config as config

    public = ("AffConfig AttackConfig CHANGEABLE_ON_RESUME CODE_ONLY Config ConfigError DataConfig DiagnosticsConfig "
              "EvalAttack EvalConfig FinetuneConfig INT_RANGE IntRange LINF_RANGE ModelConfig PRESET_PACKAGE "
              "PostprocessConfig REFERENCE_SWITCHES_OFF ReferenceConfig SCHEDULE_PACKAGE SEED SEED_RANGE "
              "StrongViewConfig SyntheticConfig TrainConfig ViewsConfig WeakViewConfig apply_override apply_overrides "
              "build check check_number config_fields convert convert_field described dump_yaml first_comment "
              "first_difference from_mapping list_presets list_schedules load_config load_yaml merge parse_float "
              "parse_yaml plain preset_chain read_bounded reference_switches schedule_overrides shipped_yaml").split()
    assert sorted(config.__all__) == sorted(public)
    assert [name for name in public if not hasattr(config, name)] == []
    assert not [name for name in config.__all__ if name.startswith("_")]
