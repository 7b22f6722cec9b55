"""What makes a run a point of a study, a readable name for it, and pooling over training seeds.

A point is everything in ``summary.json``'s ``point`` but the training seed: the pool and the
initial model (each by its content key, so two ``data=jsonl`` files or two checkpoints under one
name stay apart), scorer, selection rule (mode, ratio or count or token budget or band, order,
per-source settings), training budget and reference seed. Two runs pool (as seeds of one point)
only when all of that agrees, so a sweep over ``selection.count=800,3120`` gives two points,
never one point with two "seeds".

Two kinds of point are baselines rather than arms: the initial model (``train=none``: no scorer,
selection or budget) and the full data (a selection that kept every pool row, whichever scorer
ranked it: the same rows train the same model). A full-data point keeps its training budget in
its identity, so full data at matched steps and full data trained as the reference was stay
apart.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lobass.stats import t_interval

log = logging.getLogger(__name__)

KIND_ORDER = {"initial": 0, "full": 1, "subset": 2}  # baselines first in every table


def identity_columns(point: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
    """The run-table columns of one run's ``point`` (see :func:`lobass.report.runs.collect_runs`).

    Args:
        point: ``summary.json``'s ``point`` (or the legacy fallback built from ``config.yaml``).
        metrics: the run's metrics (``select/count`` and ``data/pool_rows`` tell full data).

    Returns:
        ``kind``, ``point_key`` (the identity without the seed, as sorted JSON), ``pool`` and
        ``model`` (content keys; None when unknown), the selection's fields, ``epochs``,
        ``max_steps``, ``seed`` and ``reference_seed``; ``point`` is filled in later by
        :func:`label_points`, which needs the whole sweep.

    """
    selection = point.get("selection") or {}
    train = point.get("train")
    band = selection.get("band")
    ratio = selection.get("ratio")
    kept_all = metrics.get("select/count", math.nan) == metrics.get("data/pool_rows", math.nan)
    key: dict[str, Any]
    if point.get("scorer") is None and train is None and not selection:
        kind, key = "initial", {"kind": "initial"}
    elif ratio == 1.0 or kept_all:
        kind, key = "full", {"kind": "full", "train": train}
    else:
        kind, key = "subset", {"kind": "subset", "scorer": point.get("scorer"),
                               "selection": selection or None, "train": train,
                               "reference_seed": point.get("reference_seed"),
                               "reference_recipe": point.get("reference_recipe")}
    # another pool or initial model is another experiment, whatever the rest says
    data = {key: point.get(key) for key in CONTENT_KEYS}
    return {
        "kind": kind, "point": "", "point_key": json.dumps(key | data, sort_keys=True), **data,
        "scorer": point.get("scorer") or "", "mode": selection.get("mode") or "",
        "ratio": math.nan if ratio is None else float(ratio),
        "count": math.nan if selection.get("count") is None else float(selection["count"]),
        "tokens": math.nan if selection.get("tokens") is None else float(selection["tokens"]),
        "band": f"{band[0]:g}-{band[1]:g}" if band else "",
        "listed": Path(str(selection.get("listed") or "")).name,
        "length_control": length_control(selection),
        "order": selection.get("order") or "", "by_source": bool(selection.get("by_source")),
        "keep_sources": ",".join(selection.get("keep_sources") or ()),
        "epochs": None if train is None else train.get("epochs"),
        "max_steps": None if train is None else train.get("max_steps"),
        "seed": int(point.get("seed") or 0), "reference_seed": point.get("reference_seed")}


def length_control(selection: dict[str, Any]) -> str:
    """The selection's length control in words ("" for none): part of the point's name."""
    if selection.get("mode") == "length_matched":
        return f"length-matched to {str(selection.get('matched') or '').split('@')[0]}"
    parts = ["residual on log length"] if selection.get("rank") == "residual_length" else []
    if selection.get("stratify") == "length":
        parts.append(f"within {selection.get('length_bins')} length bins")
    return ", ".join(parts)


def _budget(run: pd.Series) -> str:
    # pandas may hold the budget as float with NaN for runs without one
    steps, epochs = run["max_steps"], run["epochs"]
    if not pd.isna(steps) and steps > 0:
        return f"{steps:g} steps"
    if not pd.isna(epochs):
        return f"{epochs:g} epoch{'s' * (epochs != 1)}"
    return ""


# in name order
PARTS = ("order", "by_source", "keep", "budget", "reference", "model", "pool", "recipe", "eval")
# What each content key of a point stands for, as the report says when points differ in it.
CONTENT_KEYS = {
    "pool": "the pool: every row as read (content, source, raw record) and how its text becomes "
            "tokens (data.max_length, model.template)",
    "model": "the initial model: its files' content (or pinned revision), dtype, attention",
    "recipe": "the training recipe, budget aside: learning rate, LoRA rank and targets, batch "
              "size, ... of train (the reference's, where read, is the scorer's)",
    "eval": "the evaluation: its sets (by content), sizes and generation settings"}


def short_key(value: str) -> str:
    """``name-<16 hex>`` (a content key) as ``name-<6 hex>``; any other value as it is."""
    name, _, digest = value.rpartition("-")
    return f"{name}-{digest[:6]}" if name and len(digest) == 16 else value


def _parts(run: pd.Series) -> dict[str, str | None]:
    """The name and each part of a point's name (None: the part does not apply to this kind)."""
    content = {k: f"{k} {short_key(str(run[k]))}" if isinstance(run[k], str) else None
               for k in CONTENT_KEYS}
    if run["kind"] == "initial":
        return dict.fromkeys(PARTS, None) | content | {"name": "initial model"}
    if run["mode"] == "listed":  # a peer's selection (selection.listed): the file names it
        size = f"listed {run['listed']}"
    elif run["mode"] == "length_matched":  # as many rows as the selection it matches
        size = ""
    elif run["mode"] == "band":
        size = f"band {run['band']}"
    elif run["mode"] == "tokens":
        size = f"{run['tokens']:.0f} tokens"
    elif run["mode"] == "count":
        size = f"{run['count']:.0f} rows"
    else:
        size = f"ratio {run['ratio']:g}" if not math.isnan(run["ratio"]) else "no selection"
    subset = run["kind"] == "subset"
    ref = run["reference_seed"]
    control = run.get("length_control") or ""
    if control:  # the arm's length control names it ("... (residual on log length)")
        size = f"{size} ({control})" if size else control
    return {"name": f"{run['scorer']} {size}" if subset else "full data",
            "order": run["order"] if subset else None,
            "by_source": ("per source" if run["by_source"] else "") if subset else None,
            "keep": (f"+ all {run['keep_sources']}" if run["keep_sources"] else "")
            if subset else None,
            "budget": _budget(run),
            # a scorer without L_ref has no reference seed: not a difference between points
            "reference": None if not subset or pd.isna(ref) else f"reference seed {ref:.0f}",
            **content}


