"""Report plots (matplotlib, headless): each metric against rows selected, score diagnostics."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lobass.report.diagnostics import read_scores
from lobass.stats import rank_correlation

SIZE_FIELDS = ("ratio", "count", "tokens", "band")  # what moves along a line of a metric plot


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def _line(point_key: str) -> tuple[str, str]:
    """(line key, legend label): a point's identity without its size, so a sweep draws a line."""
    key = json.loads(point_key)
    selection = {k: v for k, v in (key.get("selection") or {}).items() if k not in SIZE_FIELDS}
    if selection.get("mode") in ("ratio", "count"):  # both are rows: the x axis is rows
        selection["mode"] = "rows"
    label = str(key.get("scorer"))
    if selection.get("order") == "bottom":
        label += " bottom"
    if selection.get("mode") in ("band", "tokens"):
        label += f" ({selection['mode']})"
    if selection.get("by_source"):
        label += " per source"
    if selection.get("keep_sources"):
        label += " + all " + ",".join(selection["keep_sources"])
    return json.dumps(key | {"selection": selection}, sort_keys=True), label


def plot_metrics(table: pd.DataFrame, metrics: Sequence[str], out: Path) -> list[str]:
    """One PNG per metric: value against rows selected, a line per arm, baselines as lines.

    Error bars are the pooled table's intervals (t over seeds, or one run's interval over items).
    Full data is drawn dashed and the initial model dotted, one horizontal line per such point.

    Args:
        table: the pooled table of :func:`lobass.report.points.pool_over_seeds`.
        metrics: metrics to plot, one file each.
        out: folder for the PNGs.

    Returns:
        The file names written, in ``metrics`` order.

    """
    plt = _pyplot()
    names = []
    subsets = table[(table["kind"] == "subset") & table["rows"].notna()]
    lines: dict[str, tuple[str, list[int]]] = {}
    for index, key in zip(subsets.index, subsets["point_key"], strict=True):
        line, label = _line(key)
        lines.setdefault(line, (label, []))[1].append(index)
    labels = [label for label, _ in lines.values()]
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        sizes: set[float] = set()
        for i, (label, indices) in enumerate(lines.values()):
            points = table.loc[indices]
            points = points[points[metric].notna()].sort_values("rows", kind="stable")
            if points.empty:
                continue
            sizes |= set(points["rows"])
            # a small horizontal offset per line so that error bars at one size stay apart
            dodge = 1.04 ** (i - (len(lines) - 1) / 2)
            y = points[metric].to_numpy()
            err = np.stack([y - points[f"{metric}_ci_low"].to_numpy(),
                            points[f"{metric}_ci_high"].to_numpy() - y])  # (2, points)
            # A summary written before lobass.stats clipped Wilson bounds holds 0 correct with a
            # lower bound of 7e-18: a bar of -7e-18 that matplotlib refuses. Draw it as 0.
            err = np.clip(err, 0.0, None)
            same = labels.count(label) > 1  # two lines read alike: tell them apart by number
            ax.errorbar(points["rows"].to_numpy() * dodge, y, yerr=np.nan_to_num(err),
                        marker="o", capsize=3, label=f"{label} [{i}]" if same else label)
        for style, kind in (("--", "full"), (":", "initial")):
            for _, base in table[(table["kind"] == kind) & table[metric].notna()].iterrows():
                ax.axhline(float(base[metric]), color="k", ls=style, label=base["point"])
        ax.set_xscale("log")
        if sizes:  # room around the dodged points: with one size, autoscaling put them at the edges
            ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.3)
        ax.set_xticks(sorted(sizes), [f"{s:g}" for s in sorted(sizes)])
        ax.minorticks_off()
        ax.set_xlabel("rows selected (log scale)")
        ax.set_ylabel(metric)
        if ax.get_legend_handles_labels()[0]:  # a metric no point has: an empty, quiet plot
            ax.legend(fontsize="small")
        fig.tight_layout()
        name = metric.replace("/", "_") + ".png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def score_files(runs: pd.DataFrame) -> dict[str, Path]:
    """Each scorer's first readable scores file (one scoring pass serves all its points)."""
    per_scorer: dict[str, Path] = {}
    for scorer, path in zip(runs["scorer"], runs["scores_path"], strict=True):
        if path is not None and path.is_file() and scorer not in ("random", ""):
            per_scorer.setdefault(scorer, path)
    return dict(sorted(per_scorer.items()))


def plot_scores(runs: pd.DataFrame, out: Path) -> tuple[list[str], pd.DataFrame]:
    """Per scorer, per source: score histogram and score against response length.

    Random scores are left out (nothing to learn from their shape).

    Args:
        runs: the run table of :func:`lobass.report.runs.collect_runs`.
        out: folder for ``scores_<scorer>.png``.

    Returns:
        The file names, and Spearman's rho of score with response tokens as a frame with
        columns ``scorer, source, rows, spearman`` (source ``all`` for the whole pool first).

    """
    plt = _pyplot()
    names, records = [], []
    for scorer, path in score_files(runs).items():
        scores = read_scores(path)
        parts = [("all", scores)] + ([] if scores["source"].nunique() < 2 else
                                     list(scores.groupby("source", sort=True)))
        fig, axes = plt.subplots(len(parts), 2, figsize=(8, 3 * len(parts)), squeeze=False)
        for row, (source, rows) in enumerate(parts):
            score = rows["score"].to_numpy(float)
            length = rows["n_response_tokens"].to_numpy(float)
            rho = rank_correlation(score, length)
            records.append({"scorer": scorer, "source": source, "rows": len(rows),
                            "spearman": rho})
            axes[row, 0].hist(score[np.isfinite(score)], bins=40)
            axes[row, 0].set_title(f"{scorer}, {source}: score distribution")
            axes[row, 1].scatter(length, score, s=4, alpha=0.5)
            axes[row, 1].set_title(f"{scorer}, {source}: Spearman vs length {rho:.2f}")
            axes[row, 1].set_xlabel("response tokens")
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(scorer)).strip("_")  # "lobass (EOS excluded)"
        names.append(f"scores_{slug}.png")
        fig.savefig(out / names[-1], dpi=120)
        plt.close(fig)
    return names, pd.DataFrame.from_records(records,
                                            columns=["scorer", "source", "rows", "spearman"])


def plot_losses(runs: pd.DataFrame, out: Path) -> list[str]:
    """``L_init`` against ``L_ref`` per row, coloured by source: ``losses_init_ref.png``.

    From the first scores file with both losses (every scorer of one reference shares them);
    ``[]`` when no file has ``L_ref``.
    """
    for path in score_files(runs).values():
        scores = read_scores(path)
        if "loss_ref" not in scores or not scores["loss_ref"].notna().any():
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 5))
        for source, rows in scores.groupby("source", sort=True):
            ax.scatter(rows["loss_init"], rows["loss_ref"], s=4, alpha=0.5, label=str(source))
        top = float(np.nanmax(scores[["loss_init", "loss_ref"]].to_numpy(float)))
        ax.plot([0, top], [0, top], color="k", lw=0.8, label="L_ref = L_init")
        ax.set_xlabel("L_init (initial model, nats per response token)")
        ax.set_ylabel("L_ref (reference)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "losses_init_ref.png", dpi=120)
        plt.close(fig)
        return ["losses_init_ref.png"]
    return []
