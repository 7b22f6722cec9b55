"""Many runs -> one report: ``python -m lobass.report DIR`` (a multirun folder, or any folder).

Every run directory under ``DIR`` that holds a ``summary.json`` becomes a row; its scorer, ratio and
seed come from the ``config.yaml`` the pipeline writes beside it. Rows of the same (scorer, ratio)
are pooled over seeds with a bootstrap interval. Outputs: ``report.md``, ``report.csv`` and PNG
plots (each metric against the selected fraction with the full-data level as a horizontal line;
the score distribution; score against response length with Spearman's rho).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lobass.artifacts import atomic_write_text
from lobass.scoring.store import read_row_losses

log = logging.getLogger(__name__)

# Metric families shown in the table and plotted when present, in this order: response losses on
# held-out data and reference answers, pairwise judge win rates, benchmark accuracies. Intervals
# (``_ci_low``/``_ci_high``) and counts ride along with their metric and are not columns.
HEADLINE_SUFFIXES = ("/loss", "/win_rate", "_acc")


def headline_metrics(present: set[str]) -> list[str]:
    """The ``eval/`` metrics of a sweep worth a column and a plot, held-out loss first."""
    chosen = [m for m in present if m.startswith("eval/") and m.endswith(HEADLINE_SUFFIXES)]

    def order(metric: str) -> tuple[int, int, str]:
        family = next(i for i, s in enumerate(HEADLINE_SUFFIXES) if metric.endswith(s))
        return family, metric != "eval/heldout/loss", metric
    return sorted(chosen, key=order)


def higher_is_better(metric: str) -> bool:
    """Losses fall as a model improves; win rates and accuracies rise."""
    return not metric.endswith("/loss")


@dataclass
class RunRow:
    """One run directory of a sweep."""

    path: Path
    scorer: str
    ratio: float | None
    count: float | None
    seed: int
    status: str  # ok | failed
    metrics: dict[str, float]
    scores_path: Path | None
    error: str = ""
    eval_dir: Path | None = None  # holds losses/<set>.jsonl: per-row losses for paired comparisons


def collect_runs(root: Path) -> list[RunRow]:
    """Every run under ``root``: directories with a ``summary.json`` or an ``error.txt``."""
    rows = []
    candidates = {p.parent for p in root.rglob("summary.json")}
    candidates |= {p.parent for p in root.rglob("error.txt")}
    for run_dir in sorted(candidates):
        config = _run_config(run_dir)
        summary = _load_json(run_dir / "summary.json")
        error_file = run_dir / "error.txt"
        metrics = {k: float(v) for k, v in summary.get("metrics", {}).items()}
        scores = summary.get("artifacts", {}).get("scores")
        eval_dir = summary.get("artifacts", {}).get("eval")
        rows.append(RunRow(
            path=run_dir,
            scorer=str(config.get("scorer", {}).get("name", "?")),
            ratio=config.get("selection", {}).get("ratio"),
            count=metrics.get("select/count"),
            seed=int(config.get("seed", 0)),
            status="failed" if error_file.exists() else "ok",
            metrics=metrics,
            scores_path=Path(scores) if scores else None,
            error=error_file.read_text().strip().splitlines()[-1] if error_file.exists() else "",
            eval_dir=Path(eval_dir) if eval_dir else None,
        ))
    return rows


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data


def _run_config(run_dir: Path) -> dict[str, Any]:
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            config: dict[str, Any] = yaml.safe_load(candidate.read_text()) or {}
            return config
    return {}


def bootstrap_ci(values: Sequence[float], *, iters: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaN, NaN for fewer than two values)."""
    data = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if len(data) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = rng.choice(data, size=(iters, len(data)), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), without a scipy dependency."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # average the ranks of tied values
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return math.nan
    rx, ry = ranks(x[keep]), ranks(y[keep])
    return float(np.corrcoef(rx, ry)[0, 1])


