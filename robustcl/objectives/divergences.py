"""f-divergence lower bounds from a critic's logits: the variational (f-GAN) form of Nowozin et al. 2016.

For a convex f with f(1) = 0, D_f(P || Q) = E_Q[f(p/q)] >= sup_T E_P[T] - E_Q[f*(T)], with equality
at T*(x) = f'(p(x)/q(x)). The critic outputs a logit v; the output activation g_f maps it into the
domain of the conjugate f*, T = g_f(v). Here P is the benign and Q the adversarial feature
distribution, so a large logit means "benign" for every divergence.

JS is the standard Jensen-Shannon divergence (at most log 2), i.e. half of the f-GAN paper's
"Jensen-Shannon" row: f(u) = 1/2 [u log u - (u+1) log((u+1)/2)], g_f(v) = 1/2 (log 2 - softplus(-v)),
f*(t) = -1/2 log(2 - exp(2t)). With D = sigmoid(v) its bound is exactly
    log 2 - L_D,   L_D = 1/2 [BCE(D(z_b), 1) + BCE(D(z_a), 0)]  (docs/algorithm.md section 2),
so "critic maximises the JS bound" is the BCE critic step and the encoder's term -L_D is the JS
bound minus the constant log 2. KL, reverse KL, Pearson chi^2 and squared Hellinger
(f(u) = (sqrt(u) - 1)^2, no 1/2) use the f-GAN paper's rows as they are.

The attacker's term is the part of the bound that depends on the adversarial features,
-E_Q[f*(T)], scaled by `attack_scale` (2 for JS, 1 otherwise): docs/algorithm.md section 2 writes the
attack term as log(1 - D(z_a)) = -BCE(D(z_a), 0), the unhalved adversarial half of L_D; the JS attack term is
therefore log 2 + log(1 - D(z_a)), that term plus a constant (the same PGD steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F

Divergence = Literal["js", "kl", "reverse_kl", "pearson", "hellinger"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
Fn = Callable[[torch.Tensor], torch.Tensor]
LOG2 = math.log(2.0)


@dataclass(frozen=True)
class FDivergence:
    """One row of the f-GAN table, plus the pieces the tests and the critic's accuracy need."""
    f: Fn                        # generator f(u), u = p/q > 0
    f_prime: Fn                  # f'(u): the optimal critic output T*(x) = f'(p(x)/q(x))
    activation: Fn               # g_f: logit v -> T in dom f*
    conjugate: Fn                # f*(t)
    conjugate_of_activation: Fn  # f*(g_f(v)) in a numerically stable closed form
    optimal_logit: Fn            # g_f^{-1}(f'(u)) as a function of log u (the optimal critic's logit)
    threshold: float             # logit with T = f'(1): the critic's "cannot tell" point
    attack_scale: float = 1.0    # factor on -E_Q[f*(T)] in the attacker's term (see module docstring)


TABLE: dict[str, FDivergence] = {
    "js": FDivergence(
        f=lambda u: 0.5 * (u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2)),
        f_prime=lambda u: 0.5 * torch.log(2 * u / (1 + u)),
        activation=lambda v: 0.5 * (LOG2 - F.softplus(-v)),
        conjugate=lambda t: -0.5 * torch.log(2 - torch.exp(2 * t)),
        conjugate_of_activation=lambda v: 0.5 * (F.softplus(v) - LOG2),
        optimal_logit=lambda log_u: log_u,
        threshold=0.0, attack_scale=2.0),
    "kl": FDivergence(
        f=lambda u: u * torch.log(u),
        f_prime=lambda u: 1 + torch.log(u),
        activation=lambda v: v,
        conjugate=lambda t: torch.exp(t - 1),
        conjugate_of_activation=lambda v: torch.exp(v - 1),
        optimal_logit=lambda log_u: 1 + log_u,
        threshold=1.0),
    "reverse_kl": FDivergence(
        f=lambda u: -torch.log(u),
        f_prime=lambda u: -1 / u,
        activation=lambda v: -torch.exp(-v),
        conjugate=lambda t: -1 - torch.log(-t),
        conjugate_of_activation=lambda v: v - 1,
        optimal_logit=lambda log_u: log_u,
        threshold=0.0),
    "pearson": FDivergence(
        f=lambda u: (u - 1) ** 2,
        f_prime=lambda u: 2 * (u - 1),
        activation=lambda v: v,
        conjugate=lambda t: t ** 2 / 4 + t,
        conjugate_of_activation=lambda v: v ** 2 / 4 + v,
        optimal_logit=lambda log_u: 2 * torch.expm1(log_u),
        threshold=0.0),
    "hellinger": FDivergence(
        f=lambda u: (torch.sqrt(u) - 1) ** 2,
        f_prime=lambda u: 1 - 1 / torch.sqrt(u),
        activation=lambda v: -torch.expm1(-v),
        conjugate=lambda t: t / (1 - t),
        conjugate_of_activation=lambda v: torch.expm1(v),
        optimal_logit=lambda log_u: 0.5 * log_u,
        threshold=0.0),
}


