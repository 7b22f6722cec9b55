"""Run directories -> one pandas DataFrame, one row per run, and the metrics worth showing.

A run directory is any folder holding a ``summary.json`` (a finished point) or an ``error.txt``
(a failed one). Its scorer, ratio and seed come from the ``config.yaml`` the pipeline writes
beside them (Hydra's ``.hydra/config.yaml`` when that is absent).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

log = logging.getLogger(__name__)

# The run table's fixed columns; every metric of every summary.json is a further column (NaN
# where a run lacks it), so pooling is a pandas groupby.
RUN_COLUMNS = ["run", "path", "scorer", "ratio", "count", "seed", "status", "error",
               "scores_path", "eval_dir"]

# Metric families shown in the table and plotted when present, in this order: response losses on
# held-out data and reference answers, pairwise judge win rates, benchmark accuracies. Intervals
# (``_ci_low``/``_ci_high``) and counts ride along with their metric and are not columns.
HEADLINE_SUFFIXES = ("/loss", "/win_rate", "_acc")


def collect_runs(root: Path) -> pd.DataFrame:
    """Every run under ``root``, sorted by path.

    Args:
        root: a multirun folder, or any folder holding run directories at any depth.

    Returns:
        One row per run with :data:`RUN_COLUMNS` (``path``, ``scores_path`` and ``eval_dir`` are
        ``Path`` or None; ``ratio`` and ``count`` NaN when unset; ``status`` ``ok`` or
        ``failed``; ``error`` the last line of ``error.txt``) and one float column per metric key
        of the summaries, NaN where a run does not have it.

    """
    candidates = {p.parent for p in root.rglob("summary.json")}
    candidates |= {p.parent for p in root.rglob("error.txt")}
    records = [_read_run(run_dir) for run_dir in sorted(candidates)]
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    metric_columns = [c for c in frame.columns if c not in RUN_COLUMNS]
    frame[["ratio", "count", *metric_columns]] = frame[
        ["ratio", "count", *metric_columns]].astype(float)
    return frame


def _read_run(run_dir: Path) -> dict[str, Any]:
    config = _run_config(run_dir)
    summary = _load_json(run_dir / "summary.json")
    error_file = run_dir / "error.txt"
    metrics = {k: float(v) for k, v in summary.get("metrics", {}).items()}
    artifacts = summary.get("artifacts", {})
    ratio = config.get("selection", {}).get("ratio")
    return {
        "run": run_dir.name,
        "path": run_dir,
        "scorer": str(config.get("scorer", {}).get("name", "?")),
        "ratio": np.nan if ratio is None else float(ratio),
        "count": metrics.get("select/count", np.nan),
        "seed": int(config.get("seed", 0)),
        "status": "failed" if error_file.exists() else "ok",
        "error": error_file.read_text().strip().splitlines()[-1] if error_file.exists() else "",
        "scores_path": Path(artifacts["scores"]) if artifacts.get("scores") else None,
        # holds losses/<set>.jsonl: per-row losses for paired comparisons
        "eval_dir": Path(artifacts["eval"]) if artifacts.get("eval") else None,
        **metrics,
    }


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        # a point killed while writing: the report still lists it, without metrics
        log.warning("unreadable %s: the run is listed without metrics", path)
        return {}
    return data


def _run_config(run_dir: Path) -> dict[str, Any]:
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            config: dict[str, Any] = yaml.safe_load(candidate.read_text()) or {}
            return config
    return {}


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
