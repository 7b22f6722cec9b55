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
- Sweep comparisons (the report, ``docs/report.md``): a t interval over training seeds; the
  difference of two arms with each training run as one observation (Welch t on per-run means,
  the primary interval); a hierarchical bootstrap of paired per-item differences (items, then
  runs) as a secondary view, refused with fewer than :data:`MIN_BOOTSTRAP_RUNS` runs per arm;
  and Holm's adjustment (statsmodels).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

Z95 = float(stats.norm.ppf(0.975))  # two-sided 95% normal quantile, 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, never crossing the proportion itself.

    From statsmodels' ``proportion_confint(method="wilson")`` (which, unlike scipy's
    ``binomtest``, takes a fractional count). Its closed form leaves round-off at the edges: at
    0 of n the lower bound can come out as 7e-18 rather than 0, and a report's error bar
    ``estimate - low`` then turns negative (matplotlib refuses it). So the bounds are clipped to
    the estimate and to ``[0, 1]``.

    Args:
        successes: number of correct items (may be fractional when averaged over repeats).
        n: number of items; ``0`` gives ``(nan, nan)``.
        z: normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)`` with ``0 <= low <= successes / n <= high <= 1``.

    """
    if n <= 0:
        return math.nan, math.nan
    from statsmodels.stats.proportion import proportion_confint

    p = successes / n
    low, high = proportion_confint(successes, n, alpha=2 * float(stats.norm.sf(z)),
                                   method="wilson")
    return max(0.0, min(float(low), p)), min(1.0, max(float(high), p))


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


# Comparisons of arms (issues 13 and 28). Each training run is one observation: over training
# seeds a t-interval, between two arms a Welch t-interval on the per-run means (a bootstrap over
# three runs is roughly [min, max], shrinks the between-run variance by (n - 1) / n and puts its
# p at its floor). The hierarchical bootstrap (runs, then items) is a secondary view that needs
# MIN_BOOTSTRAP_RUNS runs per arm. Across many comparisons a Holm adjustment.

MIN_BOOTSTRAP_RUNS = 10  # runs per arm below which a bootstrap over runs is refused


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95,
               ) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean, for a handful of values such as training seeds.

    Args:
        values: one value per seed (non-finite values are left out).
        level: coverage.

    Returns:
        ``(mean, low, high)``; the bounds are NaN with fewer than two finite values (one seed
        says nothing about the spread between seeds).

    """
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if not len(data):
        return math.nan, math.nan, math.nan
    mean = float(data.mean())
    if len(data) < 2:
        return mean, math.nan, math.nan
    sem = float(stats.sem(data))
    if sem == 0:  # every seed gave the same value (an accuracy on few items, say): no spread
        return mean, mean, mean
    low, high = stats.t.interval(level, len(data) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


BOOTSTRAP_CHUNK = 4000  # resamples drawn at once; up to this many, one draw as before chunking


def hierarchical_bootstrap_difference(ours: np.ndarray, base: np.ndarray, *, iters: int = 2000,
                                      seed: int = 0, level: float = 0.95,
                                      min_runs: int = MIN_BOOTSTRAP_RUNS,
                                      ) -> tuple[float, float, float, float]:
    """Paired difference of two points over shared items, resampling items, then seeds per side.

    Each resample draws the items (shared by both sides, so the pairing is kept) and, on each
    side independently, its training seeds; the statistic is the mean over the drawn items of
    (ours' mean over drawn seeds - base's mean over drawn seeds). Seed variance therefore widens
    the interval, which a bootstrap over items alone leaves out. With one seed on each side this
    is exactly :func:`bootstrap_interval` of the per-item differences (same draws, same seed).

    Refused with fewer than ``min_runs`` runs on a side: resampling n runs estimates their
    variance with the factor (n - 1) / n (a third too small at n = 3) and the interval cannot
    reach beyond the few runs' range, so with 2 or 3 runs per arm it is too narrow and its p
    sits at its floor. :func:`run_difference` is the interval for few runs.

    Args:
        ours: ``(S_ours, N)`` per-item values, one row per training seed, columns the shared
            items in the same order as ``base``.
        base: ``(S_base, N)`` the baseline's values on the same items.
        iters: bootstrap resamples.
        seed: seeds the resampling.
        level: coverage.
        min_runs: fewest runs (rows) per side; lower it only to study the resampling itself.

    Returns:
        ``(mean difference, low, high, p)`` where ``p`` is :func:`bootstrap_p_value` of the
        resampled means; NaN bounds and p for no items.

    Raises:
        ValueError: the two sides do not hold the same number of items, or a side has fewer
            than ``min_runs`` runs.

    """
    ours, base = np.atleast_2d(np.asarray(ours, float)), np.atleast_2d(np.asarray(base, float))
    if ours.shape[1] != base.shape[1]:
        raise ValueError(f"both sides need the same items: {ours.shape[1]} against "
                         f"{base.shape[1]} columns")
    if min(len(ours), len(base)) < min_runs:
        raise ValueError(f"a bootstrap over runs needs >= {min_runs} runs per arm, got "
                         f"{len(ours)} vs {len(base)}: use run_difference (Welch t over runs)")
    n_items = ours.shape[1]
    diff = ours.mean(axis=0) - base.mean(axis=0)  # (N,)
    if not n_items:
        return math.nan, math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, iters, BOOTSTRAP_CHUNK):  # bounded memory for many resamples
        size = min(BOOTSTRAP_CHUNK, iters - start)
        # items first, in bootstrap_interval's shape, so that one seed per side reproduces it
        items = rng.integers(0, n_items, size=(size, n_items))  # (size, N)
        ours_seeds = rng.integers(0, len(ours), size=(size, len(ours)))  # (size, S_ours)
        base_seeds = rng.integers(0, len(base), size=(size, len(base)))  # (size, S_base)
        per_item = ours[ours_seeds].mean(axis=1) - base[base_seeds].mean(axis=1)  # (size, N)
        chunks.append(np.take_along_axis(per_item, items, axis=1).mean(axis=1))
    means = np.concatenate(chunks)  # (iters,)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(diff.mean()), float(low), float(high), bootstrap_p_value(means)


