"""Each arm against its baselines: one difference, one kind of interval, one verdict per row.

Which statistic (all from :mod:`lobass.stats`): each training run is one observation (issue 28).

- Primary, the one the verdict reads: a t-test on the per-run values, Welch's when both sides
  have two or more runs, the pooled-variance test when one side has a single run (the other
  side's spread then stands for both). A run's value is its mean over the items every run of
  both sides scored when all kept per-row losses for an ``eval/<set>/loss`` metric (the same
  prompts on both sides, so prompt effects cancel in the difference), else the run's metric.
- Secondary, shown beside it and never read for a verdict: the hierarchical bootstrap of the
  paired per-item differences (items, then each side's runs), only with at least
  :data:`lobass.stats.MIN_BOOTSTRAP_RUNS` runs per arm; with fewer it shrinks the between-run
  variance and its p sits at its floor.
- One run on each side, or no spread between runs: not tested. One run's per-item interval says
  how well that run was measured, not how another training run of the arm would do.

The verdict reads the difference's 95% interval against ``margin`` (same units as the metric):
``equivalent`` when the whole interval lies inside ``[-margin, margin]``; ``better``/``worse`` when
it excludes 0 and the Holm-adjusted p-value over every tested comparison of the report is below
0.05 (``(not after Holm)`` when only the unadjusted test passes); ``inconclusive`` otherwise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from lobass.artifacts import read_row_losses
from lobass.report.points import CONTENT_KEYS, members_of
from lobass.report.runs import higher_is_better
from lobass.stats import (
    MIN_BOOTSTRAP_RUNS,
    hierarchical_bootstrap_difference,
    holm_adjust,
    run_difference,
)

DEFAULT_MARGIN = 0.02  # nats of mean response loss; 2 percentage points of accuracy or win rate
ALPHA = 0.05  # family-wise error rate the Holm column is read at
BOOTSTRAP_ITERS = 2000  # resamples of the secondary bootstrap (its p is never Holm-adjusted)

COLUMNS = ["point", "metric", "value", "baseline", "base_value", "method", "difference",
           "diff_low", "diff_high", "df", "n_items", "seeds", "p", "boot_low", "boot_high",
           "boot_p", "p_holm", "verdict"]


def _key(point_key: str) -> dict[str, Any]:
    key: dict[str, Any] = json.loads(point_key)
    return key


def baselines_for(entry: pd.Series, table: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The baselines of one arm: random at the same size, random matched on tokens, full data.

    Random at the same size shares the arm's selection rule (order and ranking aside: a random
    bottom-k, or random residualised on length, is still random) and training budget. A random
    arm with a token budget equal to the arm's selected response tokens is its token-matched
    control. Every full-data point is a baseline (full data at matched steps and full data
    trained as the reference was are both listed).
    """
    ours = _key(entry["point_key"])
    found = []
    for _, base in table.iterrows():
        key = _key(base["point_key"])
        if any(key.get(k) != ours.get(k) for k in CONTENT_KEYS):
            continue  # another pool, model, recipe or eval: another experiment, not a baseline
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
    # what the arm ranks by (its order, its score or the score less a length fit) is no part of
    # the random baseline's rule: random at the same size is every ranked arm's baseline
    return {k: v for k, v in selection.items() if k not in ("order", "rank")}


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
        applies), the difference (ours - baseline) with its 95% interval and degrees of freedom,
        the items and runs it rests on, raw p, the secondary bootstrap (``boot_*``, NaN below
        :data:`lobass.stats.MIN_BOOTSTRAP_RUNS` runs per arm), the Holm-adjusted p and the
        verdict.

    """
    planned = []
    for _, entry in table.iterrows():
        if entry["kind"] != "subset" or entry["scorer"] == "random":
            continue
        ours = members_of(runs, entry["point_key"])  # once per arm, not per comparison
        planned += [(entry, ours, metric, name, base) for metric in metrics
                    for name, base in baselines_for(entry, table)
                    if not (pd.isna(entry[metric]) or pd.isna(base[metric]))]
    records = [{"point": entry["point"], "metric": metric, "value": entry[metric],
                "baseline": name, "base_value": base[metric],
                **difference(ours, members_of(runs, base["point_key"]), metric)}
               for entry, ours, metric, name, base in planned]
    frame = pd.DataFrame.from_records(records, columns=COLUMNS[:-2])
    tested = frame["p"].notna()
    frame["p_holm"] = math.nan
    frame.loc[tested, "p_holm"] = holm_adjust(frame.loc[tested, "p"].to_numpy(dtype=float))
    frame["verdict"] = [verdict(row, margin) for _, row in frame.iterrows()]
    return frame[COLUMNS]


def difference(ours: pd.DataFrame, base: pd.DataFrame, metric: str, *,
               iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """The difference ours - baseline over runs, with the secondary bootstrap where it applies.

    Args:
        ours: the runs (training seeds) of one point.
        base: the runs of the baseline point.
        metric: a metric column.
        iters: resamples of the secondary bootstrap.

    Returns:
        ``method`` (empty when no statistic applies), ``difference``, ``diff_low``,
        ``diff_high``, ``df``, ``p`` (the t-test over runs, module docstring), ``n_items`` (the
        shared items each run's value averages; NaN without per-row values), ``seeds``
        (``"<ours> vs <baseline>"`` runs) and ``boot_low``, ``boot_high``, ``boot_p`` (NaN
        unless per-row values and :data:`lobass.stats.MIN_BOOTSTRAP_RUNS` runs on each side).

    """
    paired = _paired_matrices(ours, base, metric)
    if paired is not None:  # each run's mean over the items every run scored
        a, b = paired[0].mean(axis=1), paired[1].mean(axis=1)  # (S_ours,), (S_base,)
    else:
        a, b = (side.get(metric, pd.Series(dtype=float)).to_numpy(float) for side in (ours, base))
    found = run_difference(a, b)
    runs = min(np.isfinite(a).sum(), np.isfinite(b).sum())
    method = ("" if math.isnan(found.low) else
              "Welch t over runs" if runs >= 2 else "pooled t over runs (one run on a side)")
    boot = [math.nan] * 3
    if paired is not None and runs >= MIN_BOOTSTRAP_RUNS:
        boot = list(hierarchical_bootstrap_difference(*paired, iters=iters)[1:])
    return {"method": method, "difference": found.difference, "diff_low": found.low,
            "diff_high": found.high, "df": found.df,
            "n_items": math.nan if paired is None else float(paired[0].shape[1]),
            "seeds": f"{len(ours)} vs {len(base)}", "p": found.p,
            **dict(zip(("boot_low", "boot_high", "boot_p"), boot, strict=True))}


def _paired_matrices(ours: pd.DataFrame, base: pd.DataFrame,
                     metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(S_ours, N)`` and ``(S_base, N)`` per-row losses on the rows every run scored, or None.

    Only for ``eval/<set>/loss`` metrics whose every run kept ``losses/<set>.jsonl`` in its eval
    artifact, and with at least two shared rows.
    """
    parts = metric.split("/")
    if len(parts) != 3 or parts[2] != "loss" or "eval_dir" not in ours or "eval_dir" not in base:
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
        return "not tested (no spread between runs)"
    if -margin <= low and high <= margin:
        return f"equivalent (±{margin:g})"
    if low > 0 or high < 0:
        better = (row["difference"] > 0) == higher_is_better(row["metric"])
        word = "better" if better else "worse"
        return word if row["p_holm"] < ALPHA else f"{word} (not after Holm)"
    return "inconclusive"
