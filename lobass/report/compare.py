"""Each arm against its baselines: one difference, one kind of interval, one verdict per row.

Which statistic (all from :mod:`lobass.stats`):

- both sides kept per-row losses for an ``eval/<set>/loss`` metric: a paired bootstrap of the
  per-item differences; when either side has two or more training seeds, a hierarchical one
  (items, then each side's seeds), so seed variance is in the interval;
- otherwise, with two or more seeds on at least one side: a Student-t interval of the difference
  of the means over seeds (Welch; pooled variance when one side has a single seed);
- otherwise (one seed each, no per-row values): no interval of one kind exists for the
  difference, and the comparison is listed as not tested rather than judged from two intervals
  of different kinds.

The verdict reads the difference's 95% interval against ``margin`` (same units as the metric):
``equivalent`` when the whole interval lies inside ``[-margin, margin]``; ``better``/``worse`` when
it excludes 0 and the Holm-adjusted p-value over every tested comparison of the report is below
0.05 (``(not after Holm)`` when only the unadjusted test passes); ``inconclusive`` otherwise.
Each bootstrap draws enough resamples for Holm over the whole table to be able to decide
(:func:`bootstrap_resamples`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lobass.artifacts import read_row_losses
from lobass.report.points import members_of
from lobass.report.runs import higher_is_better
from lobass.stats import hierarchical_bootstrap_difference, holm_adjust, seed_difference

DEFAULT_MARGIN = 0.02  # nats of mean response loss; 2 percentage points of accuracy or win rate
ALPHA = 0.05  # family-wise error rate the Holm column is read at
BOOTSTRAP_ITERS = 2000  # resamples per comparison when few comparisons share the Holm family

COLUMNS = ["point", "metric", "value", "baseline", "base_value", "method", "difference",
           "diff_low", "diff_high", "n_items", "seeds", "p", "p_holm", "verdict"]


def _key(point_key: str) -> dict[str, Any]:
    key: dict[str, Any] = json.loads(point_key)
    return key


def baselines_for(entry: pd.Series, table: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The baselines of one arm: random at the same size, random matched on tokens, full data.

    Random at the same size shares the arm's selection rule (order aside: a random bottom-k is
    still random) and training budget. A random arm with a token budget equal to the arm's
    selected response tokens is its token-matched control. Every full-data point is a baseline
    (full data at matched steps and full data trained as the reference was are both listed).
    """
    ours = _key(entry["point_key"])
    found = []
    for _, base in table.iterrows():
        key = _key(base["point_key"])
        if key["kind"] == "full":
            found.append((f"{base['point']} ({_seeds(base)})", base))
        elif (key["kind"] != "subset" or key["scorer"] != "random" or key["train"] != ours["train"]
              or not key["selection"] or not ours["selection"]):
            continue
        elif _without_order(key["selection"]) == _without_order(ours["selection"]):
            found.append((f"random ({_seeds(base)})", base))
        elif key["selection"].get("mode") == "tokens" and entry["selected_tokens"] == \
                key["selection"].get("tokens"):
            found.append((f"random, matched tokens ({_seeds(base)})", base))
    order = {"random": 0, "random, matched tokens": 1}
    return sorted(found, key=lambda f: order.get(f[0].split(" (")[0], 2))


def _without_order(selection: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in selection.items() if k != "order"}


def _seeds(point: pd.Series) -> str:
    return f"{point['seeds']} seed{'s' * (point['seeds'] != 1)}"


def compare_to_baselines(runs: pd.DataFrame, table: pd.DataFrame, metrics: Sequence[str],
                         margin: float = DEFAULT_MARGIN) -> pd.DataFrame:
    """Every selecting arm against each of its baselines, one row per metric.

    Arms are the subset points whose scorer is not ``random``; baselines come from
    :func:`baselines_for`. Holm's adjustment runs over every row that has a p-value.

    Args:
        runs: the run table (for per-seed values and per-row losses).
        table: the pooled table of :func:`lobass.report.points.pool_over_seeds`.
        metrics: metrics to compare.
        margin: equivalence margin, in the metric's units.

    Returns:
        :data:`COLUMNS`: the two points' means, the statistic used (``method``, empty when none
        applies), the difference (ours - baseline) with its 95% interval, the items and seeds it
        rests on, raw and Holm-adjusted p-values, and the verdict.

    """
    # every comparison first: the resamples per comparison depend on how many there are
    planned = []
    for _, entry in table.iterrows():
        if entry["kind"] != "subset" or entry["scorer"] == "random":
            continue
        ours = members_of(runs, entry["point_key"])  # once per arm, not per comparison
        planned += [(entry, ours, metric, name, base) for metric in metrics
                    for name, base in baselines_for(entry, table)
                    if not (pd.isna(entry[metric]) or pd.isna(base[metric]))]
    iters = bootstrap_resamples(len(planned))
    records = [{"point": entry["point"], "metric": metric, "value": entry[metric],
                "baseline": name, "base_value": base[metric],
                **difference(ours, members_of(runs, base["point_key"]), metric, iters=iters)}
               for entry, ours, metric, name, base in planned]
    frame = pd.DataFrame.from_records(records, columns=COLUMNS[:-2])
    tested = frame["p"].notna()
    frame["p_holm"] = math.nan
    frame.loc[tested, "p_holm"] = holm_adjust(frame.loc[tested, "p"].to_numpy(dtype=float))
    frame["verdict"] = [verdict(row, margin) for _, row in frame.iterrows()]
    return frame[COLUMNS]


