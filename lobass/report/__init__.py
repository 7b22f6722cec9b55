"""Many runs -> one report: ``python -m lobass.report DIR`` (a multirun folder, or any folder).

Every run directory under ``DIR`` that holds a ``summary.json`` becomes a row; its scorer, ratio and
seed come from the ``config.yaml`` the pipeline writes beside it. Rows of the same (scorer, ratio)
are pooled over seeds with a bootstrap interval. Outputs: ``report.md``, ``report.csv`` and PNG
plots (each metric against the selected fraction with the full-data level as a horizontal line;
the score distribution; score against response length with Spearman's rho).

Modules, in the order the data flows: ``runs`` (run directories -> a DataFrame), ``compare``
(pooling over seeds and verdicts against baselines, on :mod:`lobass.stats`), ``render``
(markdown, CSV), ``plots`` (PNG); this module ties them together and uploads to W&B.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lobass.artifacts import atomic_write_text
from lobass.report.compare import compare_to_baselines, paired_difference, pool_over_seeds
from lobass.report.plots import plot_metrics, plot_scores
from lobass.report.render import render_csv, render_markdown
from lobass.report.runs import RUN_COLUMNS, collect_runs, headline_metrics

__all__ = ["collect_runs", "main", "paired_difference", "pool_over_seeds", "write_report"]

log = logging.getLogger(__name__)


def write_report(root: Path, *, out: Path | None = None, wandb_project: str | None = None) -> Path:
    """Write ``report.md``, ``report.csv`` and plots for the runs under ``root``.

    Args:
        root: a multirun folder, or any folder holding run directories.
        out: where to write; ``root`` when None.
        wandb_project: also log the tables and plots to this W&B project (``WANDB_MODE``
            decides online or offline).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: no run directory under ``root``.

    """
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    runs = collect_runs(root)
    if runs.empty:
        raise FileNotFoundError(f"no summary.json under {root}")
    metrics = headline_metrics({c for c in runs.columns if c not in RUN_COLUMNS})
    table = pool_over_seeds(runs, metrics)
    comparisons = compare_to_baselines(runs, table, metrics)
    plots = plot_metrics(table, metrics, out)
    score_plots, correlations = plot_scores(runs, out)
    text = render_markdown(runs, table, comparisons, metrics, plots + score_plots, correlations)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.csv", render_csv(runs, metrics))
    if wandb_project:
        _log_to_wandb(wandb_project, root, runs, table, metrics, out, plots + score_plots)
    log.info("report written to %s", out / "report.md")
    return out / "report.md"


def _cells(frame: pd.DataFrame) -> list[list[Any]]:
    """Rows as plain Python values, NaN as None (W&B tables store None as an empty cell)."""
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in row]
            for row in frame.astype(object).itertuples(index=False)]


def _log_to_wandb(project: str, root: Path, runs: pd.DataFrame, table: pd.DataFrame,
                  metrics: Sequence[str], out: Path, plots: Sequence[str]) -> None:
    import wandb

    run = wandb.init(project=project, group=root.name, job_type="report", dir=str(out),
                     name=f"report-{root.name}")
    columns: list[str | int] = ["run", "scorer", "ratio", "seed", "status", *metrics]
    run.log({"report/runs": wandb.Table(columns=columns, data=_cells(runs[columns]))})
    # the markdown's pooled table: mean and interval bounds per metric
    pooled = table.rename(columns={f"{m}_ci_{side}": f"{m} ci_{side}"
                                   for m in metrics for side in ("low", "high")})
    pooled_columns: list[str | int] = list(pooled.columns)
    run.log({"report/by_scorer_ratio": wandb.Table(columns=pooled_columns,
                                                   data=_cells(pooled))})
    run.log({f"report/{p}": wandb.Image(str(out / p)) for p in plots})
    run.finish()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lobass.report DIR [--out OUT] [--wandb-project NAME]``."""
    parser = argparse.ArgumentParser(prog="python -m lobass.report",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("root", type=Path, help="a multirun folder (or any folder of runs)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: root)")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and plots to this W&B project (WANDB_MODE "
                             "decides online/offline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report(args.root, out=args.out, wandb_project=args.wandb_project)