def aggregate(rows: Sequence[RunRow], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (scorer, ratio): mean over seeds, bootstrap 95% interval, number of seeds."""
    groups: dict[tuple[str, float | None], list[RunRow]] = defaultdict(list)
    for row in rows:
        if row.status == "ok":
            groups[(row.scorer, row.ratio)].append(row)
    table = []
    for (scorer, ratio), members in sorted(groups.items(),
                                           key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        entry: dict[str, Any] = {"scorer": scorer, "ratio": ratio, "seeds": len(members),
                                 "count": members[0].count, "runs": members}
        for metric in metrics:
            values = [m.metrics[metric] for m in members if metric in m.metrics]
            if not values:
                continue
            entry[metric] = float(np.mean(values))
            low, high = bootstrap_ci(values)
            if math.isnan(low) and len(values) == 1:  # one seed: the run's own interval
                low = members[0].metrics.get(f"{metric}_ci_low", math.nan)
                high = members[0].metrics.get(f"{metric}_ci_high", math.nan)
            entry[f"{metric}_ci"] = (low, high)
        table.append(entry)
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, tuple):
        return "" if any(math.isnan(v) for v in value) else f"[{value[0]:.4g}, {value[1]:.4g}]"
    return "" if value is None else str(value)


def render_markdown(rows: Sequence[RunRow], table: Sequence[dict[str, Any]],
                    metrics: Sequence[str], plots: Sequence[str]) -> str:
    """The report as markdown: pooled table, every run, failures, plots."""
    out = io.StringIO()
    out.write("# lobass report\n\n")
    out.write(f"{len(rows)} runs, {sum(r.status == 'failed' for r in rows)} failed.\n\n")
    out.write("## By scorer and ratio (mean over seeds, bootstrap 95% interval)\n\n"
              "With several seeds the interval is a bootstrap over the seeds' values (training "
              "randomness); with one run it is that run's own interval over the evaluation items "
              "(normal for losses, bootstrap for win rates, Wilson for accuracies).\n\n")
    header = ["scorer", "ratio", "rows", "seeds"]
    for metric in metrics:
        header += [f"{metric} {'↑' if higher_is_better(metric) else '↓'}", "95% CI"]
    out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    for entry in table:
        cells = [entry["scorer"], _fmt(entry["ratio"]), _fmt(entry["count"]), str(entry["seeds"])]
        for metric in metrics:
            cells += [_fmt(entry.get(metric)), _fmt(entry.get(f"{metric}_ci"))]
        out.write("| " + " | ".join(cells) + " |\n")
    comparisons = compare_to_baselines(table, metrics)
    if comparisons:
        out.write("\n## Each scorer against random at the same ratio and against full data\n\n"
                  "`better`/`worse` compares means in the metric's good direction; `separated` "
                  "means the two 95% intervals do not overlap, `overlap` that they do (no "
                  "claim either way). Where both sides kept per-row losses, the paired column "
                  "is the mean per-row difference (ours - baseline; below 0 is better for a "
                  "loss) over the same rows with a bootstrap 95% interval, and `(paired)` "
                  "verdicts ask whether that interval excludes 0.\n\n| scorer | ratio | metric "
                  "| value [95% CI] | baseline | baseline value [95% CI] | paired difference "
                  "[95% CI] | verdict |\n|---|---|---|---|---|---|---|---|\n")
        out.writelines(comparisons)
    out.write("\n## Runs\n\n| run | scorer | ratio | seed | status |\n|---|---|---|---|---|\n")
    for row in rows:
        status = row.status if not row.error else f"failed: {row.error[:120]}"
        out.write(f"| {row.path.name} | {row.scorer} | {_fmt(row.ratio)} | {row.seed} | "
                  f"{status} |\n")
    if plots:
        out.write("\n## Plots\n\n")
        out.writelines(f"![{p}]({p})\n\n" for p in plots)
    return out.getvalue()


def compare_to_baselines(table: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """Markdown rows: each selecting scorer at each ratio below 1 against the baselines.

    The baselines are random at the same ratio and the full-data run (ratio 1.0 trains on every
    row whichever scorer ranked them, so the first such entry stands for all of them).
    """
    random_at = {e["ratio"]: e for e in table if e["scorer"] == "random"}
    full = [e for e in table if e["ratio"] == 1.0][:1]
    lines = []
    for entry in table:
        if entry["scorer"] == "random" or entry["ratio"] in (None, 1.0):
            continue
        baselines = []
        if entry["ratio"] in random_at:
            seeds = random_at[entry["ratio"]]["seeds"]
            baselines.append((f"random ({seeds} seed{'s' * (seeds != 1)})",
                              random_at[entry["ratio"]]))
        baselines += [("full data", e) for e in full]
        for metric in metrics:
            for name, base in baselines:
                if metric not in entry or metric not in base:
                    continue
                paired = paired_difference(entry["runs"], base["runs"], metric)
                shown = "" if paired is None else f"{paired[0]:+.4g} [{paired[1]:.4g}, " \
                    f"{paired[2]:.4g}] (n {paired[3]})"
                lines.append(f"| {entry['scorer']} | {_fmt(entry['ratio'])} | {metric} | "
                             f"{_fmt(entry[metric])} {_fmt(entry.get(f'{metric}_ci'))} | {name} | "
                             f"{_fmt(base[metric])} {_fmt(base.get(f'{metric}_ci'))} | {shown} | "
                             f"{_verdict(entry, base, metric, paired)} |\n")
    return lines


def paired_difference(ours: Sequence[RunRow], base: Sequence[RunRow], metric: str,
                      ) -> tuple[float, float, float, int] | None:
    """Mean per-row loss difference (ours - baseline) with a bootstrap 95% interval over rows.

    Rows are those both sides scored; each side's row value is the mean over its runs (seeds).
    Only for ``eval/<set>/loss`` metrics whose runs kept per-row losses (``losses/<set>.jsonl``
    in the eval artifact); None otherwise. Pairing removes the between-row variance that makes
    the two independent intervals overlap even when one model is better on nearly every row.
    """
    parts = metric.split("/")
    if len(parts) != 3 or parts[2] != "loss":
        return None

    def per_row(runs: Sequence[RunRow]) -> dict[str, float] | None:
        files = [r.eval_dir / "losses" / f"{parts[1]}.jsonl" for r in runs if r.eval_dir]
        if not runs or len(files) != len(runs) or not all(f.is_file() for f in files):
            return None
        tables = [read_row_losses(f) for f in files]
        shared = set.intersection(*(set(t) for t in tables))
        return {i: float(np.mean([t[i] for t in tables])) for i in shared}

    a, b = per_row(ours), per_row(base)
    if a is None or b is None:
        return None
    ids = sorted(set(a) & set(b))
    if len(ids) < 2:
        return None
    diff = np.array([a[i] - b[i] for i in ids])
    low, high = bootstrap_ci(diff.tolist())
    return float(diff.mean()), low, high, len(ids)


def _verdict(ours: dict[str, Any], base: dict[str, Any], metric: str,
             paired: tuple[float, float, float, int] | None = None) -> str:
    if paired is not None:  # on the shared rows: the sign of the mean difference, and does
        mean, low, high, _ = paired  # its interval exclude zero?
        if mean == 0:
            return "equal (paired)"
        spread = "separated" if low > 0 or high < 0 else "overlap"
        better = (mean > 0) == higher_is_better(metric)
        return f"{'better' if better else 'worse'}, {spread} (paired)"
    a, b = ours[metric], base[metric]
    if a == b:
        return "equal"
    better = (a > b) == higher_is_better(metric)
    lo_a, hi_a = ours.get(f"{metric}_ci", (math.nan, math.nan))
    lo_b, hi_b = base.get(f"{metric}_ci", (math.nan, math.nan))
    if any(math.isnan(v) for v in (lo_a, hi_a, lo_b, hi_b)):
        spread = "no interval"
    else:
        spread = "separated" if hi_a < lo_b or hi_b < lo_a else "overlap"
    return f"{'better' if better else 'worse'}, {spread}"


def render_csv(rows: Sequence[RunRow], metrics: Sequence[str]) -> str:
    """Every run as one CSV row (run, scorer, ratio, count, seed, status, metrics...)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "scorer", "ratio", "count", "seed", "status", *metrics])
    for row in rows:
        writer.writerow([row.path.name, row.scorer, row.ratio, row.count, row.seed, row.status,
                         *[row.metrics.get(m, "") for m in metrics]])
    return out.getvalue()


