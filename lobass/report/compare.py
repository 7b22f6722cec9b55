"""Pool runs over seeds and compare each scorer against its baselines (tables, not text).

The statistics themselves live in :mod:`lobass.stats`; this module decides which values they are
applied to: seeds within a (scorer, ratio) point, and per-row eval losses shared by two points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lobass.artifacts import read_row_losses
from lobass.report.runs import higher_is_better
from lobass.stats import bootstrap_interval

POINT = ["scorer", "ratio"]  # what makes a point of the sweep; seeds pool within it


def pool_over_seeds(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (scorer, ratio) over the finished runs: mean over seeds and a 95% interval.

    With two or more seeds the interval is a percentile bootstrap over the seeds' values
    (training randomness); with one value it is that run's own interval over evaluation items
    (``<metric>_ci_low``/``_ci_high`` from its summary).

    Args:
        runs: the table of :func:`lobass.report.runs.collect_runs`.
        metrics: metric columns to pool.

    Returns:
        Columns ``scorer, ratio, rows, seeds`` then ``<metric>, <metric>_ci_low,
        <metric>_ci_high`` per metric (NaN where no run of the point has the metric), sorted by
        ratio (count-only points first) then scorer.

    """
    ok = runs[runs["status"] == "ok"]
    columns = [*POINT, "rows", "seeds"] + [
        f"{m}{suffix}" for m in metrics for suffix in ("", "_ci_low", "_ci_high")]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    # dropna=False: a count sweep has no ratio, and its points must still be rows
    groups = ok.groupby(POINT, dropna=False, sort=False)
    table = groups.agg(rows=("count", lambda s: s.iloc[0]), seeds=("run", "size"))
    for metric in metrics:
        table[metric] = groups[metric].mean()
        interval = groups.apply(lambda g, m=metric: _seed_interval(g, m), include_groups=False)
        table[f"{metric}_ci_low"] = interval.map(lambda bounds: bounds[0])
        table[f"{metric}_ci_high"] = interval.map(lambda bounds: bounds[1])
    table = table.reset_index()
    order = table.assign(_key=table["ratio"].fillna(0)).sort_values(
        ["_key", "scorer"], kind="stable").index
    return table.loc[order, columns].reset_index(drop=True)


def _seed_interval(point: pd.DataFrame, metric: str) -> tuple[float, float]:
    values = point[metric].dropna()
    finite = values[np.isfinite(values)]
    if len(finite) >= 2:
        return bootstrap_interval(finite.to_numpy())
    if len(values) == 1:  # one seed: the run's own interval over the evaluation items
        run = point.loc[values.index[0]]
        return (float(run.get(f"{metric}_ci_low", math.nan)),
                float(run.get(f"{metric}_ci_high", math.nan)))
    return math.nan, math.nan


def compare_to_baselines(runs: pd.DataFrame, table: pd.DataFrame,
                         metrics: Sequence[str]) -> pd.DataFrame:
    """Each selecting scorer at each ratio below 1 against its baselines, one row per metric.

    The baselines are random at the same ratio and the full-data run (ratio 1.0 trains on every
    row whichever scorer ranked them, so the first such point stands for all of them).

    Args:
        runs: the run table (for per-row losses).
        table: the pooled table of :func:`pool_over_seeds`.
        metrics: metrics to compare.

    Returns:
        Columns ``scorer, ratio, metric, value, ci_low, ci_high, baseline, base_value,
        base_ci_low, base_ci_high, paired_mean, paired_low, paired_high, paired_n, verdict``;
        the paired columns are NaN where either side lacks per-row losses.

    """
    random_at = {e["ratio"]: e for _, e in table[table["scorer"] == "random"].iterrows()}
    full = [e for _, e in table[table["ratio"] == 1.0].iterrows()][:1]
    records = []
    for _, entry in table.iterrows():
        if entry["scorer"] == "random" or pd.isna(entry["ratio"]) or entry["ratio"] == 1.0:
            continue
        baselines = []
        if entry["ratio"] in random_at:
            seeds = int(random_at[entry["ratio"]]["seeds"])
            baselines.append((f"random ({seeds} seed{'s' * (seeds != 1)})",
                              random_at[entry["ratio"]]))
        baselines += [("full data", e) for e in full]
        for metric in metrics:
            for name, base in baselines:
                if pd.isna(entry[metric]) or pd.isna(base[metric]):
                    continue
                paired = paired_difference(_members(runs, entry), _members(runs, base), metric)
                records.append({
                    "scorer": entry["scorer"], "ratio": entry["ratio"], "metric": metric,
                    "value": entry[metric], "ci_low": entry[f"{metric}_ci_low"],
                    "ci_high": entry[f"{metric}_ci_high"], "baseline": name,
                    "base_value": base[metric], "base_ci_low": base[f"{metric}_ci_low"],
                    "base_ci_high": base[f"{metric}_ci_high"],
                    **dict(zip(("paired_mean", "paired_low", "paired_high", "paired_n"),
                               paired or (math.nan,) * 4, strict=True)),
                    "verdict": verdict(entry, base, metric, paired)})
    return pd.DataFrame.from_records(records)


