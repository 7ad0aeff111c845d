"""Phase-1 methods, one file each, selected by `method.name` in a config.

Every module of this package is imported here (`pkgutil.iter_modules`), and every `Method` subclass
that sets `name` registers itself in `METHODS` (`Method.__init_subclass__`, `robustcl.config.registry`):
a new method is one new file in this folder and nothing else to edit. Importing this package is what
makes the methods known to the config: every entry point that builds a config imports it first.
"""
from __future__ import annotations

import importlib
import pkgutil

from robustcl.config.registry import METHODS, method_config_class
from robustcl.methods.method import Method, MethodConfig, SetupEnv, method_class
from robustcl.methods.sections import SamConfig
from robustcl.methods.step import StepContext


def _import_all() -> None:
    """Import every module of robustcl.methods (each registers the methods it defines)."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


__all__ = ["METHODS", "Method", "MethodConfig", "SamConfig", "SetupEnv", "StepContext", "method_class",
           "method_config_class"]
