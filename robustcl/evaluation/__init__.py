"""Robustness evaluation: clean and PGD accuracy through a stated BN branch; `evaluate_encoder` for any encoder."""
from typing import Any

from robustcl.evaluation.robust import accuracy, ce_objective, pgd_accuracy, robustness_curve

__all__ = ["accuracy", "ce_objective", "evaluate_encoder", "pgd_accuracy", "robustness_curve"]


def __getattr__(name: str) -> Any:
    """`evaluate_encoder` imported on first use (it imports phase 2, which imports this package)."""
    if name == "evaluate_encoder":
        from robustcl.evaluation.external import evaluate_encoder

        return evaluate_encoder
    raise AttributeError(f"module 'robustcl.evaluation' has no attribute {name!r}")
