"""Divergence estimates against closed forms, MMD^2 behaviour, Spearman with ties, and bit-identical reruns."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from robustcl.bound.estimates import (CriticSettings, average_ranks_rows, average_ranks, critic_bounds, mmd2_unbiased,
                                      mmd_permutation_p, spearman, spearman_bootstrap, spearman_exact_p, spearman_p,
                                      spearman_permutation_p)
from robustcl.objectives.divergences import gaussian_divergence

P, Q = (0.0, 1.0), (1.0, 1.0)  # N(mu, sd) for the benign and adversarial samples


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny critic steps: one torch thread is many times faster on a shared CPU (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_pairs(n: int, seed: int, shift: float = 1.0, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen) + shift


def test_js_quadrature_reference():
    # JS(N(0,1) || N(1,1)) has no closed form: check the grid integral against an independent Monte Carlo
    js = gaussian_divergence("js", *P, *Q)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_p = lambda v: -0.5 * v ** 2  # noqa: E731 (common constants cancel in the ratios)
    log_q = lambda v: -0.5 * (v - 1) ** 2  # noqa: E731
    log_m = lambda v: torch.logaddexp(log_p(v), log_q(v)) - math.log(2)  # noqa: E731
    mc = 0.5 * ((log_p(x) - log_m(x)).mean() + (log_q(x + 1) - log_m(x + 1)).mean())
    assert js == pytest.approx(mc.item(), abs=2e-3)
    assert 0 < js < math.log(2)


def test_critic_bounds_approach_the_closed_form_kl_and_js_as_samples_grow():
    truth = {"kl": gaussian_divergence("kl", *P, *Q), "js": gaussian_divergence("js", *P, *Q)}
    assert truth["kl"] == pytest.approx(0.5)
    settings = lambda seed: CriticSettings(steps=300, seed=seed)  # noqa: E731
    errors: dict[tuple[int, str], list[float]] = {}
    for n in (200, 20_000):
        for seed in range(3):
            p, q = gaussian_pairs(n, seed)
            est = critic_bounds(p, q, settings(seed), ["kl", "js"])
            for name in truth:
                errors.setdefault((n, name), []).append(est[name].bound - truth[name])
                assert est[name].n_test == n // 2 and est[name].n_train == n - n // 2
    for name, tol in (("kl", 0.03), ("js", 0.005)):
        small = statistics.fmean(abs(e) for e in errors[(200, name)])
        large = statistics.fmean(abs(e) for e in errors[(20_000, name)])
        assert large < small / 3, (name, small, large)              # the error shrinks with the sample size
        assert all(abs(e) < tol for e in errors[(20_000, name)]), (name, errors[(20_000, name)])


def test_critic_bound_is_near_zero_for_identical_distributions_and_deterministic():
    p, q = gaussian_pairs(2000, 7, shift=0.0, dim=3)
    a = critic_bounds(p, q, CriticSettings(steps=200, seed=1))
    b = critic_bounds(p, q, CriticSettings(steps=200, seed=1))
    assert a == b  # bit-identical for the same seed
    for name, est in a.items():  # the truth is 0; held-out noise ~ 1/sqrt(1000)
        assert abs(est.bound) < 0.05, (name, est.bound)
    assert a["js"].accuracy == pytest.approx(0.5, abs=0.05)


def test_early_stopping_keeps_an_overfitting_critic_from_reporting_a_bad_bound():
    # 100 fit pairs in 20-d, identical distributions, an MLP critic: training runs into overfitting, whose
    # held-out bound is far below 0 (JS -1.6 at the last step); the early-stopped critic stays near 0
    p, q = gaussian_pairs(200, 5, shift=0.0, dim=20)
    est = critic_bounds(p, q, CriticSettings(hidden=64, steps=400, seed=0))
    assert est["js"].best_step < 400
    assert abs(est["js"].bound) < 0.05 and est["pearson"].bound > -0.5 and est["hellinger"].bound > -0.5


def test_mmd2_is_zero_within_standard_errors_for_identical_distributions():
    values = [mmd2_unbiased(*gaussian_pairs(150, seed, shift=0.0, dim=2))[0] for seed in range(20)]
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    assert abs(mean) < 3 * se, (mean, se)
    assert min(values) < 0 < max(values)  # unbiased: it goes negative, unlike the biased V-statistic


def test_paired_mmd2_is_unbiased_where_the_unpaired_formula_is_not():
    # y_i = x_i + small noise: the same distribution, but each pair is dependent; the pair's own k(x_i, y_i) ~ 1
    # pulls the unpaired U-statistic below 0 by ~2 (1 - E k) / n, the paired one leaves it out
    paired, unpaired = [], []
    for seed in range(20):
        x, noise = gaussian_pairs(100, seed, shift=0.0, dim=2)
        y = x + 0.01 * noise
        paired.append(mmd2_unbiased(x, y, paired=True)[0])
        unpaired.append(mmd2_unbiased(x, y)[0])
    se = statistics.stdev(paired) / math.sqrt(20)
    assert abs(statistics.fmean(paired)) < 3 * se
    assert statistics.fmean(unpaired) < -10 * se
    with pytest.raises(ValueError, match="equal size"):
        mmd2_unbiased(torch.zeros(3, 1), torch.zeros(4, 1), paired=True)


def test_mmd2_grows_monotonically_with_the_mean_shift_and_the_test_detects_it():
    p, q0 = gaussian_pairs(300, 3, shift=0.0, dim=2)
    values = [mmd2_unbiased(p, q0 + shift)[0] for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert abs(values[0]) < 0.01
    _, bw = mmd2_unbiased(p, q0 + 1.0)
    _, bw0 = mmd2_unbiased(p, q0)
    for paired in (False, True):
        assert mmd_permutation_p(p, q0 + 1.0, bw, permutations=99, seed=0, paired=paired) == pytest.approx(1 / 100)
        assert mmd_permutation_p(p, q0, bw0, permutations=99, seed=0, paired=paired) > 0.05
        assert mmd_permutation_p(p, q0, bw0, 99, 0, paired) == mmd_permutation_p(p, q0, bw0, 99, 0, paired)


def test_mmd2_matches_the_u_statistic_written_out():
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen, dtype=torch.float64)
    s = 0.8
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / 30
    assert mmd2_unbiased(x, y, bandwidth=s)[0] == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    y5 = y[:5]  # paired, m = n = 5: the cross term over i != j only
    yy5 = sum(k(y5[i], y5[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy5 = sum(k(x[i], y5[j]) for i in range(5) for j in range(5) if i != j) / 20
    assert mmd2_unbiased(x, y5, bandwidth=s, paired=True)[0] == pytest.approx(xx + yy5 - 2 * xy5, rel=1e-12)
    z = torch.cat([x, y])
    dists = sorted(float((z[i] - z[j]).norm()) for i in range(11) for j in range(i + 1, 11))
    assert mmd2_unbiased(x, y)[1] == pytest.approx(statistics.median(dists) if len(dists) % 2 else
                                                   dists[len(dists) // 2 - 1], rel=1e-9)


def test_spearman_with_ties_matches_a_hand_computed_case():
    assert average_ranks([1, 2, 2, 3]) == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([5, 5, 5]) == [2.0, 2.0, 2.0]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 4, 3]: cov 3, var 4.5 and 5 -> 3 / sqrt(22.5)
    assert spearman([1, 2, 2, 3], [10, 20, 40, 30]) == pytest.approx(3 / math.sqrt(22.5), rel=1e-12)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 12 / 60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, rel=1e-12)
    assert spearman([4, 3, 2, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_exact_p_value_of_four_points():
    assert spearman_exact_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(2 / 24)  # only the two monotone orders
    assert spearman_exact_p([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(8 / 24)   # |rho| >= 0.8: 8 of 24 orders
    assert spearman_exact_p(list(range(9)), list(range(9))) is None


def test_monte_carlo_permutation_p_agrees_with_the_exact_one():
    x, y = [1, 2, 3, 4, 5, 6, 7], [2, 1, 4, 3, 7, 5, 6]
    exact = spearman_exact_p(x, y)
    assert spearman_permutation_p(x, y, permutations=40_000, seed=1) == pytest.approx(exact, abs=0.006)
    assert spearman_p(x, y) == (exact, "exact")
    p, method = spearman_p(list(range(12)), list(range(12)))
    assert method == "permutation" and p == pytest.approx(1 / 20_001)  # no random order reaches |rho| = 1
    assert spearman_permutation_p([1, 1, 1, 1], [1, 2, 3, 4]) is None


def test_vectorised_ranks_match_average_ranks():
    rows = torch.randint(0, 4, (6, 9)).double().numpy()  # many ties
    assert average_ranks_rows(rows).tolist() == [average_ranks(list(r)) for r in rows]


def test_bootstrap_interval_of_a_perfectly_monotone_relation_is_at_one():
    x = [0.1 * i for i in range(12)]
    ci = spearman_bootstrap(x, [math.exp(v) for v in x], reps=2000)
    assert (ci.lo, ci.hi) == (1.0, 1.0) and ci.valid == 2000
    ci = spearman_bootstrap(x, [-v for v in x], reps=2000)
    assert (ci.lo, ci.hi) == (-1.0, -1.0)


def test_bootstrap_interval_of_independent_variables_covers_zero():
    gen = torch.Generator().manual_seed(0)
    covered = 0
    for trial in range(20):
        x, y = torch.randn(15, generator=gen).tolist(), torch.randn(15, generator=gen).tolist()
        ci = spearman_bootstrap(x, y, reps=2000, seed=trial)
        covered += ci.lo < 0 < ci.hi
        assert ci.hi - ci.lo > 0.5  # 15 independent points cannot pin rho down
    assert covered >= 17  # a 95% interval: about 19 of 20


def test_bootstrap_needs_three_points():
    with pytest.raises(ValueError, match="length >= 3"):
        spearman_bootstrap([1, 2], [1, 2])
    assert spearman_bootstrap([1, 1, 1], [1, 2, 3]) is None
