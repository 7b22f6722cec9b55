"""lobass.stats against hand computations: each interval and adjustment on values small enough to
work out on paper (t quantiles from a printed table)."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from lobass.stats import (
    MIN_BOOTSTRAP_RUNS,
    Z95,
    bootstrap_interval,
    bootstrap_p_value,
    hierarchical_bootstrap_difference,
    holm_adjust,
    mean_interval,
    run_difference,
    t_interval,
)


def test_normal_quantile_and_mean_interval():
    assert abs(Z95 - 1.959963984540054) < 1e-15  # the constant evaluation used before
    # values 1..5: mean 3, sample sd sqrt(2.5), so half-width 1.96 * sqrt(2.5 / 5)
    mean, low, high = mean_interval(np.array([1, 2, 3, 4, 5.0]))
    assert (mean, high - mean) == pytest.approx((3.0, Z95 * math.sqrt(0.5)))
    assert mean_interval(np.array([2.0])) == (2.0, 2.0, 2.0)


def test_t_interval_over_three_seeds():
    # mean 2, sd 1, standard error 1/sqrt(3); t(0.975, df 2) = 4.302653 from the table
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (low, high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)),
                                        abs=1e-6)
    mean, low, high = t_interval([1.5, math.nan])  # one finite seed: a mean, no spread
    assert mean == 1.5 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in t_interval([]))


def test_holm_adjustment_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    assert holm_adjust([]).shape == (0,)


def test_hierarchical_bootstrap_with_one_seed_is_the_item_bootstrap():
    rng = np.random.default_rng(4)
    ours, base = rng.normal(1.0, 1.0, (1, 30)), rng.normal(1.2, 1.0, (1, 30))
    mean, low, high, _ = hierarchical_bootstrap_difference(ours, base, seed=7, min_runs=1)
    assert mean == pytest.approx(float((ours - base).mean()))
    assert (low, high) == bootstrap_interval((ours - base)[0], seed=7)


def test_hierarchical_bootstrap_carries_seed_variance():
    # Every item the same within a seed: only the seeds vary. Ours has seeds at 1 and 3 (base 0),
    # so a resample of two seeds averages to 1, 2 or 3 with chances 1/4, 1/2, 1/4: the 95%
    # interval is [1, 3], where a bootstrap over the items alone would give [2, 2].
    ours = np.array([[1.0] * 20, [3.0] * 20])
    base = np.zeros((1, 20))
    assert hierarchical_bootstrap_difference(ours, base, min_runs=1) == (2.0, 1.0, 3.0, 2 / 2001)
    assert bootstrap_interval(ours.mean(axis=0) - base[0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="same items: 20 against 3"):
        hierarchical_bootstrap_difference(ours, np.zeros((1, 3)))


def test_the_bootstrap_over_runs_refuses_fewer_than_ten_runs_per_arm():
    # Three runs per arm: resampling them shrinks the between-run variance by 2/3 and bounds
    # the interval by the runs' range; the bootstrap must refuse, pointing to the t over runs.
    rng = np.random.default_rng(0)
    ours, base = rng.normal(1.0, 0.1, (3, 40)), rng.normal(1.1, 0.1, (3, 40))
    with pytest.raises(ValueError, match=r"needs >= 10 runs per arm, got 3 vs 3: use "
                                         r"run_difference"):
        hierarchical_bootstrap_difference(ours, base)
    with pytest.raises(ValueError, match="got 10 vs 9"):
        hierarchical_bootstrap_difference(rng.normal(size=(10, 40)), rng.normal(size=(9, 40)))
    assert MIN_BOOTSTRAP_RUNS == 10
    # ten per arm: allowed, and a real interval around the true difference of -0.1
    many_ours, many_base = rng.normal(1.0, 0.1, (10, 40)), rng.normal(1.1, 0.1, (10, 40))
    mean, low, high, p = hierarchical_bootstrap_difference(many_ours, many_base)
    assert low < mean < high < 0 and p < 0.01


def test_t_interval_of_equal_seeds_has_no_width():
    assert t_interval([0.1, 0.1]) == (0.1, 0.1, 0.1)


def test_bootstrap_p_value_by_hand():
    # 3 of 9 resamples at or below 0, 7 at or above (0 counts on both sides):
    # tails (3 + 1) / 10 and (7 + 1) / 10, so p = 2 * 0.4
    means = np.array([-2, -1, 0, 1, 2, 3, 4, 5, 6.0])
    assert bootstrap_p_value(means) == pytest.approx(0.8)
    assert bootstrap_p_value(np.ones(9)) == pytest.approx(0.2)  # 2 * (0 + 1) / 10
    assert math.isnan(bootstrap_p_value(np.array([])))


def test_run_difference_pooled_with_one_run_by_hand():
    # ours one run 1.5; baseline 1.7, 1.8, 1.9 (sd 0.1): se = 0.1 * sqrt(1 + 1/3), df 2,
    # t(0.975, 2) = 4.302653; with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2)
    mean, low, high, p, df = run_difference([1.5], [1.7, 1.8, 1.9])
    se = 0.1 * math.sqrt(4 / 3)
    assert mean == pytest.approx(-0.3) and df == 2
    assert (low, high) == pytest.approx((-0.3 - 4.302653 * se, -0.3 + 4.302653 * se), abs=1e-6)
    t = 0.3 / se
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2))


def test_run_difference_of_three_runs_per_arm_is_welchs_interval():
    # Welch by hand from the textbook formulas, independent of scipy: variances 0.01 and 0.0025
    # over 3 runs each, se^2 = 0.01/3 + 0.0025/3, Welch-Satterthwaite df, the t quantile
    ours, base = [1.0, 1.1, 1.2], [1.5, 1.55, 1.6]
    va, vb = 0.01 / 3, 0.0025 / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    t = -0.45 / math.sqrt(va + vb)
    found = run_difference(ours, base)
    assert found.difference == pytest.approx(-0.45) and found.df == pytest.approx(df)
    assert (found.low, found.high) == pytest.approx((-0.45 - half, -0.45 + half))
    assert found.p == pytest.approx(2 * stats.t.sf(abs(t), df))
    # and the same numbers as scipy's Welch test with its own confidence interval
    welch = stats.ttest_ind(ours, base, equal_var=False)
    interval = welch.confidence_interval()
    assert (found.low, found.high, found.p, found.df) == pytest.approx(
        (interval.low, interval.high, welch.pvalue, welch.df))


def test_run_difference_without_spread_has_no_interval():
    for ours, base in (([1.0], [2.0]), ([0.1, 0.1], [0.2, 0.2]), ([], [1.0, 2.0])):
        _, low, high, p, df = run_difference(ours, base)
        assert math.isnan(low) and math.isnan(high) and math.isnan(p) and math.isnan(df)
    # one side without spread, the other with: Welch still tests, and scipy's precision warning
    # for an exactly constant side is not raised to the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = run_difference([0.1, 0.1], [0.2, 0.3])
    assert found.difference == pytest.approx(-0.15) and found.df == pytest.approx(1.0)
