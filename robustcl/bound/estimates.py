"""Divergence between two feature samples: f-GAN lower bounds from a fresh critic, kernel MMD^2, rank correlation.

Critic bounds. For each divergence of `robustcl.objectives.divergences` a small critic (linear by
default, or one hidden ReLU layer; seeded) is trained by full-batch Adam to maximise that
divergence's variational bound E_P[g_f(v)] - E_Q[f*(g_f(v))] on 3/8 of the pairs (P = benign,
Q = adversarial); 1/8 picks the step to keep (early stopping on its bound), and the bound is
reported on the other, held-out half. A critic fixed before it sees the held-out half gives an
unbiased estimate of a lower bound on D_f(P || Q), so a large held-out value cannot come from
overfitting. Rows i of the two samples are paired (a view and its attacked version) and each pair
stays in one part.

MMD^2 is the unbiased U-statistic with a Gaussian kernel exp(-||x - y||^2 / (2 s^2)), s the median
pairwise distance of the pooled sample (median heuristic), with a permutation p-value. For paired
samples (a view and its attacked version) the cross term leaves out each pair's own k(x_i, y_i) and
each permutation swaps a random subset of pairs, the null's symmetry for paired data.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from robustcl.objectives.divergences import DIVERGENCES, f_critic_accuracy, f_divergence_bound


# ------------------------------------------------------------------------------ critic bounds
@dataclass(frozen=True)
class CriticSettings:
    """The fresh critic: hidden width (0 = linear), Adam steps and learning rate, weight decay, seed."""
    hidden: int = 0
    steps: int = 1000
    lr: float = 1e-2
    weight_decay: float = 1e-4
    check_every: int = 10
    seed: int = 0


@dataclass(frozen=True)
class CriticEstimate:
    """A divergence's bound on the held-out half (the estimate), on the training half, and the critic's accuracy."""
    name: str
    bound: float
    train_bound: float
    accuracy: float
    best_step: int
    n_train: int
    n_test: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready form (the name is the key it is stored under)."""
        return {"bound": finite_or_none(self.bound), "train_bound": finite_or_none(self.train_bound),
                "critic_accuracy": self.accuracy,
                "best_step": self.best_step, "n_train": self.n_train, "n_test": self.n_test}


LOGIT_BOUND = 10.0


