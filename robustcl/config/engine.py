"""The config engine: YAML values converted to typed dataclasses, `key=value` overrides, the resume diff.

It knows no section of robustcl's config (those are `robustcl.config.schema`): `build(cls, mapping)`
converts a parsed YAML mapping into any dataclass, following its type hints, and fails with a
one-line `ConfigError` naming the offending key (unknown key, wrong type, impossible value).
Every number passes one range check, `check_number`: a float must be finite, an integer must lie in
its field's declared `IntRange` (metadata BOUNDS; SEED for seeds) or else in INT_RANGE.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from fractions import Fraction
from typing import Any, Callable, Literal

import yaml

from robustcl.config.errors import ConfigError
from robustcl.config.inputs import load_yaml

CODE_ONLY: dict[str, bool] = {"config": False}  # field metadata: settable in code, not a config key


@dataclasses.dataclass(frozen=True)
class IntRange:
    """The integers a config key takes (inclusive), and why those."""
    lo: int
    hi: int
    why: str = ""


# Any integer key: every count robustcl takes is far below; beyond 2**53 a float (JSON, a learning-rate
# schedule) no longer holds the integer exactly.
INT_RANGE = IntRange(-(2 ** 53), 2 ** 53)
# A seed: numpy's SeedSequence and default_rng take no negative seed, torch's manual_seed nothing past 2**64 - 1,
# and robustcl derives seeds as seed * 1_000_003 + step (diagnostics), seed * 100_003 + epoch (views) and seed +
# offsets: [0, 2**32 - 1] (numpy's classic seed range) keeps every derived seed below 2**63.
SEED_RANGE = IntRange(0, 2 ** 32 - 1, "a seed numpy and torch both take, with room for robustcl's derived seeds")
BOUNDS = "bounds"  # field metadata key: the IntRange of an integer field (or of each integer of a tuple field)
SEED: dict[str, Any] = {BOUNDS: SEED_RANGE}  # field metadata of a seed


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """A ConfigError `config value key=value why` unless `ok`."""
    if not ok:
        raise ConfigError(f"config value {key}={value!r} {why}")


def config_fields(cls: Any) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` (or instance) that are config keys (not marked CODE_ONLY)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("config", True)]


def plain(obj: Any) -> Any:
    """A config value as plain YAML/JSON data: dataclasses as mappings of their config keys, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in config_fields(obj)}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def shown(value: Any) -> str:
    """A value as an error message shows it: repr, with long integers and strings shortened."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 20:
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[:10]}... ({len(digits)} digits)"
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:40]!r}... ({len(value)} characters)"
    return repr(value)


def check_number(number: float | int, key: str, raw: Any = None, bounds: IntRange | None = None) -> Any:
    """The one numeric-range check of every config number: a float must be finite (no key takes inf or nan),
    an integer must lie in `bounds` (its field's, else INT_RANGE). `raw` is the value as written, for the message."""
    raw = number if raw is None else raw
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ConfigError(f"config value {key}={shown(raw)} must be a finite number (inf, nan and values "
                              "beyond ±1.8e308 are refused); give a finite value")
        return number
    bounds = bounds or INT_RANGE
    if not bounds.lo <= number <= bounds.hi:
        why = f" ({bounds.why})" if bounds.why else ""
        raise ConfigError(f"config value {key}={shown(raw)} must be an integer in [{bounds.lo}, {bounds.hi}]{why}")
    return number


def parse_float(value: Any, key: str) -> float:
    """Accept numbers and fraction strings such as '8/255'; finite ones only."""
    if isinstance(value, bool):
        raise ConfigError(f"config key {key} must be a number, got {value!r}")
    number = None
    if isinstance(value, (int, float)):
        number = _to_float(lambda: float(value))
    elif isinstance(value, str):
        text = value.replace(" ", "")
        try:  # float() for decimals: Fraction("1e999999999") would build a billion-digit integer first
            number = _to_float(lambda: float(Fraction(text)) if "/" in text else float(text))
        except (ValueError, ZeroDivisionError):
            pass
    if number is None:
        raise ConfigError(f"config key {key} must be a number (or a fraction like 8/255), got {shown(value)}")
    return check_number(number, key, value)


def _to_float(make: Callable[[], float]) -> float:
    """make(), or inf where the number is beyond a float's range (1e400, 10**400)."""
    try:
        return make()
    except OverflowError:
        return math.inf


def _convert_union(args: tuple[Any, ...], value: Any, key: str, bounds: IntRange | None) -> Any:
    """An `X | Y | None` value: None when allowed, else the first member type that accepts it."""
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        return convert(inner[0], value, key, bounds)
    for option in inner:  # e.g. `int | Literal["auto"]`: the first type that accepts the value
        try:
            return convert(option, value, key, bounds)
        except ConfigError:
            pass
    names = [" or ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal else a.__name__
             for a in inner]
    raise ConfigError(f"config key {key} must be {' or '.join(names)}{' or null' if type(None) in args else ''}; "
                      f"got {value!r}")


def _convert_literal(args: tuple[Any, ...], value: Any, key: str) -> Any:
    """One of a Literal's values (YAML 1.1's bare off/on booleans read back as the strings)."""
    if isinstance(value, bool) and ("off" in args or "on" in args):
        value = "on" if value else "off"
    if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
        raise ConfigError(f"config key {key} must be one of {', '.join(map(str, args))}; got {value!r}")
    return value


def _convert_tuple(args: tuple[Any, ...], value: Any, key: str, bounds: IntRange | None) -> tuple[Any, ...]:
    """A YAML list as `tuple[X, ...]` (any length) or `tuple[X, Y]` (that many values)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key {key} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(args[0], v, f"{key}[{i}]", bounds) for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"config key {key} must be a list of {len(args)} values, got {value!r}")
    return tuple(convert(a, v, f"{key}[{i}]", bounds) for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, key: str, bounds: IntRange | None = None) -> Any:
    """A float (fractions allowed, finite), bool, int (in `bounds`), str or Any value, type-checked."""
    if tp is float:
        return parse_float(value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key} must be an integer, got {shown(value)}")
        return check_number(value, key, bounds=bounds)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def convert(tp: Any, value: Any, key: str, bounds: IntRange | None = None) -> Any:
    """A parsed YAML value converted to type hint `tp` (unions, Literal, dict, tuple, dataclass, scalars); its
    integers checked against `bounds` (default INT_RANGE), its floats finite."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(args, value, key, bounds)
    if origin is Literal:
        return _convert_literal(args, value, key)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key {key} must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is tuple:
        return _convert_tuple(args, value, key, bounds)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    return _convert_scalar(tp, value, key, bounds)


def convert_field(cls: type, name: str, value: Any, key: str) -> Any:
    """`value` converted for field `name` of dataclass `cls`, with the field's declared bounds; `key` names it in
    errors. What `build` does for each key, and what a value that enters elsewhere (`sweep --seeds`) goes through."""
    field = next(f for f in config_fields(cls) if f.name == name)
    return convert(typing.get_type_hints(cls)[name], value, key, field.metadata.get(BOUNDS))


def _validator(obj: Any) -> Callable[[], None] | None:
    """obj.validate when it takes no arguments; one that needs its key (AttackConfig's) is its parent's to call."""
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return None
    needed = [p for p in inspect.signature(validate).parameters.values()
              if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return None if needed else validate


def build(cls: type, mapping: Any, prefix: str = "") -> Any:
    """Convert a mapping into dataclass `cls`, rejecting unknown keys with a suggestion, then validate it."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section {prefix or '<root>'} must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in config_fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key {full}{hint}")
        kwargs[key] = convert(hints[key], value, full, fields[key].metadata.get(BOUNDS))
    obj = cls(**kwargs)
    validate = _validator(obj)
    if validate is not None:
        validate()
    return obj


# ------------------------------------------------------------------------------------------- YAML
def parse_yaml(text: str, origin: str) -> dict[str, Any]:
    """A YAML document that must be a mapping (empty: {}), read by the bounded loader (`inputs.load_yaml`);
    ConfigError naming `origin` otherwise."""
    try:
        data = load_yaml(text, origin) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a YAML mapping at the top level")
    return data


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what a run directory stores in config.yaml)."""
    return yaml.safe_dump(plain(cfg), sort_keys=False)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, mappings recursively (what `extends` does)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# -------------------------------------------------------------------------------------- overrides
def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a raw mapping."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=0.1")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw, f"the value of override {key.strip()}")
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or a section stored as null (e.g. `reference: null`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply `key=value` overrides in order to a raw mapping; a method.name override to another method
    drops the old method's settings first."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "method.name" and value.strip() != str((data.get("method") or {}).get("name")):
            data["method"] = {}  # another method: the preset's method settings do not apply to it
    for item in overrides:
        apply_override(data, item)


# ------------------------------------------------------------------------------------------- diff
def first_difference(a: Any, b: Any, prefix: str = "", ignore: tuple[str, ...] = ()) -> str | None:
    """The first dotted key where two plain mappings differ, as 'key: old -> new' (None when equal).

    Keys equal to or under an entry of `ignore` (e.g. 'train.device', 'eval') are skipped.
    """
    if prefix and any(prefix == k or prefix.startswith(k + ".") for k in ignore):
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key), ignore)
            if found:
                return found
        return None
    return None if a == b else f"{prefix}: {a!r} -> {b!r}"
