"""Many runs -> one report: ``python -m lobass.report DIR`` (a multirun folder, or any folder).

Every run directory under ``DIR`` that holds a ``summary.json`` becomes a row; runs that agree on
everything but the training seed (``summary.json``'s ``point``) pool into one point. Each arm is
compared with its baselines (random at the same size, random matched on tokens, full data) by
one statistic per comparison, with a Holm-adjusted p-value and a verdict read against an
equivalence margin. Outputs: ``report.md``, ``report.csv`` and PNG plots (each metric against the
rows selected with full data and the initial model as horizontal lines; per scorer and source the
score distribution and score against response length; ``L_init`` against ``L_ref``).
``docs/report.md`` explains every table.

Modules, in the order the data flows: ``runs`` (run directories -> a DataFrame), ``points``
(point identity and pooling over seeds), ``compare`` (differences, Holm, verdicts, on
:mod:`lobass.stats`), ``diagnostics`` (composition, overlap, stability, extreme rows), ``render``
(markdown, CSV), ``plots`` (PNG); this module ties them together and uploads to W&B.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from lobass.artifacts import atomic_write_text
from lobass.report import diagnostics
from lobass.report.compare import DEFAULT_MARGIN, compare_to_baselines, difference
from lobass.report.plots import plot_losses, plot_metrics, plot_scores
from lobass.report.points import common_settings, content_lines, pool_over_seeds
from lobass.report.render import Diagnostics, render_csv, render_markdown
from lobass.report.runs import RUN_COLUMNS, collect_runs, headline_metrics

__all__ = ["collect_runs", "difference", "equivalence_margin", "main", "pool_over_seeds",
           "write_report"]

log = logging.getLogger(__name__)


def equivalence_margin(runs: pd.DataFrame, override: float | None = None) -> tuple[float, str]:
    """The margin the verdicts use, and where it came from.

    Args:
        runs: the run table (its ``config`` column: each run's resolved config).
        override: ``--equivalence-margin``; wins over the configs.

    Returns:
        ``(margin, source)``: the flag, else the runs' ``report.equivalence_margin``, else
        :data:`lobass.report.compare.DEFAULT_MARGIN`.

    Raises:
        ValueError: runs disagree on ``report.equivalence_margin``, or a margin is not positive.

    """
    if override is not None:
        margin, source = float(override), "--equivalence-margin"
    else:
        found = {float(m) for c in runs["config"] if isinstance(c, dict) and
                 (m := (c.get("report") or {}).get("equivalence_margin")) is not None}
        if len(found) > 1:
            raise ValueError(f"runs disagree on report.equivalence_margin ({sorted(found)}); "
                             "pass --equivalence-margin to choose one")
        margin, source = ((found.pop(), "config key report.equivalence_margin") if found
                          else (DEFAULT_MARGIN, "default"))
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin} ({source})")
    return margin, source


def write_report(root: Path, *, out: Path | None = None, wandb_project: str | None = None,
                 margin: float | None = None) -> Path:
    """Write ``report.md``, ``report.csv`` and plots for the runs under ``root``.

    Args:
        root: a multirun folder, or any folder holding run directories.
        out: where to write; ``root`` when None.
        wandb_project: also log the tables and plots to this W&B project (``WANDB_MODE``
            decides online or offline).
        margin: equivalence margin; None reads ``report.equivalence_margin`` from the runs'
            ``config.yaml`` or uses the default (:func:`equivalence_margin`).

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
    margin, margin_source = equivalence_margin(runs, margin)
    metrics = headline_metrics({c for c in runs.columns if c not in RUN_COLUMNS})
    table = pool_over_seeds(runs, metrics)
    comparisons = compare_to_baselines(runs, table, metrics, margin)
    # Whole or not at all: every file is made in a staging folder beside the report and moved
    # into place only once all of them exist, so a failing plot leaves neither half the PNGs
    # nor a report.md that names plots which are not there.
    with staged_files(out) as stage:
        plots = plot_metrics(table, metrics, stage)
        score_plots, length_correlation = plot_scores(runs, stage)
        plots += score_plots + plot_losses(runs, stage)
        found = Diagnostics(diagnostics.composition(table, runs), length_correlation,
                            diagnostics.scorer_overlap(table, runs),
                            diagnostics.reference_stability(table, runs),
                            diagnostics.extreme_rows(runs), diagnostics.contamination(runs))
        text = render_markdown(runs, table, comparisons, metrics, plots, margin=margin,
                               margin_source=margin_source, common=common_settings(runs),
                               content=content_lines(runs), diagnostics=found)
        atomic_write_text(stage / "report.csv", render_csv(runs, metrics))
        atomic_write_text(stage / "report.md", text)
    if wandb_project:
        _log_to_wandb(wandb_project, root, runs, table, comparisons, metrics, out, plots)
    log.info("report written to %s", out / "report.md")
    return out / "report.md"


@contextlib.contextmanager
def staged_files(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out`` whose files move into ``out`` when the block succeeds.

    Each file moves with ``os.replace`` (atomic on one file system), ``report.md`` last, so a
    report.md never names a plot that is not there yet; on an exception nothing moves and the
    folder is removed.
    """
    stage = Path(tempfile.mkdtemp(prefix=".report-", suffix=".partial", dir=out))
    try:
        yield stage
        for path in sorted(stage.iterdir(), key=lambda p: (p.name == "report.md", p.name)):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _cells(frame: pd.DataFrame) -> list[list[Any]]:
    """Rows as plain Python values, NaN and NA as None (W&B stores None as an empty cell)."""
    return [[None if v is pd.NA or isinstance(v, float) and math.isnan(v) else v for v in row]
            for row in frame.astype(object).itertuples(index=False)]


def _log_to_wandb(project: str, root: Path, runs: pd.DataFrame, table: pd.DataFrame,
                  comparisons: pd.DataFrame, metrics: Sequence[str], out: Path,
                  plots: Sequence[str]) -> None:
    import wandb

    run = wandb.init(project=project, group=root.name, job_type="report", dir=str(out),
                     name=f"report-{root.name}")
    columns: list[str | int] = ["run", "point", "scorer", "ratio", "count", "seed",
                                "reference_seed", "status", *metrics]
    run.log({"report/runs": wandb.Table(columns=columns, data=_cells(runs[columns]))})
    # the markdown's pooled table: mean, interval bounds and interval kind per metric
    pooled = table.drop(columns=["point_key"]).rename(
        columns={f"{m}_ci_{side}": f"{m} ci_{side}" for m in metrics
                 for side in ("low", "high", "kind")})
    pooled_columns: list[str | int] = list(pooled.columns)
    run.log({"report/points": wandb.Table(columns=pooled_columns, data=_cells(pooled))})
    if not comparisons.empty:
        compared: list[str | int] = list(comparisons.columns)
        run.log({"report/comparisons": wandb.Table(columns=compared,
                                                   data=_cells(comparisons))})
    run.log({f"report/{p}": wandb.Image(str(out / p)) for p in plots})
    run.finish()


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``python -m lobass.report DIR --help`` lists the options)."""
    parser = argparse.ArgumentParser(prog="python -m lobass.report",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("root", type=Path, help="a multirun folder (or any folder of runs)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: root)")
    parser.add_argument("--wandb-project", default=None,
                        help="also log the table and plots to this W&B project (WANDB_MODE "
                             "decides online/offline)")
    parser.add_argument("--equivalence-margin", type=float, default=None,
                        help="verdicts call two points equivalent only when the whole 95%% "
                             "interval of their difference lies within +-M (metric units: nats "
                             "for losses, a share for accuracies and win rates); default: the "
                             f"runs' report.equivalence_margin, else {DEFAULT_MARGIN}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report(args.root, out=args.out, wandb_project=args.wandb_project,
                 margin=args.equivalence_margin)
