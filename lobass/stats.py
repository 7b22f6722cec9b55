"""Statistics for the whole project: intervals for evaluation metrics and for sweep reports.

One module so that evaluation and the report cannot drift apart: an interval printed beside a
metric in ``summary.json`` and an interval the report draws over seeds come from the same code.

- Accuracies: the Wilson score interval. We compute it rather than take lm-eval's: with
  ``bootstrap_iters=0`` (bootstrap is slow and pointless for a mean of 0/1 scores) lm-eval reports
  its stderr as ``"N/A"``, and a normal-approximation interval collapses to ``[0, 0]`` at the
  near-zero accuracies a 135M model gets on GSM8K. Wilson stays inside ``[0, 1]`` and keeps an
  honest upper bound at 0 of n correct.
- Win rates and any mean over few values: a percentile bootstrap of the mean.
- Mean losses over many rows: a normal-approximation interval.
- Rank correlation: scipy's Spearman, on the finite pairs only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))  # two-sided 95% normal quantile, 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Written out because scipy's ``binomtest(...).proportion_ci(method="wilson")`` takes only an
    integer count, while ``successes`` may be fractional when averaged over repeats.

    Args:
        successes: number of correct items (may be fractional when averaged over repeats).
        n: number of items; ``0`` gives ``(nan, nan)``.
        z: normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)`` within ``[0, 1]``.

    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float] | np.ndarray, *, iters: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement).

    Used for pairwise win rates, as AlpacaEval and the paper's v2 do (a prompt's score is 1 win,
    0.5 tie or 0 lose, and prompts are the unit of resampling), and by the report for means over
    seeds and for paired per-row differences. Resampling indices with a seeded generator keeps the
    interval reproducible run to run.

    Args:
        values: one value per unit (item, row or seed).
        iters: bootstrap resamples.
        seed: seeds the resampling.
        level: coverage.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.

    """
    data = np.asarray(values, dtype=float)
    if not len(data):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(iters, len(data)))].mean(axis=1)  # (iters,)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mean_interval(values: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """Mean and normal-approximation interval over rows (for mean losses over many rows).

    Args:
        values: ``(N,)`` finite values, one per row.
        z: normal quantile (1.96 for 95%).

    Returns:
        ``(mean, low, high)``; the interval is ``[mean, mean]`` with fewer than two rows.

    """
    mean = float(values.mean())
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, mean - half, mean + half


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (ties get average ranks) over the pairs where both values are finite.

    Args:
        x: ``(N,)`` values, NaN where missing.
        y: ``(N,)`` values, NaN where missing.

    Returns:
        rho, or NaN with fewer than three finite pairs (too few to rank meaningfully).

    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return math.nan
    return float(stats.spearmanr(x[keep], y[keep]).statistic)