def plot_metrics(table: Sequence[dict[str, Any]], metrics: Sequence[str], out: Path) -> list[str]:
    """One PNG per metric: value against selected fraction, a line per scorer, full data dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        full = [e for e in table if e["ratio"] == 1.0 and metric in e]
        scorers = sorted({e["scorer"] for e in table})
        ratios: set[float] = set()
        for i, scorer in enumerate(scorers):
            points = sorted((e for e in table if e["scorer"] == scorer and metric in e
                             and e["ratio"] not in (None, 1.0)), key=lambda e: e["ratio"])
            if not points:
                continue
            ratios |= {e["ratio"] for e in points}
            # a small horizontal offset per scorer so that error bars at one ratio stay apart
            dodge = 1.06 ** (i - (len(scorers) - 1) / 2)
            x = [e["ratio"] * dodge for e in points]
            y = [e[metric] for e in points]
            ci = [e.get(f"{metric}_ci", (math.nan, math.nan)) for e in points]
            err = np.array([[yi - lo for yi, (lo, _) in zip(y, ci, strict=True)],
                            [hi - yi for yi, (_, hi) in zip(y, ci, strict=True)]])
            ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label=scorer)
        if full:
            ax.axhline(float(np.mean([e[metric] for e in full])), color="k", ls="--",
                       label="full data")
        ax.set_xscale("log")
        ax.set_xticks(sorted(ratios), [f"{r * 100:g}%" for r in sorted(ratios)])
        ax.minorticks_off()
        ax.set_xlabel("selected share of the pool (log scale)")
        ax.set_ylabel(metric)
        ax.legend()
        fig.tight_layout()
        name = metric.replace("/", "_") + ".png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def plot_scores(rows: Sequence[RunRow], out: Path) -> tuple[list[str], dict[str, float]]:
    """Score distribution and score-vs-length (with Spearman's rho) for each scorer's scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_scorer: dict[str, Path] = {}
    for row in rows:
        if row.scores_path and row.scores_path.is_file() and row.scorer not in ("random",):
            per_scorer.setdefault(row.scorer, row.scores_path)
    if not per_scorer:
        return [], {}
    correlations = {}
    fig, axes = plt.subplots(2, len(per_scorer), figsize=(4 * len(per_scorer), 7), squeeze=False)
    for col, (scorer, path) in enumerate(sorted(per_scorer.items())):
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        score = np.array([r["score"] if r["score"] is not None else np.nan for r in records])
        length = np.array([r.get("n_response_tokens", r["n_tokens"]) for r in records], float)
        rho = spearman(score, length)
        correlations[scorer] = rho
        axes[0, col].hist(score[np.isfinite(score)], bins=40)
        axes[0, col].set_title(f"{scorer}: score distribution")
        axes[1, col].scatter(length, score, s=4, alpha=0.5)
        axes[1, col].set_title(f"{scorer}: Spearman rho vs length = {rho:.2f}")
        axes[1, col].set_xlabel("response tokens")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)
    return ["scores.png"], correlations


