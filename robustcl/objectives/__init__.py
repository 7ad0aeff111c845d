"""Loss terms, attacks and optimiser pieces shared by every method."""
from robustcl.objectives.attacks import fgsm_rs, frozen_parameters, pgd
from robustcl.objectives.critic import critic_loss, divergence_attack_term
from robustcl.objectives.infonce import gather_with_grad, info_nce
from robustcl.objectives.sam import SAM

__all__ = [
    "SAM",
    "critic_loss",
    "divergence_attack_term",
    "fgsm_rs",
    "frozen_parameters",
    "gather_with_grad",
    "info_nce",
    "pgd",
]
