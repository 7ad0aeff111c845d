"""A sweep spec: its YAML schema, validation, the shipped specs, and its configurations (explicit runs, then the grid).

A spec (YAML: shipped in robustcl/presets/sweeps/, or a path) names runs explicitly and/or as a grid
(a base config x the product of override axes); configurations() lists them with their directory-safe names.
"""
from __future__ import annotations

import itertools
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from robustcl.config import (SEED, ConfigError, build, convert_field, described, first_comment, inputs, load_yaml,
                             shipped_yaml)

SWEEP_PACKAGE = "robustcl.presets"
SWEEP_FOLDER = "sweeps"
MAX_RUNS = 10_000  # runs (configurations x seeds) in one sweep: each trains a model; a grid is counted before expanded
NAME_RE = re.compile(r"^[A-Za-z0-9_+=][A-Za-z0-9._=+,-]*$")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._=+,-]")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_overrides(items: Sequence[str], where: str) -> None:
    """Overrides must be key=value and may not set the seed (the spec's `seeds` does); `where` starts the error."""
    for item in items:
        _check("=" in item, f"{where}: override {item!r} must look like key=value, e.g. train.max_steps=50")
        _check(item.split("=", 1)[0].strip() != "seed",
               f"{where}: override {item!r} sets the seed; list seeds in the spec's `seeds` instead")


@dataclass
class RunEntry:
    """One explicit run of a spec: a configuration name, a preset or YAML path, overrides."""
    name: str = ""
    config: str = ""
    overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(bool(self.name), f"sweep runs entry (config {self.config!r}) needs a name")
        _check(bool(NAME_RE.match(self.name)),
               f"sweep run name {self.name!r} must be letters, digits and . _ = + , - (no / or leading . or -)")
        _check(bool(self.config), f"sweep run {self.name} needs config: <preset name or YAML path>")
        check_overrides(self.overrides, f"sweep run {self.name}")


@dataclass
class GridSpec:
    """A base config crossed with the product of override axes ({dotted.key: [values]})."""
    base: str = ""
    axes: Any = None
    overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        _check(bool(self.base), "sweep grid needs base: <preset name or YAML path>")
        _check(isinstance(self.axes, dict) and len(self.axes) > 0,
               f"sweep grid.axes must be a non-empty mapping {{dotted.key: [values]}}, got {self.axes!r}")
        for key, values in self.axes.items():
            _check(isinstance(key, str) and bool(key) and "=" not in key, f"sweep grid.axes key {key!r} is not a dotted config key")
            _check(key != "seed", "sweep grid.axes.seed: list seeds in the spec's `seeds` instead")
            _check(isinstance(values, list) and len(values) > 0,
                   f"sweep grid.axes.{key} must be a non-empty list of values, got {values!r}")
        check_overrides(self.overrides, "sweep grid")


@dataclass
class SweepSpec:
    """The YAML schema of a sweep spec."""
    name: str = ""
    seeds: tuple[int, ...] = field(default=(0,), metadata=SEED)  # each in config.SEED_RANGE, as a run's seed
    overrides: tuple[str, ...] = ()
    runs: tuple[RunEntry, ...] = ()
    grid: GridSpec | None = None
    baseline: str = ""   # a configuration name: the summary adds every other one's paired difference to it
    comparisons: tuple[str, ...] = ()  # "A vs B" pairs: the summary adds A's paired difference to B, for each

    def validate(self) -> None:
        _check(bool(NAME_RE.match(self.name)), f"sweep name {self.name!r} must be letters, digits and . _ = + , -")
        _check(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
               f"sweep seeds {list(self.seeds)!r} must be a non-empty list of distinct integers")
        _check(bool(self.runs) or self.grid is not None, "sweep spec needs `runs`, `grid` or both")
        check_overrides(self.overrides, "sweep overrides")


def seed_list(seeds: Sequence[Any]) -> tuple[int, ...]:
    """Seeds given outside the spec (`--seeds`, api's seeds=) as the spec's seeds: through the config's one range
    check (config.convert_field), as the spec's own `seeds` are."""
    def as_int(seed: Any) -> Any:
        try:
            return int(seed) if isinstance(seed, str) else operator.index(seed)  # numpy integers too
        except (TypeError, ValueError):
            return seed  # convert_field names it
    return convert_field(SweepSpec, "seeds", [as_int(s) for s in seeds], "--seeds")


@dataclass
class Sweep:
    """A loaded spec with where it came from (relative config paths resolve against `folder`)."""
    spec: SweepSpec
    origin: str
    description: str
    folder: Path | None


def list_sweeps() -> dict[str, str]:
    """Shipped sweep spec name -> first comment line (what it answers and its source)."""
    return described(SWEEP_PACKAGE, SWEEP_FOLDER)


