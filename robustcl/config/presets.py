"""The presets shipped in the package (robustcl/presets/*.yaml, found by file name), `extends`, and
`load_config`: a preset name or a YAML path, overrides applied, built into a validated Config."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from robustcl.config.engine import ConfigError, apply_overrides, merge, parse_yaml
from robustcl.config.inputs import MAX_CONFIG_BYTES, read_bounded
from robustcl.config.schema import Config, from_mapping

PRESET_PACKAGE = "robustcl.presets"
SCHEDULE_PACKAGE = "robustcl.presets.schedules"
EXTENDS_DEPTH = 8  # a longer `extends` chain is taken for a cycle


def shipped_yaml(package: str, folder: str | None = None) -> dict[str, Any]:
    """name -> file of the YAML files shipped in `package` (or its `folder`), sorted by name: the one lister of
    presets, schedules and sweep specs."""
    root = resources.files(package)
    if folder is not None:
        root = root / folder
    if not root.is_dir():
        return {}
    return {e.name[:-5]: e for e in sorted(root.iterdir(), key=lambda p: p.name) if e.name.endswith(".yaml")}


def first_comment(text: str) -> str:
    """A shipped YAML file's first line, the comment saying what it is and where it comes from ("" if none)."""
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip() if first.startswith("#") else ""


def described(package: str, folder: str | None = None) -> dict[str, str]:
    """name -> first comment line of each YAML file shipped in `package` (or its `folder`)."""
    return {name: first_comment(entry.read_text()) for name, entry in shipped_yaml(package, folder).items()}


def list_presets() -> dict[str, str]:
    """Preset name -> first comment line (its description and source)."""
    return described(PRESET_PACKAGE)


def _read_file(path: Path) -> tuple[str, str]:
    """(text, origin) of a YAML config file, read by the bounded reader; ConfigError when it is missing, not a
    regular file, too large, binary or unreadable."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; give a preset name (robustcl configs) or a YAML path")
    try:
        return read_bounded(path, "config file", MAX_CONFIG_BYTES).decode("utf-8"), str(path)
    except (UnicodeDecodeError, OSError) as exc:
        why = "is not a text file (a checkpoint or another binary file?)" if isinstance(exc, UnicodeDecodeError) \
            else f"cannot be read ({exc.strerror or exc})"
        raise ConfigError(f"config file {path} {why}; give a YAML config or a preset name (robustcl configs)") \
            from None


def _read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    """(mapping, origin) of a YAML path or a shipped preset name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        text, origin = _read_file(path)
    else:
        entry = resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"
        if not entry.is_file():
            known = ", ".join(list_presets())
            raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {known}")
        text, origin = entry.read_text(), f"preset {name_or_path}"
    return parse_yaml(text, origin), origin


def list_schedules() -> dict[str, str]:
    """Phase-2 schedule preset name -> its first comment line (what it is and where it comes from)."""
    return described(SCHEDULE_PACKAGE)


def _flatten(node: dict[str, Any], prefix: str) -> list[str]:
    """A nested mapping as `dotted.key=value` overrides (values written as flow YAML)."""
    out = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def schedule_overrides(name: str) -> list[str]:
    """A schedule preset as `finetune.key=value` overrides, to apply on top of a run's config."""
    entry = resources.files(SCHEDULE_PACKAGE) / f"{name}.yaml"
    if not entry.is_file():
        raise ConfigError(f"unknown schedule {name!r}; known schedules: {', '.join(list_schedules())}")
    return _flatten(yaml.safe_load(entry.read_text()) or {}, "")


def preset_chain(name_or_path: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, raw mapping as written) of a config and of every config it `extends`, nearest first: which
    sections each file of the chain writes itself (tests derive the presets sharing a parent's settings)."""
    chain: list[tuple[str, dict[str, Any]]] = []
    current: str | None = name_or_path
    while current is not None:
        if len(chain) > EXTENDS_DEPTH:
            raise ConfigError(f"config {name_or_path}: 'extends' chain is too deep (a cycle?)")
        data, _ = _read_yaml(current)
        chain.append((current, data))
        parent = data.get("extends")
        current = None if parent is None else str(parent)
    return chain


def _resolve_extends(name_or_path: str, depth: int = 0) -> dict[str, Any]:
    """The raw mapping of a config with its `extends` chain merged in (another method replaces the parent's)."""
    if depth > EXTENDS_DEPTH:
        raise ConfigError(f"config {name_or_path}: 'extends' chain is too deep (a cycle?)")
    data, _ = _read_yaml(name_or_path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _resolve_extends(str(parent), depth + 1)
    child_method = data.get("method") or {}
    if "name" in child_method and child_method["name"] != (base.get("method") or {}).get("name"):
        base.pop("method", None)  # another method: its section replaces the parent's, not merges
    return merge(base, data)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply `key=value` overrides, validate."""
    data = _resolve_extends(name_or_path)
    apply_overrides(data, overrides)
    return from_mapping(data)
