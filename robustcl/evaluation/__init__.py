"""Robustness evaluation: clean and PGD accuracy through a stated BN branch."""
from robustcl.evaluation.robust import accuracy, ce_objective, pgd_accuracy, robustness_curve

__all__ = ["accuracy", "ce_objective", "pgd_accuracy", "robustness_curve"]