def bootstrap_resamples(comparisons: int) -> int:
    """Bootstrap resamples per comparison, enough for Holm over ``comparisons`` to decide.

    A bootstrap p-value cannot fall below ``2 / (B + 1)`` (:func:`lobass.stats.bootstrap_p_value`)
    and Holm multiplies the smallest p by the number of comparisons ``m``: with a fixed
    ``B = 2000``, a report of more than 50 comparisons could call nothing better or worse after
    Holm however large the difference. ``B`` grows so that the smallest adjusted p is ALPHA / 10.
    """
    return max(BOOTSTRAP_ITERS, math.ceil(20 * comparisons / ALPHA))


def difference(ours: pd.DataFrame, base: pd.DataFrame, metric: str, *,
               iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """The difference ours - baseline with the one statistic that fits (module docstring).

    Args:
        ours: the runs (training seeds) of one point.
        base: the runs of the baseline point.
        metric: a metric column.
        iters: bootstrap resamples (:func:`bootstrap_resamples` for a table of comparisons).

    Returns:
        ``method`` (empty when no statistic applies), ``difference``, ``diff_low``,
        ``diff_high``, ``p``, ``n_items`` (NaN unless paired over items) and ``seeds``
        (``"<ours> vs <baseline>"``).

    """
    seeds = f"{len(ours)} vs {len(base)}"
    paired = _paired_matrices(ours, base, metric)
    if paired is not None:
        a, b = paired
        mean, low, high, p = hierarchical_bootstrap_difference(a, b, iters=iters)
        method = ("paired bootstrap over items" if len(a) == len(b) == 1 else
                  "hierarchical bootstrap (seeds, items)")
        return {"method": method, "difference": mean, "diff_low": low, "diff_high": high,
                "n_items": float(a.shape[1]), "seeds": seeds, "p": p}
    a, b = (side.get(metric, pd.Series(dtype=float)).to_numpy(float) for side in (ours, base))
    mean, low, high, p = seed_difference(a, b)
    if math.isnan(low):
        method = ""
    elif min(np.isfinite(a).sum(), np.isfinite(b).sum()) >= 2:
        method = "t over seeds (Welch)"
    else:
        method = "t over seeds (pooled)"
    return {"method": method, "difference": mean, "diff_low": low, "diff_high": high,
            "n_items": math.nan, "seeds": seeds, "p": p}


def _paired_matrices(ours: pd.DataFrame, base: pd.DataFrame,
                     metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(S_ours, N)`` and ``(S_base, N)`` per-row losses on the rows every run scored, or None.

    Only for ``eval/<set>/loss`` metrics whose every run kept ``losses/<set>.jsonl`` in its eval
    artifact, and with at least two shared rows.
    """
    parts = metric.split("/")
    if len(parts) != 3 or parts[2] != "loss":
        return None
    a, b = _row_losses(ours, parts[1]), _row_losses(base, parts[1])
    if a is None or b is None:
        return None
    both = pd.concat([a, b], axis=1, join="inner").dropna().sort_index()  # (N, S_a + S_b)
    if len(both) < 2:
        return None
    values = both.to_numpy().T  # (S_a + S_b, N), items in id order
    return values[: a.shape[1]], values[a.shape[1]:]


def _row_losses(runs: pd.DataFrame, set_name: str) -> pd.DataFrame | None:
    """Per-row losses, one column per run; None when any run lacks the file."""
    files = [d / "losses" / f"{set_name}.jsonl" for d in runs["eval_dir"] if d is not None]
    if runs.empty or len(files) != len(runs) or not all(f.is_file() for f in files):
        return None
    return pd.concat([pd.Series(read_row_losses(f), dtype=float) for f in files], axis=1,
                     join="inner")


def verdict(row: pd.Series, margin: float) -> str:
    """The verdict of one comparison row (module docstring), in the metric's good direction."""
    low, high = row["diff_low"], row["diff_high"]
    if not row["method"] or math.isnan(low) or math.isnan(high):
        return "not tested (no per-row values, no seed spread)"
    if -margin <= low and high <= margin:
        return f"equivalent (±{margin:g})"
    if low > 0 or high < 0:
        better = (row["difference"] > 0) == higher_is_better(row["metric"])
        word = "better" if better else "worse"
        return word if row["p_holm"] < ALPHA else f"{word} (not after Holm)"
    return "inconclusive"