def _members(runs: pd.DataFrame, point: pd.Series) -> pd.DataFrame:
    """The finished runs of one pooled point."""
    ratio = runs["ratio"]
    same_ratio = (ratio == point["ratio"]) | (ratio.isna() & pd.isna(point["ratio"]))
    return runs[(runs["status"] == "ok") & (runs["scorer"] == point["scorer"]) & same_ratio]


def paired_difference(ours: pd.DataFrame, base: pd.DataFrame, metric: str,
                      ) -> tuple[float, float, float, int] | None:
    """Mean per-row loss difference (ours - baseline) with a bootstrap 95% interval over rows.

    Rows are those both sides scored; each side's row value is the mean over its runs (seeds).
    Only for ``eval/<set>/loss`` metrics whose runs kept per-row losses (``losses/<set>.jsonl``
    in the eval artifact); None otherwise. Pairing removes the between-row variance that makes
    the two independent intervals overlap even when one model is better on nearly every row.

    Args:
        ours: the runs of one point (rows of the run table).
        base: the runs of the baseline point.
        metric: an ``eval/<set>/loss`` metric; any other gives None.

    Returns:
        ``(mean, low, high, n_rows)``, or None without per-row losses on both sides or with
        fewer than two shared rows.

    """
    parts = metric.split("/")
    if len(parts) != 3 or parts[2] != "loss":
        return None
    a, b = _row_means(ours, parts[1]), _row_means(base, parts[1])
    if a is None or b is None:
        return None
    diff = (a - b).dropna().sort_index()  # (rows both sides scored,) in id order
    if len(diff) < 2:
        return None
    low, high = bootstrap_interval(diff.to_numpy())
    return float(diff.mean()), low, high, len(diff)


def _row_means(runs: pd.DataFrame, set_name: str) -> pd.Series | None:
    """Per-row loss averaged over the runs, on the rows every run scored; None if any lacks it."""
    files = [d / "losses" / f"{set_name}.jsonl" for d in runs["eval_dir"] if d is not None]
    if runs.empty or len(files) != len(runs) or not all(f.is_file() for f in files):
        return None
    per_run = [pd.Series(read_row_losses(f), dtype=float) for f in files]
    return pd.concat(per_run, axis=1, join="inner").mean(axis=1)


def verdict(ours: pd.Series, base: pd.Series, metric: str,
            paired: tuple[float, float, float, int] | None = None) -> str:
    """``better``/``worse`` in the metric's good direction, and whether the intervals separate.

    With a paired difference the verdict reads its sign and whether its interval excludes 0;
    otherwise it sets the two points' own 95% intervals side by side.
    """
    if paired is not None:
        mean, low, high, _ = paired
        if mean == 0:
            return "equal (paired)"
        spread = "separated" if low > 0 or high < 0 else "overlap"
        better = (mean > 0) == higher_is_better(metric)
        return f"{'better' if better else 'worse'}, {spread} (paired)"
    a, b = ours[metric], base[metric]
    if a == b:
        return "equal"
    better = (a > b) == higher_is_better(metric)
    bounds = [ours[f"{metric}_ci_low"], ours[f"{metric}_ci_high"],
              base[f"{metric}_ci_low"], base[f"{metric}_ci_high"]]
    if any(math.isnan(v) for v in bounds):
        spread = "no interval"
    else:
        lo_a, hi_a, lo_b, hi_b = bounds
        spread = "separated" if hi_a < lo_b or hi_b < lo_a else "overlap"
    return f"{'better' if better else 'worse'}, {spread}"
