"""Tables -> text: the markdown report and the per-run CSV."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from lobass.report.runs import higher_is_better

POOLED_NOTE = (
    "With several seeds the interval is a bootstrap over the seeds' values (training "
    "randomness); with one run it is that run's own interval over the evaluation items "
    "(normal for losses, bootstrap for win rates, Wilson for accuracies).")
VERDICT_NOTE = (
    "`better`/`worse` compares means in the metric's good direction; `separated` means the two "
    "95% intervals do not overlap, `overlap` that they do (no claim either way). Where both "
    "sides kept per-row losses, the paired column is the mean per-row difference (ours - "
    "baseline; below 0 is better for a loss) over the same rows with a bootstrap 95% interval, "
    "and `(paired)` verdicts ask whether that interval excludes 0.")
VERDICT_HEADER = ["scorer", "ratio", "metric", "value [95% CI]", "baseline",
                  "baseline value [95% CI]", "paired difference [95% CI]", "verdict"]


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, NaN and None as empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def fmt_interval(low: float, high: float) -> str:
    """``[low, high]`` to 4 significant digits, empty when either bound is NaN."""
    return "" if math.isnan(low) or math.isnan(high) else f"[{low:.4g}, {high:.4g}]"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |\n"


def _header(cells: Sequence[str]) -> str:
    return _row(cells) + "|" + "---|" * len(cells) + "\n"


def render_markdown(runs: pd.DataFrame, table: pd.DataFrame, comparisons: pd.DataFrame,
                    metrics: Sequence[str], plots: Sequence[str],
                    correlations: Mapping[str, float] | None = None) -> str:
    """The report as markdown: pooled table, verdicts, every run, plots, score correlations.

    Args:
        runs: the run table of :func:`lobass.report.runs.collect_runs`.
        table: the pooled table of :func:`lobass.report.compare.pool_over_seeds`.
        comparisons: :func:`lobass.report.compare.compare_to_baselines`'s table (may be empty).
        metrics: the metric columns, in order.
        plots: image file names beside the report.
        correlations: Spearman's rho of score with response length, by scorer.

    Returns:
        The markdown text.

    """
    out = io.StringIO()
    out.write("# lobass report\n\n")
    out.write(f"{len(runs)} runs, {int((runs['status'] == 'failed').sum())} failed.\n\n")
    out.write(f"## By scorer and ratio (mean over seeds, bootstrap 95% interval)\n\n"
              f"{POOLED_NOTE}\n\n")
    header = ["scorer", "ratio", "rows", "seeds"]
    for metric in metrics:
        header += [f"{metric} {'↑' if higher_is_better(metric) else '↓'}", "95% CI"]
    out.write(_header(header))
    for _, entry in table.iterrows():
        cells = [entry["scorer"], fmt(entry["ratio"]), fmt(entry["rows"]), str(entry["seeds"])]
        for metric in metrics:
            cells += [fmt(entry[metric]),
                      fmt_interval(entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"])]
        out.write(_row(cells))
    if not comparisons.empty:
        out.write("\n## Each scorer against random at the same ratio and against full data\n\n"
                  f"{VERDICT_NOTE}\n\n")
        out.write(_header(VERDICT_HEADER))
        out.writelines(_row(_comparison_cells(c)) for _, c in comparisons.iterrows())
    out.write("\n## Runs\n\n")
    out.write(_header(["run", "scorer", "ratio", "seed", "status"]))
    for _, run in runs.iterrows():
        status = run["status"] if not run["error"] else f"failed: {run['error'][:120]}"
        out.write(_row([run["run"], run["scorer"], fmt(run["ratio"]), str(run["seed"]), status]))
    if plots:
        out.write("\n## Plots\n\n")
        out.writelines(f"![{p}]({p})\n\n" for p in plots)
    if correlations:
        out.write("Spearman correlation of score with response length: " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(correlations.items())) + "\n")
    return out.getvalue()


def _comparison_cells(c: pd.Series) -> list[str]:
    paired = "" if math.isnan(c["paired_mean"]) else (
        f"{c['paired_mean']:+.4g} {fmt_interval(c['paired_low'], c['paired_high'])} "
        f"(n {int(c['paired_n'])})")
    return [c["scorer"], fmt(c["ratio"]), c["metric"],
            f"{fmt(c['value'])} {fmt_interval(c['ci_low'], c['ci_high'])}", c["baseline"],
            f"{fmt(c['base_value'])} {fmt_interval(c['base_ci_low'], c['base_ci_high'])}",
            paired, c["verdict"]]


def render_csv(runs: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Every run as one CSV row: run, scorer, ratio, count, seed, status, then the metrics.

    Missing values are empty cells; lines end in CRLF, as the csv module (and RFC 4180) write
    them.
    """
    return runs.reindex(columns=["run", "scorer", "ratio", "count", "seed", "status", *metrics]
                        ).to_csv(index=False, na_rep="", lineterminator="\r\n")
