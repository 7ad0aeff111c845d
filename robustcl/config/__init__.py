"""Typed run configuration: YAML presets shipped in the package, `key=value` overrides, validation.

Parts: `engine` (YAML values to typed dataclasses, overrides, the resume diff, the one numeric-range
check), `schema` (one dataclass per config section), `presets` (the shipped presets, `extends`,
`load_config`), `registry` (the methods by name, whose config sections the schema builds;
`robustcl.methods` fills it), `inputs` (the bounded reader of users' files and YAML) and `errors`
(ConfigError). Every public name of engine, schema, presets and inputs is re-exported here, so
`from robustcl.config import X` is all callers need.
"""
from __future__ import annotations

from robustcl.config.engine import (CODE_ONLY, INT_RANGE, SEED, SEED_RANGE, ConfigError, IntRange, apply_override,
                                    apply_overrides, build, check, check_number, config_fields, convert, convert_field,
                                    dump_yaml, first_difference, merge, parse_float, parse_yaml, plain)
from robustcl.config.inputs import load_yaml, read_bounded
from robustcl.config.schema import (CHANGEABLE_ON_RESUME, LINF_RANGE, REFERENCE_SWITCHES_OFF, AffConfig, AttackConfig,
                                    Config, DataConfig, DiagnosticsConfig, EvalAttack, EvalConfig, FinetuneConfig,
                                    ModelConfig, PostprocessConfig, ReferenceConfig, StrongViewConfig,
                                    SyntheticConfig, TrainConfig, ViewsConfig, WeakViewConfig, from_mapping,
                                    reference_switches)
from robustcl.config.presets import (PRESET_PACKAGE, SCHEDULE_PACKAGE, described, first_comment, list_presets,
                                     list_schedules, load_config, preset_chain, schedule_overrides, shipped_yaml)

__all__ = [
    "CHANGEABLE_ON_RESUME", "CODE_ONLY", "INT_RANGE", "LINF_RANGE", "PRESET_PACKAGE", "REFERENCE_SWITCHES_OFF",
    "SCHEDULE_PACKAGE", "SEED", "SEED_RANGE", "AffConfig", "AttackConfig", "Config", "ConfigError", "DataConfig",
    "DiagnosticsConfig", "EvalAttack", "EvalConfig", "FinetuneConfig", "IntRange", "ModelConfig",
    "PostprocessConfig", "ReferenceConfig", "StrongViewConfig", "SyntheticConfig", "TrainConfig", "ViewsConfig",
    "WeakViewConfig", "apply_override", "apply_overrides", "build", "check", "check_number", "config_fields",
    "convert", "convert_field", "described", "dump_yaml", "first_comment", "first_difference", "from_mapping",
    "list_presets", "list_schedules", "load_config", "load_yaml", "merge", "parse_float", "parse_yaml", "plain",
    "preset_chain", "read_bounded", "reference_switches", "schedule_overrides", "shipped_yaml",
]