def _values(parts: list[dict[str, str | None]], key: str) -> set[str]:
    return {p[key] for p in parts if p[key] is not None}  # type: ignore[misc]


def label_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Fill ``point``: the name plus each part (order, budget, ...) that varies in the sweep.

    A part shared by every run it applies to (every point trains 3 epochs, say) is left out of
    the names; :func:`common_settings` states it once instead.
    """
    parts = [_parts(run) for _, run in runs.iterrows()]
    varying = [k for k in PARTS if len(_values(parts, k)) > 1]
    runs = runs.copy()
    runs["point"] = [" · ".join([str(p["name"]), *(str(p[k]) for k in varying if p[k])])
                     for p in parts]
    return runs


def content_lines(runs: pd.DataFrame) -> list[str]:
    """Per content key (pool, model) of the finished runs, a line: the one value, or the values.

    Runs that differ in one are separate points (never seeds of one) and each arm is compared
    only with baselines of its own pool and model (:func:`lobass.report.compare.baselines_for`);
    the line names the field, so a reader sees why one label became several points.
    """
    ok = runs[runs["status"] == "ok"]
    lines = []
    for key, meaning in CONTENT_KEYS.items():
        values = [short_key(v) for v in sorted({v for v in ok[key] if isinstance(v, str)})]
        if len(values) == 1:
            lines.append(f"Every point has `{key}` {values[0]}.")
        elif values:
            lines.append(f"Points differ in `{key}` ({meaning}): {', '.join(values)}. They are "
                         "kept apart, never pooled as seeds, and each arm is compared only with "
                         f"baselines of its own {key}.")
    return lines


def common_settings(runs: pd.DataFrame) -> list[str]:
    """The parts of the point names that every run shares (said once above the tables).

    Pool and model are left to :func:`content_lines`, which says them with their meaning.
    """
    parts = [_parts(run) for _, run in runs.iterrows()]
    return [v for k in PARTS for v in _values(parts, k)
            if len(_values(parts, k)) == 1 and v and k not in CONTENT_KEYS]


def pool_over_seeds(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per point over the finished runs: mean over training seeds and a 95% interval.

    With two or more seeds the interval is a Student-t interval over the seeds' values (training
    randomness; ``<metric>_ci_kind`` says ``t, n=<seeds>``); with one seed it is that run's own
    interval over evaluation items from its summary (``items``: normal for losses, bootstrap for
    win rates, Wilson for accuracies).

    Args:
        runs: the table of :func:`lobass.report.runs.collect_runs`.
        metrics: metric columns to pool.

    Returns:
        Columns ``point, point_key, kind, scorer, mode, ratio, count, tokens, rows, seeds, steps,
        tokens_trained, selected_tokens`` then ``<metric>, <metric>_ci_low, <metric>_ci_high,
        <metric>_ci_kind`` per metric (NaN where no run of the point has the metric), baselines
        first (initial model, full data), then by rows selected, scorer and name.

    """
    ok = runs[runs["status"] == "ok"]
    fixed = ["point", "point_key", "kind", "scorer", "mode", "ratio", "count", "tokens"]
    columns = [*fixed, "rows", "seeds", "steps", "tokens_trained", "selected_tokens"] + [
        f"{m}{suffix}" for m in metrics for suffix in ("", "_ci_low", "_ci_high", "_ci_kind")]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    records = []
    for key, members in ok.groupby("point_key", sort=False):
        members = members_of(ok, str(key))
        first = members.iloc[0]
        record: dict[str, Any] = {c: first[c] for c in fixed}
        record |= {"rows": _mean(members, "select/count"), "seeds": len(members),
                   "steps": _mean(members, "train/steps"),
                   "tokens_trained": _mean(members, "train/response_tokens"),
                   "selected_tokens": _mean(members, "select/response_tokens")}
        for metric in metrics:
            record |= _pooled(members, metric)
        records.append(record)
    table = pd.DataFrame.from_records(records)
    order = table.assign(_kind=table["kind"].map(KIND_ORDER), _rows=table["rows"].fillna(0))
    order = order.sort_values(["_kind", "_rows", "scorer", "point"], kind="stable").index
    return table.loc[order, columns].reset_index(drop=True)