def write_report(root: Path, *, out: Path | None = None, wandb_project: str | None = None) -> Path:
    """Write ``report.md``, ``report.csv`` and plots for the runs under ``root``.

    Returns:
        The path of ``report.md``.

    """
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    rows = collect_runs(root)
    if not rows:
        raise FileNotFoundError(f"no summary.json under {root}")
    present = {k for r in rows for k in r.metrics}
    metrics = headline_metrics(present)
    table = aggregate(rows, metrics)
    plots = plot_metrics(table, metrics, out)
    score_plots, correlations = plot_scores(rows, out)
    text = render_markdown(rows, table, metrics, plots + score_plots)
    if correlations:
        text += "Spearman correlation of score with response length: " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(correlations.items())) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.csv", render_csv(rows, metrics))
    if wandb_project:
        _log_to_wandb(wandb_project, root, rows, table, metrics, out, plots + score_plots)
    log.info("report written to %s", out / "report.md")
    return out / "report.md"


def _log_to_wandb(project: str, root: Path, rows: Sequence[RunRow],
                  table: Sequence[dict[str, Any]], metrics: Sequence[str], out: Path,
                  plots: Sequence[str]) -> None:
    import wandb

    run = wandb.init(project=project, group=root.name, job_type="report", dir=str(out),
                     name=f"report-{root.name}")
    columns: list[str | int] = ["run", "scorer", "ratio", "seed", "status", *metrics]
    data = [[r.path.name, r.scorer, r.ratio, r.seed, r.status,
             *[r.metrics.get(m) for m in metrics]] for r in rows]
    run.log({"report/runs": wandb.Table(columns=columns, data=data)})
    pooled_columns: list[str | int] = ["scorer", "ratio", "rows", "seeds"]
    pooled = []
    for entry in table:  # the markdown's pooled table: mean and interval bounds per metric
        cells = [entry["scorer"], entry["ratio"], entry["count"], entry["seeds"]]
        for metric in metrics:
            low, high = entry.get(f"{metric}_ci", (math.nan, math.nan))
            cells += [entry.get(metric), low, high]
        pooled.append(cells)
    for metric in metrics:
        pooled_columns += [metric, f"{metric} ci_low", f"{metric} ci_high"]
    run.log({"report/by_scorer_ratio": wandb.Table(columns=pooled_columns, data=pooled)})
    run.log({f"report/{p}": wandb.Image(str(out / p)) for p in plots})
    run.finish()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lobass.report DIR [--out OUT] [--wandb-project NAME]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a multirun folder (or any folder of runs)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: root)")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and plots to this W&B project (WANDB_MODE "
                             "decides online/offline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report(args.root, out=args.out, wandb_project=args.wandb_project)


if __name__ == "__main__":
    main()
