"""Intervals for results: Student-t over seeds, a paired bootstrap over test images, and Wilson's interval of one
accuracy over its test images (numpy only).

Student's t quantile is computed exactly for integer degrees of freedom: the two-sided probability
P(|T| <= t) has a finite closed form in theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4: a
sum of powers of cos(theta), odd and even df apart), which is monotone in theta, so the quantile is
found by bisection on theta to machine precision. No table, no scipy. docs/statistics.md says which
interval the sweep summary reports and why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BISECTION_STEPS = 200  # halves [0, pi/2) far below float resolution


def t_two_sided_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 (closed form, A&S 26.7.3-4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # (2/pi) [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3))]
        if df == 1:
            return 2 * theta / math.pi
        term = total = 1.0
        for j in range(1, (df - 3) // 2 + 1):
            term *= (2 * j) / (2 * j + 1) * c2
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    term = total = 1.0  # even: sin [1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)]
    for j in range(1, (df - 2) // 2 + 1):
        term *= (2 * j - 1) / (2 * j) * c2
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with integer `df`, by bisection on the exact CDF."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1, got {p}")
    target = 2 * p - 1  # P(|T| <= t_p)
    lo, hi = 0.0, math.pi / 2
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if t_two_sided_probability(math.sqrt(df) * math.tan(mid), df) < target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at `level`; lo/hi are None when it cannot be formed."""
    estimate: float
    lo: float | None
    hi: float | None
    n: int
    level: float = 0.95
    method: str = ""


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """mean ± t_{(1+level)/2, n-1} · s / sqrt(n) over `values` (e.g. one accuracy per seed); no interval for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, n, level, "t")
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level, "t")


def paired_t_interval(values: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> Interval:
    """t-interval of the per-seed differences values[i] - baseline[i] (the same seed paired)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired_t_interval needs equal lengths, got {len(values)} and {len(baseline)}")
    return t_interval([a - b for a, b in zip(values, baseline)], level)


def paired_bootstrap(deltas: Sequence[tuple[np.ndarray, int]], reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Percentile interval of the mean over seeds of per-seed mean(delta), test images resampled with replacement.

    `deltas` holds one (delta, group) per seed: delta[i] = a_i - b_i for test image i (per-image correctness
    of the configuration minus the baseline's, the same images), group an id of the test-image set. Seeds of
    one group were evaluated on the same images, so a replicate draws one resample of those images for all
    of them (their errors on an image are correlated); different groups are resampled independently. A
    resample is a multinomial draw over the distinct per-image patterns (delta of every seed of the group),
    which is exactly resampling images and costs O(patterns) per replicate.
    """
    if not deltas:
        raise ValueError("paired_bootstrap needs at least one seed")
    groups: dict[int, list[np.ndarray]] = {}
    for delta, group in deltas:
        groups.setdefault(group, []).append(np.asarray(delta, dtype=np.float64))
    rng = np.random.default_rng(seed)
    seed_means = []  # (reps, seeds of the group) per group
    estimate_parts = []
    for rows in groups.values():
        n = len(rows[0])
        if n == 0 or any(len(r) != n for r in rows):
            raise ValueError("paired_bootstrap: seeds of one image group must have the same, non-zero number of images")
        matrix = np.stack(rows, axis=1)  # (images, seeds)
        patterns, counts = np.unique(matrix, axis=0, return_counts=True)
        draws = rng.multinomial(n, counts / n, size=reps)  # (reps, patterns): how often each pattern is drawn
        seed_means.append(draws @ patterns / n)
        estimate_parts.append(matrix.mean(axis=0))
    replicates = np.concatenate(seed_means, axis=1).mean(axis=1)
    estimate = float(np.concatenate(estimate_parts).mean())
    alpha = (1 - level) / 2
    lo, hi = np.quantile(replicates, [alpha, 1 - alpha])
    return Interval(estimate, float(lo), float(hi), len(deltas), level, "bootstrap")


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, `successes` of `n` (an accuracy over n test images)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


__all__ = ["Interval", "paired_bootstrap", "paired_t_interval", "t_interval", "t_quantile", "t_two_sided_probability",
           "wilson_interval"]
