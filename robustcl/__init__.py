"""robustcl: adversarially robust contrastive learning (arXiv 2311.09671) in one framework.

The public API (robustcl/api.py) is imported on first use, so `import robustcl` needs no torch:
`robustcl.pretrain`, `finetune`, `evaluate`, `run`, `transfer`, `sweep`, `bench`, `bound`, `demo`, ... (API
below). Five of them share their name with a submodule (robustcl.sweep, .bench, .bound, .demo, .transfer):
that submodule is callable and runs the API function, so `robustcl.sweep(...)`, `import robustcl.sweep`
and `from robustcl.sweep import plan_sweep` all work.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

API = ("pretrain", "finetune", "evaluate", "run", "transfer", "sweep", "sweep_plan", "sweep_summary", "bench", "bound",
       "bound_sweep", "evaluate_encoder", "export_torchvision", "demo", "load_encoder", "load_config")
CALLABLE_SUBMODULES = ("bench", "bound", "demo", "sweep", "transfer")  # API functions named like a submodule

__all__ = [*API, "__version__"]

class CallableModule(types.ModuleType):
    """A submodule that, called, runs the API function of its name: robustcl.sweep(...) is robustcl.api.sweep(...)."""

    def _api_function(self) -> Any:
        from robustcl import api

        return getattr(api, self.__name__.rpartition(".")[2])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api_function()(*args, **kwargs)

    @property
    def __signature__(self) -> Any:
        """The API function's signature, for help() and inspect.signature()."""
        import inspect

        return inspect.signature(self._api_function())


def _callable_submodule(name: str) -> property:
    """The attribute robustcl.<name>: the submodule (imported on first use), made callable."""

    def get(package: types.ModuleType) -> types.ModuleType:
        module = package.__dict__.get(name) or importlib.import_module(f"{__name__}.{name}")
        if type(module) is types.ModuleType:
            module.__class__ = CallableModule
        return module

    def put(package: types.ModuleType, module: types.ModuleType) -> None:  # the import system sets it here
        package.__dict__[name] = module

    return property(get, put)


class _Package(types.ModuleType):
    """robustcl's own module type: it holds the callable-submodule attributes."""


for _name in CALLABLE_SUBMODULES:
    setattr(_Package, _name, _callable_submodule(_name))
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """The other API functions, imported on first use (robustcl.api imports nothing heavy itself)."""
    if name in API:
        return getattr(importlib.import_module("robustcl.api"), name)
    raise AttributeError(f"module 'robustcl' has no attribute {name!r}")
