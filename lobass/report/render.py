"""Tables -> text: the markdown report and the per-run CSV."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lobass.report.runs import higher_is_better
from lobass.stats import MIN_BOOTSTRAP_RUNS

POOLED_NOTE = (
    "One row per point (everything but the training seed); initial model and full data first. "
    "`interval` names the kind of each 95% interval: `t, n=<seeds>` is a Student-t interval "
    "over the training seeds' values; `items` is one run's own interval over evaluation items "
    "(normal for losses, bootstrap for win rates, Wilson for accuracies). Intervals of "
    "different kinds are not comparable with each other; the verdicts below never set them "
    "side by side. `steps` are optimizer steps and `tokens trained` response tokens trained "
    "(`train/response_tokens`), means over seeds.")
VERDICT_NOTE = (
    "Difference = arm - baseline (below 0 is better for a loss). Each training run is one "
    "observation: the 95% interval and `p` are a t-test on the per-run values (`method`): "
    "Welch's when both sides have two or more runs; `pooled` when one side has a single run, "
    "whose spread then comes from the other side; `not tested` with one run on each side or no "
    "spread between runs. A run's value is its mean over the items every run of both sides "
    "scored when all kept per-row losses (`items`), else its metric. `runs` is arm vs "
    "baseline. `p (Holm)` adjusts the t-tests' p over every tested row of this table. "
    "`bootstrap` is a secondary view, never read for a verdict: the hierarchical bootstrap "
    "(items, then runs) of the paired per-item differences, shown only with at least "
    f"{MIN_BOOTSTRAP_RUNS} runs per arm (with fewer it shrinks the between-run variance and its "
    "p sits at its floor). Verdict: `equivalent` when the whole 95% interval lies within ± "
    "the margin, `better`/`worse` when it excludes 0 and the Holm-adjusted p < 0.05 (`not "
    "after Holm` when only the raw test passes), else `inconclusive`.")
VERDICT_HEADER = ["point", "metric", "value", "baseline", "baseline value",
                  "difference [95% CI]", "method", "runs", "p", "p (Holm)",
                  f"bootstrap [95% CI], p (>= {MIN_BOOTSTRAP_RUNS} runs/arm)", "verdict"]


@dataclass
class Diagnostics:
    """The diagnostic tables of :mod:`lobass.report.diagnostics` and the score correlations."""

    composition: pd.DataFrame = field(default_factory=pd.DataFrame)
    length_correlation: pd.DataFrame = field(default_factory=pd.DataFrame)
    scorer_overlap: pd.DataFrame = field(default_factory=pd.DataFrame)
    reference_stability: pd.DataFrame = field(default_factory=pd.DataFrame)
    extremes: pd.DataFrame = field(default_factory=pd.DataFrame)
    contamination: pd.DataFrame = field(default_factory=pd.DataFrame)


def fmt(value: Any) -> str:
    """A cell: floats to 4 significant digits, NaN and None as empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def fmt_interval(low: float, high: float) -> str:
    """``[low, high]`` to 4 significant digits, empty when either bound is NaN."""
    return "" if math.isnan(low) or math.isnan(high) else f"[{low:.4g}, {high:.4g}]"