class Critics(nn.Module):
    """k independent critics (one hidden ReLU layer of `hidden` units, or linear when 0) evaluated in one batch.

    Each has its own parameters (a slice of each tensor) and Adam is elementwise, so training them on the
    sum of their losses is training each on its own. Logits are softly bounded to +-LOGIT_BOUND: still a
    critic, so still a lower bound, and finite where the two samples are (nearly) separable and the
    unbounded divergences (KL, reverse KL, Pearson) are not estimable from samples anyway. Initialised
    like nn.Linear, U(+-1/sqrt(fan_in)), from a generator seeded by `seed` (the global RNG is untouched).
    """

    def __init__(self, k: int, dim: int, hidden: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 179_424_673)

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            return nn.Parameter((2 * torch.rand(*shape, generator=gen) - 1) / math.sqrt(fan_in))

        self.hidden = hidden
        width = hidden if hidden > 0 else 1
        self.w1 = uniform(k, dim, width, fan_in=dim)
        self.b1 = uniform(k, 1, width, fan_in=dim)
        if hidden > 0:
            self.w2 = uniform(k, hidden, 1, fan_in=hidden)
            self.b2 = uniform(k, 1, 1, fan_in=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (k, N) of every critic on the rows of x (N, dim)."""
        out = torch.matmul(x, self.w1) + self.b1          # (k, N, width)
        if self.hidden > 0:
            out = torch.matmul(out.relu(), self.w2) + self.b2
        return LOGIT_BOUND * torch.tanh(out.squeeze(-1) / LOGIT_BOUND)


def finite_or_none(value: float) -> float | None:
    """value, or None for inf/nan (bound.json stays standard JSON)."""
    return value if math.isfinite(value) else None


def pair_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (fit, stop, test) indices of n pairs: 3/8, 1/8 and 1/2 of them."""
    if n < 8:
        raise ValueError(f"a critic estimate needs at least 8 pairs, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 15_485_863))
    half, fit = n // 2, (3 * n) // 8
    return perm[:fit], perm[fit:half], perm[half:]


def critic_bounds(benign: torch.Tensor, adversarial: torch.Tensor, settings: CriticSettings = CriticSettings(),
                  names: Sequence[str] = DIVERGENCES) -> dict[str, CriticEstimate]:
    """Held-out f-GAN lower bound on D_name(benign || adversarial) for every name, each from its own fresh critic."""
    if benign.shape != adversarial.shape or benign.dim() != 2:
        raise ValueError(f"critic_bounds needs two (N, d) samples of equal shape, got {tuple(benign.shape)} "
                         f"and {tuple(adversarial.shape)}")
    names = list(names)
    p, q = benign.detach().double().cpu(), adversarial.detach().double().cpu()
    fit, stop, test = pair_split(len(p), settings.seed)
    pooled = torch.cat([p[fit], q[fit]])
    mean, std = pooled.mean(0), pooled.std(0).clamp_min(1e-8)
    p, q = ((p - mean) / std).float(), ((q - mean) / std).float()
    critics = Critics(len(names), p.shape[1], settings.hidden, settings.seed)
    opt = torch.optim.Adam(critics.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def bounds_on(idx: torch.Tensor) -> torch.Tensor:
        lp, lq = critics(p[idx]), critics(q[idx])
        return torch.stack([f_divergence_bound(name, lp[i], lq[i]) for i, name in enumerate(names)])

    with torch.no_grad():
        best = bounds_on(stop).double()
    best_step = [0] * len(names)
    best_state = {k: v.detach().clone() for k, v in critics.state_dict().items()}
    for step in range(1, settings.steps + 1):
        opt.zero_grad(set_to_none=True)
        (-bounds_on(fit).sum()).backward()
        opt.step()
        if step % settings.check_every == 0 or step == settings.steps:
            with torch.no_grad():
                now = bounds_on(stop).double()
                better = torch.isfinite(now) & (now > best)
                for i in better.nonzero().flatten().tolist():
                    best[i], best_step[i] = now[i], step
                    for key, value in critics.state_dict().items():
                        best_state[key][i] = value[i]
    critics.load_state_dict(best_state)
    train = torch.cat([fit, stop])
    out = {}
    with torch.no_grad():
        lp, lq = critics(p[test]), critics(q[test])
        train_bounds = bounds_on(train)
        for i, name in enumerate(names):
            out[name] = CriticEstimate(name, f_divergence_bound(name, lp[i], lq[i]).item(), train_bounds[i].item(),
                                       f_critic_accuracy(name, lp[i], lq[i]).item(), best_step[i], len(train),
                                       len(test))
    return out


def critic_bound(name: str, benign: torch.Tensor, adversarial: torch.Tensor,
                 settings: CriticSettings = CriticSettings()) -> CriticEstimate:
    """Held-out f-GAN lower bound on D_name(benign || adversarial) from a freshly trained critic."""
    return critic_bounds(benign, adversarial, settings, [name])[name]


# ------------------------------------------------------------------------------ MMD
def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (float64, clamped at 0)."""
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2 * x @ y.T).clamp_min(0)


def median_bandwidth(x: torch.Tensor, y: torch.Tensor, max_points: int = 2000) -> float:
    """Median pairwise distance of the pooled sample (first max_points rows), excluding self-pairs."""
    z = torch.cat([x, y]).double()[:max_points]
    d2 = _sq_dists(z, z)
    i, j = torch.triu_indices(len(z), len(z), offset=1)
    return float(d2[i, j].median().sqrt())


def _mmd2_from_kernel(k: torch.Tensor, a: torch.Tensor, paired: bool = False) -> torch.Tensor:
    """Unbiased MMD^2 from the pooled kernel matrix k and 0/1 membership columns a (N,) or (N, B) of the x side.

    With b = 1 - a: sum_{i != j in x} k = a^T k a - sum_i a_i k_ii, likewise for y, and the cross term a^T k b.
    `paired` (rows i and n + i are a pair, always on opposite sides): the cross term leaves out the n pairs'
    own k(x_i, y_i), which are not independent draws (Gretton et al. 2012, MMD_u for m = n).
    """
    a = a.to(k.dtype)
    cols = a if a.dim() == 2 else a[:, None]
    b = 1 - cols
    diag = k.diagonal()[:, None]
    m, n = cols.sum(0), b.sum(0)
    kc = k @ cols
    kb = k.sum(1, keepdim=True) - kc  # k @ b without a second product
    kxx = (cols * kc).sum(0) - (cols * diag).sum(0)
    kxy = (b * kc).sum(0)
    pairs = m * n
    if paired:
        half = len(k) // 2
        kxy = kxy - k.diagonal(half).sum()
        pairs = pairs - half
    kyy = (b * kb).sum(0) - (b * diag).sum(0)
    out = kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2 * kxy / pairs
    return out if a.dim() == 2 else out[0]


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled kernel matrix exp(-||z_i - z_j||^2 / (2 s^2)) of [x; y] (float64) and x's membership vector."""
    z = torch.cat([x, y]).double()
    k = torch.exp(-_sq_dists(z, z) / (2 * max(bandwidth, 1e-12) ** 2))
    return k, (torch.arange(len(z)) < len(x)).double()


def _check_paired(x: torch.Tensor, y: torch.Tensor, paired: bool) -> None:
    if paired and len(x) != len(y):
        raise ValueError(f"paired MMD^2 needs samples of equal size, got {len(x)} and {len(y)}")


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None,
                  paired: bool = False) -> tuple[float, float]:
    """(MMD^2_u, bandwidth) with a Gaussian kernel; bandwidth defaults to the median heuristic.

    paired: row i of x and row i of y belong together (a view and its attacked version), so their own
    kernel value is left out of the cross term; without it dependent pairs bias the estimate downwards.
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD^2 needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    _check_paired(x, y, paired)
    s = median_bandwidth(x, y) if bandwidth is None else bandwidth
    k, a = gaussian_kernel(x, y, s)
    return float(_mmd2_from_kernel(k, a, paired)), s


def mmd_permutation_p(x: torch.Tensor, y: torch.Tensor, bandwidth: float, permutations: int = 200,
                      seed: int = 0, paired: bool = False) -> float:
    """Permutation p-value of MMD^2_u, (1 + #{null >= observed}) / (1 + B).

    paired: each permutation swaps a random subset of the pairs (x_i, y_i), the null's symmetry for
    paired data; else the pooled rows are reshuffled.
    """
    _check_paired(x, y, paired)
    k, a = gaussian_kernel(x, y, bandwidth)
    observed = _mmd2_from_kernel(k, a, paired)
    gen = torch.Generator().manual_seed(seed + 32_452_843)
    n, total = len(x), len(a)
    if paired:
        swap = (torch.rand(n, permutations, generator=gen) < 0.5).double()  # pair i: rows i and n + i
        cols = torch.cat([1 - swap, swap])
    else:
        cols = torch.stack([a[torch.randperm(total, generator=gen)] for _ in range(permutations)], dim=1)
    null = _mmd2_from_kernel(k, cols, paired)
    return (1 + int((null >= observed - 1e-15).sum())) / (1 + permutations)


# ------------------------------------------------------------------------------ rank correlation
def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties handled); nan if either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    return _pearson(average_ranks(x), average_ranks(y))


def spearman_exact_p(x: Sequence[float], y: Sequence[float], max_n: int = 8) -> float | None:
    """Two-sided exact permutation p-value of Spearman's rho (all n! orders of y's ranks); None if n > max_n."""
    n = len(x)
    if n > max_n:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    observed = _pearson(rx, ry)
    if math.isnan(observed):
        return None
    hits = total = 0
    for perm in itertools.permutations(ry):
        total += 1
        hits += abs(_pearson(rx, perm)) >= abs(observed) - 1e-12
    return hits / total


def average_ranks_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks (1..n, ties sharing their mean rank) of every row of a 2-D array, vectorised."""
    less = (values[:, None, :] < values[:, :, None]).sum(axis=2)
    equal = (values[:, None, :] == values[:, :, None]).sum(axis=2)
    return less + (equal + 1) / 2


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson's r of matching rows of a and b; nan where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), np.nan)


def spearman_permutation_p(x: Sequence[float], y: Sequence[float], permutations: int = 20_000,
                           seed: int = 0) -> float | None:
    """Two-sided Monte Carlo permutation p-value of Spearman's rho: (1 + #{|rho_perm| >= |rho|}) / (1 + permutations)."""
    rx, ry = np.asarray(average_ranks(x), float), np.asarray(average_ranks(y), float)
    observed = _pearson(list(rx), list(ry))
    if math.isnan(observed):
        return None
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, permutations, 2000):
        count = min(2000, permutations - start)
        shuffled = rng.permuted(np.tile(ry, (count, 1)), axis=1)
        rho = _pearson_rows(np.tile(rx, (count, 1)), shuffled)
        hits += int((np.abs(rho) >= abs(observed) - 1e-12).sum())
    return (1 + hits) / (1 + permutations)


def spearman_p(x: Sequence[float], y: Sequence[float], exact_max_n: int = 8, permutations: int = 20_000,
               seed: int = 0) -> tuple[float | None, str]:
    """(p, method): the exact permutation p-value for n <= exact_max_n, else the Monte Carlo one."""
    if len(x) <= exact_max_n:
        return spearman_exact_p(x, y, exact_max_n), "exact"
    return spearman_permutation_p(x, y, permutations, seed), "permutation"


@dataclass(frozen=True)
class RhoInterval:
    """A percentile bootstrap interval of Spearman's rho; `valid` resamples had a rho (neither variable constant)."""
    lo: float
    hi: float
    valid: int
    reps: int


def spearman_bootstrap(x: Sequence[float], y: Sequence[float], reps: int = 5000, seed: int = 0,
                       level: float = 0.95) -> RhoInterval | None:
    """Percentile interval of Spearman's rho over (x, y) pairs resampled with replacement; None if no resample has one."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"spearman_bootstrap needs two sequences of equal length >= 3, got {len(x)} and {len(y)}")
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    rhos = []
    for start in range(0, reps, 500):
        idx = rng.integers(0, len(xs), size=(min(500, reps - start), len(xs)))
        rhos.append(_pearson_rows(average_ranks_rows(xs[idx]), average_ranks_rows(ys[idx])))
    values = np.concatenate(rhos)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return RhoInterval(float(lo), float(hi), int(len(values)), reps)
