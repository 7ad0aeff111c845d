"""Typed run configuration: YAML presets shipped in the package, `key=value` overrides, validation.

Three parts: `engine` (YAML values to typed dataclasses, overrides, the resume diff), `schema` (one
dataclass per config section) and `presets` (the shipped presets, `extends`, `load_config`). Every
name is re-exported here, so `from robustcl.config import X` is all callers need.
"""
from __future__ import annotations

from robustcl.config.engine import (  # noqa: F401 - the underscored names: the former module's helpers
    CODE_ONLY, ConfigError, _check, _convert, _merge, _parse_float, _plain, apply_override, apply_overrides, build,
    check, config_fields, convert, dump_yaml, first_difference, merge, parse_float, parse_yaml, plain)
from robustcl.config.schema import (
    LINF_RANGE, OFF, PHASE1_FREE, AffConfig, AttackConfig, Config, DataConfig, DiagnosticsConfig, EvalAttack,
    EvalConfig, FinetuneConfig, ModelConfig, ReferenceConfig, StrongViewConfig, StrongViewSection, SyntheticConfig,
    TrainConfig, ViewsConfig, WeakViewConfig, WeakViewSection, from_mapping, reference_switches)
from robustcl.config.presets import (  # noqa: F401 - the underscored names: the former module's helpers
    PRESET_PACKAGE, SCHEDULE_PACKAGE, _read_yaml, _resolve_extends, list_presets, list_schedules, load_config,
    preset_chain, schedule_overrides)

__all__ = [
    "CODE_ONLY", "LINF_RANGE", "OFF", "PHASE1_FREE", "PRESET_PACKAGE", "SCHEDULE_PACKAGE", "AffConfig",
    "AttackConfig", "Config", "ConfigError", "DataConfig", "DiagnosticsConfig", "EvalAttack", "EvalConfig",
    "FinetuneConfig", "ModelConfig", "ReferenceConfig", "StrongViewConfig", "StrongViewSection", "SyntheticConfig",
    "TrainConfig", "ViewsConfig", "WeakViewConfig", "WeakViewSection", "apply_override", "apply_overrides", "build",
    "check", "config_fields", "convert", "dump_yaml", "first_difference", "from_mapping", "list_presets",
    "list_schedules", "load_config", "merge", "parse_float", "parse_yaml", "plain", "preset_chain",
    "reference_switches", "schedule_overrides",
]
