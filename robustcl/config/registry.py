"""The registry of phase-1 methods by name, at the bottom of the package so that the config can read it.

Modelled on timm's `models/_registry.py`: a module-level dict filled as a side effect of defining a
class. `robustcl.methods.method.Method.__init_subclass__` calls `register_method` for every subclass
that sets `name`; `robustcl.config.schema.from_mapping` reads a method section's dataclass from it
(`method_config_class`). The config package never imports the methods: every entry point that builds
a config imports `robustcl.methods` first (the CLI, `robustcl.api.load_config`, the sweep, bench,
bound, the tests' conftest), which registers them all; reading an empty registry is a clear error.
"""
from __future__ import annotations

from typing import Any

from robustcl.config.engine import ConfigError

METHODS: dict[str, Any] = {}  # method name -> its Method subclass (which holds `config_class`)


def register_method(name: str, cls: type) -> None:
    """Register `cls` under `name`; the same class again (a module reloaded) replaces itself, another is refused."""
    known = METHODS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"method name {name!r} of {cls.__module__}.{cls.__qualname__} is already taken by "
                        f"{known.__module__}.{known.__qualname__}; choose another `name`")
    METHODS[name] = cls


def registered_method(name: str) -> Any:
    """The class registered under `name` (one-line ConfigError listing the known ones).

    An empty registry means that `robustcl.methods` was never imported: a RuntimeError saying so.
    """
    if not METHODS:
        raise RuntimeError("no method is registered: import robustcl.methods before building a config (every "
                           "robustcl entry point does; a script calling robustcl.config directly must too)")
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config_class(name: str) -> type:
    """The config dataclass of the method registered under `name` (its `config_class`)."""
    return registered_method(name).config_class


__all__ = ["METHODS", "method_config_class", "register_method", "registered_method"]
