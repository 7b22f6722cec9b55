"""lobass.stats against hand computations: each interval and adjustment on values small enough to
work out on paper (t quantiles from a printed table)."""

import math

import numpy as np
import pytest

from lobass.stats import (
    Z95,
    bootstrap_interval,
    hierarchical_bootstrap_difference,
    holm_adjust,
    mean_interval,
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
    mean, low, high = hierarchical_bootstrap_difference(ours, base, seed=7)
    assert mean == pytest.approx(float((ours - base).mean()))
    assert (low, high) == bootstrap_interval((ours - base)[0], seed=7)


def test_hierarchical_bootstrap_carries_seed_variance():
    # Every item the same within a seed: only the seeds vary. Ours has seeds at 1 and 3 (base 0),
    # so a resample of two seeds averages to 1, 2 or 3 with chances 1/4, 1/2, 1/4: the 95%
    # interval is [1, 3], where a bootstrap over the items alone would give [2, 2].
    ours = np.array([[1.0] * 20, [3.0] * 20])
    base = np.zeros((1, 20))
    assert hierarchical_bootstrap_difference(ours, base) == (2.0, 1.0, 3.0)
    assert bootstrap_interval(ours.mean(axis=0) - base[0]) == (2.0, 2.0)
    with pytest.raises(ValueError, match="same items: 20 against 3"):
        hierarchical_bootstrap_difference(ours, np.zeros((1, 3)))