def _read_spec_text(name_or_path: str) -> tuple[str, str, Path | None]:
    """(text, origin, folder) of a shipped spec name or a YAML path (read by the bounded reader)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        _check(path.exists(),
               f"sweep spec file {path} does not exist; give a shipped spec name (robustcl configs) or a YAML path")
        try:
            text = inputs.read_bounded(path, "sweep spec file", inputs.MAX_CONFIG_BYTES).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"sweep spec file {path} is not a text file; give a YAML sweep spec") from None
        return text, str(path), path.resolve().parent
    entries = shipped_yaml(SWEEP_PACKAGE, SWEEP_FOLDER)
    _check(name_or_path in entries, f"unknown sweep spec {name_or_path!r}; shipped specs: {', '.join(entries)}")
    return entries[name_or_path].read_text(), f"sweep spec {name_or_path}", None


def load_spec(name_or_path: str) -> Sweep:
    """Parse and validate a sweep spec; errors are one line naming the bad key."""
    text, origin, folder = _read_spec_text(name_or_path)
    try:
        data = load_yaml(text, origin) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        spec = build(SweepSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return Sweep(spec, origin, first_comment(text), folder)


# ---------------------------------------------------------------------------------------- naming
def safe_name(text: str) -> str:
    """A directory-safe run name: anything outside [A-Za-z0-9._=+,-] becomes '_', no leading '.' or '-'."""
    name = UNSAFE_CHARS.sub("_", text)
    return "_" + name[1:] if name[:1] in (".", "-") else name


def _label_value(value: Any) -> str:
    """An axis value as it reads in a run name (0.3, true, slf+alf)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "+".join(_label_value(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _axis_labels(keys: Sequence[str]) -> dict[str, str]:
    """Short axis names (last two dotted parts, e.g. critic.weight); full keys where short ones clash."""
    short = {k: ".".join(k.split(".")[-2:]) for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in clashes else s) for k, s in short.items()}


def grid_runs(grid: GridSpec) -> list[RunEntry]:
    """The grid's runs: base x product of axes (first axis slowest), named from the axis values."""
    keys = list(grid.axes)
    labels = _axis_labels(keys)
    out = []
    for values in itertools.product(*(grid.axes[k] for k in keys)):
        name = safe_name(",".join(f"{labels[k]}={_label_value(v)}" for k, v in zip(keys, values)))
        axis_overrides = tuple(f"{k}={json.dumps(v)}" for k, v in zip(keys, values))
        out.append(RunEntry(name, grid.base, tuple(grid.overrides) + axis_overrides))
    return out


def check_size(sweep: Sweep) -> None:
    """At most MAX_RUNS runs (configurations x seeds), counted before the grid is expanded."""
    spec = sweep.spec
    count = len(spec.runs) + (math.prod(len(v) for v in spec.grid.axes.values()) if spec.grid else 0)
    runs = count * len(spec.seeds)
    _check(runs <= MAX_RUNS, f"{sweep.origin}: {runs} runs ({count} configurations x {len(spec.seeds)} seeds) are "
                             f"more than {MAX_RUNS}; split the sweep, or give its grid fewer values or fewer seeds")


def configurations(sweep: Sweep) -> list[RunEntry]:
    """Every configuration of the spec in order: explicit runs, then the grid; names must be unique."""
    check_size(sweep)
    entries = list(sweep.spec.runs) + (grid_runs(sweep.spec.grid) if sweep.spec.grid else [])
    seen: set[str] = set()
    for entry in entries:
        _check(entry.name not in seen, f"{sweep.origin}: two runs are named {entry.name!r}; names must be unique")
        seen.add(entry.name)
    baseline = sweep.spec.baseline
    _check(not baseline or baseline in seen,
           f"{sweep.origin}: baseline {baseline!r} is not one of the configurations ({', '.join(e.name for e in entries)})")
    for pair in comparisons(sweep.spec):
        for name in pair:
            _check(name in seen, f"{sweep.origin}: comparison {' vs '.join(pair)!r} names {name!r}, which is not one of "
                                 f"the configurations ({', '.join(e.name for e in entries)})")
    return entries


def comparisons(spec: SweepSpec) -> list[tuple[str, str]]:
    """The spec's `comparisons` as (configuration, baseline) pairs; "A vs B" reads A minus B."""
    pairs = []
    for item in spec.comparisons:
        parts = [p.strip() for p in item.split(" vs ")]
        _check(len(parts) == 2 and all(parts), f"sweep comparison {item!r} must read 'A vs B' (two configuration names)")
        pairs.append((parts[0], parts[1]))
    return pairs
