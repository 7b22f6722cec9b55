"""Report plots (matplotlib, headless): metrics against the selected share, score diagnostics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lobass.stats import rank_correlation


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(table: pd.DataFrame, metrics: Sequence[str], out: Path) -> list[str]:
    """One PNG per metric: value against selected fraction, a line per scorer, full data dashed.

    Args:
        table: the pooled table of :func:`lobass.report.compare.pool_over_seeds`.
        metrics: metrics to plot, one file each.
        out: folder for the PNGs.

    Returns:
        The file names written, in ``metrics`` order.

    """
    plt = _pyplot()
    names = []
    scorers = sorted(table["scorer"].unique())
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
        present = table[table[metric].notna()]
        full = present[present["ratio"] == 1.0]
        ratios: set[float] = set()
        for i, scorer in enumerate(scorers):
            points = present[(present["scorer"] == scorer) & present["ratio"].notna()
                             & (present["ratio"] != 1.0)].sort_values("ratio", kind="stable")
            if points.empty:
                continue
            ratios |= set(points["ratio"])
            # a small horizontal offset per scorer so that error bars at one ratio stay apart
            dodge = 1.06 ** (i - (len(scorers) - 1) / 2)
            y = points[metric].to_numpy()
            err = np.stack([y - points[f"{metric}_ci_low"].to_numpy(),
                            points[f"{metric}_ci_high"].to_numpy() - y])  # (2, points)
            ax.errorbar(points["ratio"].to_numpy() * dodge, y, yerr=np.nan_to_num(err),
                        marker="o", capsize=3, label=scorer)
        if not full.empty:
            ax.axhline(float(full[metric].mean()), color="k", ls="--", label="full data")
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


def plot_scores(runs: pd.DataFrame, out: Path) -> tuple[list[str], dict[str, float]]:
    """Score distribution and score against response length for each scorer's scores.

    Random scores are left out (nothing to learn from their shape); each scorer's first run
    with a readable scores file stands for it (one scoring pass serves all its points).

    Args:
        runs: the run table of :func:`lobass.report.runs.collect_runs`.
        out: folder for ``scores.png``.

    Returns:
        ``(["scores.png"], {scorer: Spearman rho of score with response tokens})``, or
        ``([], {})`` when no run has scores.

    """
    per_scorer: dict[str, Path] = {}
    for scorer, path in zip(runs["scorer"], runs["scores_path"], strict=True):
        if path is not None and path.is_file() and scorer != "random":
            per_scorer.setdefault(scorer, path)
    if not per_scorer:
        return [], {}
    plt = _pyplot()
    correlations = {}
    fig, axes = plt.subplots(2, len(per_scorer), figsize=(4 * len(per_scorer), 7), squeeze=False)
    for col, (scorer, path) in enumerate(sorted(per_scorer.items())):
        score, length = _read_scores(path)
        rho = rank_correlation(score, length)
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


def _read_scores(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(score, response tokens)``, each ``(N,)``; NaN scores where a row has none."""
    rows = pd.DataFrame.from_records(
        [json.loads(line) for line in path.read_text().splitlines() if line])
    # a score file without response-token counts falls back to the row's total tokens
    length = rows.get("n_response_tokens", rows["n_tokens"]).fillna(rows["n_tokens"])
    return rows["score"].astype(float).to_numpy(), length.astype(float).to_numpy()