def divergence(name: str) -> FDivergence:
    """The table row of `name` (ValueError listing the known ones)."""
    if name not in TABLE:
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(TABLE)}")
    return TABLE[name]


def f_divergence_bound(name: str, t_benign_logits: torch.Tensor, t_adv_logits: torch.Tensor) -> torch.Tensor:
    """E_P[g_f(v_b)] - E_Q[f*(g_f(v_a))]: the variational lower bound on D_f(benign || adversarial), fp32."""
    row = divergence(name)
    return row.activation(t_benign_logits.float()).mean() - row.conjugate_of_activation(t_adv_logits.float()).mean()


def f_divergence_attack_term(name: str, t_adv_logits: torch.Tensor) -> torch.Tensor:
    """-attack_scale * E_Q[f*(g_f(v_a))]: what the attacker adds (times lambda_D) to look adversarial to D."""
    row = divergence(name)
    return -row.attack_scale * row.conjugate_of_activation(t_adv_logits.float()).mean()


def f_critic_accuracy(name: str, t_benign_logits: torch.Tensor, t_adv_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of features on the correct side of the divergence's threshold logit (benign above)."""
    thr = divergence(name).threshold
    correct = (t_benign_logits > thr).float().sum() + (t_adv_logits < thr).float().sum()
    return correct / (t_benign_logits.numel() + t_adv_logits.numel())


# ------------------------------------------------------------------ closed forms (tests, checks)
def gaussian_divergence(name: str, mu_p: float, sd_p: float, mu_q: float, sd_q: float) -> float:
    """D_f(N(mu_p, sd_p^2) || N(mu_q, sd_q^2)) in closed form (JS by quadrature: it has none)."""
    d2 = (mu_p - mu_q) ** 2
    if name == "kl":
        return math.log(sd_q / sd_p) + (sd_p ** 2 + d2) / (2 * sd_q ** 2) - 0.5
    if name == "reverse_kl":
        return gaussian_divergence("kl", mu_q, sd_q, mu_p, sd_p)
    if name == "pearson":  # finite only when 2 sd_q^2 > sd_p^2
        s = 2 * sd_q ** 2 - sd_p ** 2
        if s <= 0:
            return math.inf
        return sd_q ** 2 / (sd_p * math.sqrt(s)) * math.exp(d2 / s) - 1
    if name == "hellinger":
        var = sd_p ** 2 + sd_q ** 2
        return 2 - 2 * math.sqrt(2 * sd_p * sd_q / var) * math.exp(-d2 / (4 * var))
    if name == "js":
        lo = min(mu_p - 12 * sd_p, mu_q - 12 * sd_q)
        hi = max(mu_p + 12 * sd_p, mu_q + 12 * sd_q)
        x = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
        log_p, log_q = gaussian_log_pdf(x, mu_p, sd_p), gaussian_log_pdf(x, mu_q, sd_q)
        log_m = torch.logaddexp(log_p, log_q) - LOG2
        integrand = 0.5 * (log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m))
        return torch.trapezoid(integrand, x).item()
    raise ValueError(f"unknown divergence {name!r}; known: {', '.join(TABLE)}")


def gaussian_log_pdf(x: torch.Tensor, mu: float, sd: float) -> torch.Tensor:
    """log N(x; mu, sd^2)."""
    return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)
