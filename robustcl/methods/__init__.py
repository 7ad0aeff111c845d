"""Phase-1 methods, one file each, selected by `method.name` in a config.

Every module of this package is imported here (`pkgutil.iter_modules`), and every `Method` subclass
that sets `name` registers itself in `METHODS` (`Method.__init_subclass__`): a new method is one new
file in this folder and nothing else to edit.
"""
from __future__ import annotations

import importlib
import pkgutil

from robustcl.config.registry import METHODS, registered_method
from robustcl.methods.base import Method, MethodConfig, SamConfig, SetupEnv, StepContext


def _import_all() -> None:
    """Import every module of robustcl.methods (each registers the methods it defines)."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


def method_class(name: str) -> type[Method]:
    """The Method subclass registered under `name` (one-line error listing the known ones)."""
    return registered_method(name)


def method_config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of method `name`."""
    return method_class(name).config_class


__all__ = ["METHODS", "Method", "MethodConfig", "SamConfig", "SetupEnv", "StepContext", "method_class",
           "method_config_class"]
