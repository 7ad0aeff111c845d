"""Phase-1 methods, one file each, selected by `method.name` in a config."""
from __future__ import annotations

from robustcl.config import ConfigError
from robustcl.methods.acl import Acl
from robustcl.methods.advcl import Advcl
from robustcl.methods.base import Method, MethodConfig, SamConfig, StepContext
from robustcl.methods.clae import Clae
from robustcl.methods.gbrcl import Gbrcl
from robustcl.methods.rocl import Rocl
from robustcl.methods.simclr import Simclr

METHODS: dict[str, type[Method]] = {m.name: m for m in (Gbrcl, Simclr, Acl, Rocl, Clae, Advcl)}


def method_class(name: str) -> type[Method]:
    """The Method subclass registered under `name` (one-line error listing the known ones)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method.name {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of method `name`."""
    return method_class(name).config_class


__all__ = ["METHODS", "Method", "MethodConfig", "SamConfig", "StepContext", "method_class", "method_config_class"]