def bootstrap_p_value(means: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from bootstrap resamples of a difference.

    Twice the smaller tail share of resamples at or beyond 0, each share counted as
    ``(k + 1) / (B + 1)`` so that a finite number of resamples never claims ``p = 0``; the
    percentile interval at level ``1 - alpha`` excludes 0 when ``p`` falls below about
    ``alpha`` (the same resamples decide both).

    Args:
        means: ``(B,)`` resampled differences.

    Returns:
        p in ``(0, 1]``; NaN for no resamples.

    """
    means = np.asarray(means, dtype=float)
    if not len(means):
        return math.nan
    tails = [(int((means <= 0).sum()) + 1) / (len(means) + 1),
             (int((means >= 0).sum()) + 1) / (len(means) + 1)]
    return min(1.0, 2 * min(tails))


class RunDifference(NamedTuple):
    """The difference of two arms over runs (:func:`run_difference`)."""

    difference: float  # mean of ours' runs - mean of base's runs
    low: float  # interval bounds; NaN when no spread between runs can be measured
    high: float
    p: float  # two-sided p of "no difference"
    df: float  # t degrees of freedom (Welch-Satterthwaite, or pooled n_a + n_b - 2)


def run_difference(ours: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray,
                   level: float = 0.95) -> RunDifference:
    """Difference of two arms with each training run as one observation: a t-test on run means.

    ``scipy.stats.ttest_ind`` and its ``confidence_interval``: Welch's test (unequal variances)
    when both sides have two or more runs. With one run on a side its spread is unknown, so the
    pooled-variance test lets the other side's spread stand for both (an equal-variance
    assumption; the interval is that of one more run of the side with several). The per-item
    bootstrap is no substitute with few runs (:func:`hierarchical_bootstrap_difference`).

    Args:
        ours: one value per training run of our arm, e.g. its mean per-prompt loss
            (non-finite values are left out).
        base: one value per run of the comparator.
        level: coverage.

    Returns:
        :class:`RunDifference`; NaN bounds, p and df when neither side has two values or every
        value on each side is the same (no spread between runs to test against).

    """
    a, b = np.asarray(ours, dtype=float), np.asarray(base, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return RunDifference(math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(a.mean() - b.mean())
    if max(len(a), len(b)) < 2 or np.ptp(a) == np.ptp(b) == 0:  # nothing measures the spread
        return RunDifference(mean, math.nan, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        # a side whose runs agree exactly (an accuracy every seed got) has variance 0, which
        # scipy reports as precision loss; the other side's spread still makes the test
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        test = stats.ttest_ind(a, b, equal_var=min(len(a), len(b)) < 2)
    interval = test.confidence_interval(level)
    return RunDifference(mean, float(interval.low), float(interval.high), float(test.pvalue),
                         float(test.df))


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error), in the input order.

    statsmodels' ``multipletests(method="holm")``. (scipy's ``false_discovery_control`` controls
    the false discovery rate, a weaker promise than the family-wise one a verdict table makes.)

    Args:
        p_values: ``(m,)`` raw p-values.

    Returns:
        ``(m,)`` adjusted p-values: the k-th smallest becomes ``max over j <= k of
        (m - j + 1) * p_(j)``, capped at 1.

    """
    # imported here: statsmodels takes about a second to import, and only reports adjust
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    if not len(p):
        return p
    return np.asarray(multipletests(p, method="holm")[1], dtype=float)
