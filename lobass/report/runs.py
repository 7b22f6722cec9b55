"""Run directories -> one pandas DataFrame, one row per run, and the metrics worth showing.

A run directory is any folder holding a ``summary.json`` (a finished point), an ``error.txt`` (a
failed one) or the ``config.yaml`` a run writes first (a point started: without a summary it was
killed, or is still running, and is listed as failed, never dropped).

What makes a run a point of a study is ``summary.json``'s ``point`` (scorer, selection rule,
training budget, training seed, reference seed); runs written before that key existed fall back
to the ``config.yaml`` beside them (Hydra's ``.hydra/config.yaml`` when that is absent): scorer,
``selection.ratio`` or ``selection.count``, and seed. The training seed is the only thing that
may differ between runs pooled into one point (see :mod:`lobass.report.points`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lobass.report.points import CONTENT_KEYS, identity_columns, label_points

log = logging.getLogger(__name__)

# The run table's fixed columns; every metric of every summary.json is a further column (NaN
# where a run lacks it), so pooling is a pandas groupby on ``point_key``.
RUN_COLUMNS = ["run", "path", "kind", "point", "point_key", *CONTENT_KEYS, "scorer", "mode",
               "ratio", "count",
               "tokens", "band", "listed", "length_control", "order", "by_source", "keep_sources",
               "epochs",
               "max_steps", "seed", "reference_seed", "status", "error", "scores_path",
               "selected_path", "eval_dir", "config"]

# Metric families shown in the table and plotted when present, in this order: response losses on
# held-out data and reference answers, the same without each answer's first and last token,
# pairwise judge win rates, benchmark accuracies, mean generated answer length. Intervals
# (``_ci_low``/``_ci_high``) and counts ride along with their metric and are not columns.
HEADLINE_SUFFIXES = ("/loss", "/loss_trimmed", "/win_rate", "_acc", "/gen_len_tokens")
LOWER_IS_BETTER = ("/loss", "/loss_trimmed")


def collect_runs(root: Path) -> pd.DataFrame:
    """Every run under ``root``, sorted by path.

    Args:
        root: a multirun folder, or any folder holding run directories at any depth.

    Returns:
        One row per run with :data:`RUN_COLUMNS` (``kind`` ``initial``, ``full`` or ``subset``;
        ``point`` a readable label and ``point_key`` the identity without the training seed, as
        text; ``pool`` and ``model`` the content keys of the pool and the initial model, None for
        a failed run; ``path``, ``scores_path``, ``selected_path`` and ``eval_dir`` ``Path`` or
        None; ``ratio``, ``count`` and ``tokens`` NaN when unset; ``status`` ``ok`` or ``failed``;
        ``error`` the last line of ``error.txt`` or why the run did not finish; ``config`` the
        run's resolved config as a dict)
        and one float column per metric key of the summaries, NaN where a run does not have it.

    """
    candidates = {p.parent for p in root.rglob("summary.json")}
    candidates |= {p.parent for p in root.rglob("error.txt")}
    candidates |= {p.parent for p in root.rglob("config.yaml") if _is_run_config(p)}
    records = [_read_run(run_dir) for run_dir in sorted(candidates)]
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    metric_columns = [c for c in frame.columns if c not in RUN_COLUMNS]
    numeric = ["ratio", "count", "tokens", *metric_columns]
    frame[numeric] = frame[numeric].astype(float)
    # integers that may be missing (None): pandas' nullable Int64 keeps "0", not "0.0"
    frame[["reference_seed", "max_steps"]] = frame[["reference_seed", "max_steps"]].astype(
        "Int64")
    return label_points(frame)


def _is_run_config(path: Path) -> bool:
    """A run's own ``config.yaml`` (resolved, with ``stages``), not W&B's or Hydra's copy."""
    if path.parent.name == ".hydra":
        return False
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and "stages" in config and "_wandb" not in config


def _read_run(run_dir: Path) -> dict[str, Any]:
    config = _run_config(run_dir)
    summary, unfinished = _read_summary(run_dir / "summary.json")
    error_file = run_dir / "error.txt"
    if error_file.exists():
        status, error = "failed", error_file.read_text().strip().splitlines()[-1:] or [""]
    else:
        status, error = ("failed", [unfinished]) if unfinished else ("ok", [""])
    metrics = {k: float(v) for k, v in summary.get("metrics", {}).items()}
    artifacts = summary.get("artifacts", {})
    point = summary.get("point") or _point_from_config(config)
    if status == "failed":  # pooled with nothing; a config cannot give the content keys
        point = {**point, **dict.fromkeys(CONTENT_KEYS)}
    return {
        "run": run_dir.name,
        "path": run_dir,
        **identity_columns(point, metrics),
        "status": status,
        "error": error[0],
        "scores_path": _path(artifacts.get("scores")),
        "selected_path": _path(artifacts.get("selected")),
        # holds losses/<set>.jsonl: per-row losses for paired comparisons
        "eval_dir": _path(artifacts.get("eval")),
        "config": config,
        **metrics,
    }


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _point_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run written before ``summary.json`` had ``point``: scorer, ratio or count, seed.

    Such runs predate the pool's and the model's content keys too: their names stand in for
    them (``data.name`` with ``data.max_rows``, ``model.name``), None when the config has none.
    """
    selection = config.get("selection") or {}
    ratio, count = selection.get("ratio"), selection.get("count")
    data = config.get("data") or {}
    pool = None if data.get("name") is None else f"{data['name']} (max_rows={data.get('max_rows')})"
    return {"pool": pool, "model": (config.get("model") or {}).get("name"),
            "scorer": str((config.get("scorer") or {}).get("name", "?")),
            "selection": {"mode": "ratio" if ratio is not None else "count", "ratio": ratio,
                          "count": count},
            "train": None, "seed": int(config.get("seed", 0)), "reference_seed": None}


def _read_summary(path: Path) -> tuple[dict[str, Any], str]:
    """The summary, and why the run did not finish (empty when it did).

    A run writes ``summary.json`` last (a partial one beside ``error.txt`` when it fails) and
    removes an earlier attempt's at its start, so a run dir without one, or with one that is
    unreadable or has no ``point`` (what a run records on success), ended abnormally: killed
    (SIGKILL, a node lost) or still running.
    """
    if not path.is_file():
        return {}, "killed or still running: no summary.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("unreadable %s: the run is listed as failed, without metrics", path)
        return {}, "killed or still running: summary.json is unreadable"
    if "point" in data and not data["point"]:  # legacy summaries have no "point" at all
        return data, "killed or still running: summary.json is partial (no point)"
    return data, ""


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
    """Losses fall as a model improves; win rates and accuracies rise.

    Answer length (``gen_len_tokens``) counts as rising: the endpoint asks whether a selection
    of short rows taught the model to stop early, so longer reads as better, not as "wordier".
    """
    return not metric.endswith(LOWER_IS_BETTER)
