"""Intervals for evaluation metrics: Wilson for accuracies, bootstrap for win rates, t for means.

We compute intervals ourselves rather than take lm-eval's: with ``bootstrap_iters=0`` (bootstrap is
slow and pointless for a mean of 0/1 scores) lm-eval reports its stderr as ``"N/A"``, and a
normal-approximation interval collapses to ``[0, 0]`` at the near-zero accuracies a 135M model
gets on GSM8K. The Wilson score interval stays inside ``[0, 1]`` and keeps an honest upper bound
at 0 of n correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

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


def bootstrap_interval(values: Sequence[float], *, iters: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (items resampled with replacement).

    Used for pairwise win rates, as AlpacaEval and the paper's v2 do: a prompt's score is 1 (win),
    0.5 (tie) or 0 (lose), and prompts are the unit of resampling.

    Args:
        values: one score per item.
        iters: bootstrap resamples.
        seed: seeds the resampling, so the interval is reproducible.
        level: coverage.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no items.

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

    Returns:
        ``(mean, low, high)``; the interval is ``[mean, mean]`` with fewer than two rows.

    """
    mean = float(values.mean())
    half = z * float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, mean - half, mean + half
