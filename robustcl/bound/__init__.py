"""The generalisation bound's terms (arXiv 2311.09671) measured for a run: `robustcl bound`.

The names below are imported on first use, so `import robustcl.bound` needs no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"BoundSettings": "measure", "ball_sharpness": "sharpness", "critic_bound": "estimates",
          "critic_bounds": "estimates", "measure_run": "measure", "mmd2_unbiased": "estimates",
          "spearman": "estimates"}

__all__ = ["BoundSettings", "ball_sharpness", "critic_bound", "critic_bounds", "measure_run", "mmd2_unbiased",
           "spearman"]


def __getattr__(name: str) -> Any:
    """`robustcl.bound.<name>` from its module, imported on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"robustcl.bound.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'robustcl.bound' has no attribute {name!r}")