def _cell(value: Any) -> str:
    # a pipe or line break inside a cell would end the cell or the row; tabulate escapes neither
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured pipe table of already formatted cells, by ``DataFrame.to_markdown``.

    ``disable_numparse``: cells are our formatted text (``fmt``); tabulate must not re-format
    ``0.1000``-like strings or align them as numbers.
    """
    frame = pd.DataFrame([[_cell(c) for c in row] for row in rows],
                         columns=[_cell(h) for h in header], dtype=object)
    if frame.empty:  # tabulate drops the header of a table without rows
        return "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return str(frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)) + "\n"


def _table(out: io.StringIO, frame: pd.DataFrame, header: Sequence[str]) -> None:
    out.write(_markdown_table(header, ([fmt(v) for v in row]
                                       for row in frame.itertuples(index=False))))


def render_markdown(runs: pd.DataFrame, table: pd.DataFrame, comparisons: pd.DataFrame,
                    metrics: Sequence[str], plots: Sequence[str], *, margin: float,
                    margin_source: str, common: Sequence[str] = (),
                    content: Sequence[str] = (),
                    diagnostics: Diagnostics | None = None) -> str:
    """The report as markdown: points, verdicts, composition, diagnostics, runs, plots.

    Args:
        runs: the run table of :func:`lobass.report.runs.collect_runs`.
        table: the pooled table of :func:`lobass.report.points.pool_over_seeds`.
        comparisons: :func:`lobass.report.compare.compare_to_baselines`'s table (may be empty).
        metrics: the metric columns, in order.
        plots: image file names beside the report.
        margin: the equivalence margin used.
        margin_source: where it came from (flag, config key or default).
        common: settings shared by every point (left out of the point names).
        content: a line per content key (pool, model): shared, or where the points differ.
        diagnostics: the diagnostic tables.

    Returns:
        The markdown text.

    """
    out = io.StringIO()
    out.write("# lobass report\n\n")
    out.write(f"{len(runs)} runs, {int((runs['status'] == 'failed').sum())} failed, "
              f"{len(table)} points.")
    if common:
        out.write(f" Every point: {', '.join(common)}.")
    for line in content:
        out.write(f"\n\n{line}")
    out.write(f"\n\nEquivalence margin: ±{margin:g} ({margin_source}), in each metric's units: "
              "nats of mean response loss per token for `*/loss`, an absolute share "
              f"({margin * 100:g} percentage points) for accuracies and win rates.\n\n")
    out.write(f"## Points (mean over training seeds, 95% intervals)\n\n{POOLED_NOTE}\n\n")
    header = ["point", "rows", "seeds", "steps", "tokens trained", "interval"]
    for metric in metrics:
        header += [f"{metric} {'↑' if higher_is_better(metric) else '↓'}", "95% CI"]
    rows = []
    for _, entry in table.iterrows():
        kinds = dict.fromkeys(k for m in metrics if (k := entry[f"{m}_ci_kind"]))
        cells = [entry["point"], fmt(entry["rows"]), str(entry["seeds"]), fmt(entry["steps"]),
                 fmt(entry["tokens_trained"]), "; ".join(kinds)]
        for metric in metrics:
            cells += [fmt(entry[metric]),
                      fmt_interval(entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"])]
        rows.append(cells)
    out.write(_markdown_table(header, rows))
    if not comparisons.empty:
        tested = int(comparisons["p"].notna().sum())
        out.write(f"\n## Each arm against its baselines\n\n{VERDICT_NOTE}\n\n"
                  f"{len(comparisons)} comparisons, {tested} tested (Holm over {tested}), "
                  f"{len(comparisons) - tested} not tested.\n\n")
        out.write(_markdown_table(VERDICT_HEADER, (_comparison_cells(c)
                                                   for _, c in comparisons.iterrows())))
    else:
        out.write(f"\n## No comparison\n\n{no_comparison_text(len(table))}\n")
    _diagnostics(out, diagnostics or Diagnostics())
    out.write("\n## Runs\n\n")
    out.write(_markdown_table(["run", "point", "seed", "status"], (
        [run["run"], run["point"], str(run["seed"]),
         run["status"] if not run["error"] else f"failed: {run['error'][:120]}"]
        for _, run in runs.iterrows())))
    if plots:
        out.write("\n## Plots\n\n")
        out.writelines(f"![{p}]({p})\n\n" for p in plots)
    return out.getvalue()


def no_comparison_text(points: int) -> str:
    """Why the report has no verdicts, and the command that gives a report with some.

    Args:
        points: how many points the report pools its runs into.

    Returns:
        One paragraph of markdown.

    """
    why = {0: "No finished point: nothing to compare.",
           1: "One point: nothing to compare."}.get(
        points, f"{points} points, but no arm among them has a baseline here.")
    return (f"{why} A verdict sets a selecting arm against a baseline from the same folder: "
            "random rows at the same size (or matched on tokens), or full data; the initial "
            "model (`train=none`) is shown beside them. For a report with one, run "
            "`bash experiments/quick_compare.sh` (LoBaSS against random, 2 seeds each, and the "
            "initial model; 12.6 min measured on 2 idle CPU cores), or the same by hand: "
            "`python run.py -m experiment=quick_compare scorer=lobass,random seed=0,1`, "
            "`python run.py -m experiment=quick_compare train=none`, then "
            "`python -m lobass.report multirun/quick_compare`.")


def _diagnostics(out: io.StringIO, d: Diagnostics) -> None:
    if not d.contamination.empty:
        out.write("\n## Contamination audit (pool rows overlapping each evaluation set)\n\n"
                  "Exact: same normalised instruction; 13-gram: a shared word 13-gram; counted "
                  "before scoring. `dropped`: removed by `data.decontaminate=true`.\n\n")
        _table(out, d.contamination, ["set", "exact", "13-gram", "overlapping", "dropped",
                                      "runs"])
    if not d.composition.empty:
        out.write("\n## Selection composition (per source, mean over seeds)\n\n")
        _table(out, d.composition, ["point", "source", "rows", "response tokens",
                                    "mean response tokens"])
    if not d.length_correlation.empty:
        out.write("\n## Score against response length (Spearman's rho over the pool)\n\n")
        _table(out, d.length_correlation, ["scorer", "source", "rows", "rho"])
    if not d.scorer_overlap.empty:
        out.write("\n## Scorer overlap (same rule, different scorers)\n\nJaccard of the "
                  "selected rows; Spearman of the two scorers' scores over the pool.\n\n")
        _table(out, d.scorer_overlap, ["point", "against", "rows", "Jaccard", "Spearman"])
    if not d.reference_stability.empty:
        out.write("\n## Reference-seed stability (points that differ only in reference seed)\n\n"
                  "Spearman of the scores over the pool; Jaccard of the top-k selections.\n\n")
        _table(out, d.reference_stability, ["point", "against", "rows (k)", "Jaccard",
                                            "Spearman"])
    if not d.extremes.empty:
        out.write("\n## Highest- and lowest-scored rows per source\n\nRank 1 = highest "
                  "score; prompt and response cut for reading (text re-read from the pool "
                  "with config.yaml's `data`; empty when it cannot be).\n\n")
        _table(out, d.extremes, ["scorer", "source", "end", "rank", "id", "score",
                                 "response tokens", "prompt", "response"])


def _comparison_cells(c: pd.Series) -> list[str]:
    diff = "" if math.isnan(c["difference"]) else (
        f"{c['difference']:+.4g} {fmt_interval(c['diff_low'], c['diff_high'])}").rstrip()
    method = ", ".join([part for part in (
        c["method"], "" if math.isnan(c["df"]) else f"df {c['df']:.3g}",
        "" if math.isnan(c["n_items"]) or not c["method"] else f"{int(c['n_items'])} items")
        if part])
    boot = fmt_interval(c["boot_low"], c["boot_high"])
    boot += f", p {fmt_p(c['boot_p'])}" if boot else ""
    return [c["point"], c["metric"], fmt(c["value"]), c["baseline"], fmt(c["base_value"]), diff,
            method, c["seeds"], fmt_p(c["p"]), fmt_p(c["p_holm"]), boot, c["verdict"]]


def fmt_p(p: float) -> str:
    """A p-value to 2 significant digits; below 0.001 as ``<0.001``; NaN as empty."""
    if math.isnan(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def render_csv(runs: pd.DataFrame, metrics: Sequence[str]) -> str:
    """Every run as one CSV row: identity, status, budget, then the metrics.

    Columns ``run, point, kind, scorer, ratio, count, seed, reference_seed, status, rows,
    steps, tokens_trained`` and the metrics (``rows`` is ``select/count``, ``steps``
    ``train/steps``, ``tokens_trained`` ``train/response_tokens``). Missing values are empty
    cells; lines end in CRLF, as the csv module (and RFC 4180) write them.
    """
    frame = runs.rename(columns={"select/count": "rows", "train/steps": "steps",
                                 "train/response_tokens": "tokens_trained"})
    return frame.reindex(columns=[
        "run", "point", "kind", "scorer", "ratio", "count", "seed", "reference_seed", "status",
        "rows", "steps", "tokens_trained", *metrics]).to_csv(index=False, na_rep="",
                                                             lineterminator="\r\n")
