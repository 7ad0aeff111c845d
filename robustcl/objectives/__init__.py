"""Loss terms, attacks and optimiser pieces shared by every method."""
from robustcl.objectives.attacks import fgsm_rs, frozen_parameters, pgd, pgd_l2
from robustcl.objectives.critic import critic_loss, divergence_attack_term
from robustcl.objectives.divergences import DIVERGENCES, Divergence, f_divergence_attack_term, f_divergence_bound
from robustcl.objectives.infonce import info_nce, multi_positive_nce
from robustcl.objectives.sam import SAM

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "SAM",
    "critic_loss",
    "divergence_attack_term",
    "f_divergence_attack_term",
    "f_divergence_bound",
    "fgsm_rs",
    "frozen_parameters",
    "info_nce",
    "multi_positive_nce",
    "pgd",
    "pgd_l2",
]
