"""Robustness evaluation of a run's fitted models: clean and attacked accuracy through a stated BN branch,
AutoAttack, the integrity checks, per-image records (`run_eval.evaluate_run` puts them together)."""
from robustcl.evaluation.robust import accuracy, ce_objective, pgd_accuracy, robustness_curve

__all__ = ["accuracy", "ce_objective", "pgd_accuracy", "robustness_curve"]