def _mean(members: pd.DataFrame, column: str) -> float:
    if column not in members:
        return math.nan
    values = members[column].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _pooled(members: pd.DataFrame, metric: str) -> dict[str, Any]:
    values = members[metric].dropna()
    values = values[np.isfinite(values)]
    out: dict[str, Any] = {metric: math.nan, f"{metric}_ci_low": math.nan,
                           f"{metric}_ci_high": math.nan, f"{metric}_ci_kind": ""}
    if len(values) >= 2:
        mean, low, high = t_interval(values.to_numpy())
        return out | {metric: mean, f"{metric}_ci_low": low, f"{metric}_ci_high": high,
                      f"{metric}_ci_kind": f"t, n={len(values)}"}
    if len(values) == 1:  # one seed: the run's own interval over the evaluation items
        run = members.loc[values.index[0]]
        low = float(run.get(f"{metric}_ci_low", math.nan))
        high = float(run.get(f"{metric}_ci_high", math.nan))
        return out | {metric: float(values.iloc[0]), f"{metric}_ci_low": low,
                      f"{metric}_ci_high": high,
                      f"{metric}_ci_kind": "" if math.isnan(low) else "items"}
    return out


def members_of(runs: pd.DataFrame, point_key: str) -> pd.DataFrame:
    """The finished runs of one point, one per training seed.

    Two runs of one point with the same seed train the same model (the full data ranked by two
    scorers, or a point run twice): they are one seed, not two, and the first (by path) stands
    for both.
    """
    members = runs[(runs["status"] == "ok") & (runs["point_key"] == point_key)]
    unique = members.drop_duplicates("seed", keep="first")
    if len(unique) < len(members):
        log.info("point %s: %d runs share a training seed with another run; counted once (%s)",
                 members["point"].iloc[0], len(members) - len(unique),
                 ", ".join(sorted(set(members["run"]) - set(unique["run"]))))
    return unique
