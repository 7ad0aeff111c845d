"""robustcl.stats: the exact t quantile, t-intervals over seeds, the paired bootstrap over test images."""
from __future__ import annotations

import math

import numpy as np
import pytest

from robustcl.stats import paired_bootstrap, paired_t_interval, t_interval, t_quantile, t_two_sided_probability

# Student's t 0.975 quantiles as published in standard tables (10 significant digits).
T_975 = {1: 12.70620474, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836, 10: 2.228138852,
         30: 2.042272456, 100: 1.983971519}


@pytest.mark.parametrize("df, expected", sorted(T_975.items()))
def test_t_quantile_matches_the_published_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=2e-9)


def test_t_quantile_other_levels():
    assert t_quantile(0.995, 2) == pytest.approx(9.924843201, rel=1e-9)
    assert t_quantile(0.95, 1) == pytest.approx(6.313751515, rel=1e-9)
    assert t_quantile(0.975, 2000) == pytest.approx(1.961151, abs=1e-6)  # approaches the normal 1.959964


@pytest.mark.parametrize("t", [0.1, 1.0, 2.5, 7.0])
def test_two_sided_probability_matches_the_small_df_closed_forms(t):
    assert t_two_sided_probability(t, 1) == pytest.approx(2 * math.atan(t) / math.pi, abs=1e-15)  # Cauchy
    assert t_two_sided_probability(t, 2) == pytest.approx(t / math.sqrt(t * t + 2), abs=1e-15)
    theta = math.atan(t / math.sqrt(3))
    df3 = 2 / math.pi * (theta + math.sqrt(3) * t / (t * t + 3))
    assert t_two_sided_probability(t, 3) == pytest.approx(df3, abs=1e-15)


def test_t_interval_matches_a_hand_computation():
    values = [0.60, 0.62, 0.67]  # mean 0.63, s^2 = (0.03^2 + 0.01^2 + 0.04^2) / 2 = 0.0013
    interval = t_interval(values)
    half = 4.302652729749464 * math.sqrt(0.0013) / math.sqrt(3)
    assert interval.estimate == pytest.approx(0.63, abs=1e-15)
    assert (interval.lo, interval.hi) == pytest.approx((0.63 - half, 0.63 + half), abs=1e-12)
    assert t_interval([0.5]).lo is None and t_interval([0.5]).estimate == 0.5


def test_paired_t_interval_identical_is_zero_width_and_a_shift_is_recovered():
    base = [0.41, 0.37, 0.45, 0.40]
    same = paired_t_interval(base, base)
    assert (same.estimate, same.lo, same.hi) == (0.0, 0.0, 0.0)
    shifted = paired_t_interval([b + 0.025 for b in base], base)
    assert (shifted.estimate, shifted.lo, shifted.hi) == pytest.approx((0.025, 0.025, 0.025), abs=1e-15)
    noisy = paired_t_interval([0.43, 0.38, 0.48, 0.41], base)  # differences 0.02 0.01 0.03 0.01
    d = [0.02, 0.01, 0.03, 0.01]
    s = math.sqrt(sum((x - 0.0175) ** 2 for x in d) / 3)
    assert (noisy.lo, noisy.hi) == pytest.approx((0.0175 - T_975[3] * s / 2, 0.0175 + T_975[3] * s / 2), abs=1e-8)


def test_bootstrap_of_identical_runs_is_exactly_zero():
    delta = np.zeros(500, dtype=np.int8)
    interval = paired_bootstrap([(delta, 0), (delta, 0), (delta, 0)], reps=500)
    assert (interval.estimate, interval.lo, interval.hi) == (0.0, 0.0, 0.0)


def test_bootstrap_recovers_a_shift_with_the_binomial_width():
    n, k = 2000, 100  # the configuration gets 100 more images right than the baseline, none fewer
    delta = np.zeros(n, dtype=np.int8)
    delta[np.random.default_rng(1).choice(n, k, replace=False)] = 1
    interval = paired_bootstrap([(delta, 0)], reps=20_000, seed=3)
    p = k / n
    half = 1.959964 * math.sqrt(p * (1 - p) / n)  # the bootstrap distribution of a mean of n 0/1 draws
    assert interval.estimate == p
    assert interval.lo < p < interval.hi and interval.lo > 0
    assert (interval.hi - interval.lo) / 2 == pytest.approx(half, rel=0.05)


def test_bootstrap_resamples_seeds_on_the_same_images_jointly():
    """Two seeds with the same per-image differences on the same images: no averaging-out (width of one seed);
    on different test sets (independent resamples) the width shrinks by sqrt(2)."""
    rng = np.random.default_rng(0)
    delta = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=3000, p=[0.2, 0.5, 0.3])
    one = paired_bootstrap([(delta, 0)], reps=20_000, seed=1)
    joint = paired_bootstrap([(delta, 7), (delta, 7)], reps=20_000, seed=1)
    apart = paired_bootstrap([(delta, 7), (delta, 8)], reps=20_000, seed=1)
    width = lambda i: i.hi - i.lo  # noqa: E731
    assert joint.estimate == one.estimate == pytest.approx(0.1, abs=0.03)
    assert width(joint) == pytest.approx(width(one), rel=0.05)
    assert width(apart) == pytest.approx(width(one) / math.sqrt(2), rel=0.05)


def test_bootstrap_rejects_mismatched_image_groups():
    with pytest.raises(ValueError, match="same, non-zero number of images"):
        paired_bootstrap([(np.zeros(5), 0), (np.zeros(6), 0)])
