"""Reference-free conversation signal: mean response loss on held-out reference answers.

The evaluated model's mean token loss on answers it never trained on (a held-out slice of the
pool, MT-Bench's reference answers) needs no judge, so CPU-sized runs still get a signal that
separates selections; lower is better.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lobass.artifacts import atomic_write_text
from lobass.evaluation.stats import mean_interval


def heldout_loss_metrics(losses: np.ndarray, name: str) -> dict[str, float]:
    """``eval/<name>/loss`` with a normal-approximation 95% interval over rows, and ``n``.

    Rows with a non-finite loss (no response token left after truncation) are left out and so
    not counted in ``n``.
    """
    finite = losses[np.isfinite(losses)]
    if not len(finite):
        return {f"eval/{name}/n": 0.0}
    mean, low, high = mean_interval(finite)
    return {
        f"eval/{name}/loss": mean,
        f"eval/{name}/loss_ci_low": low,
        f"eval/{name}/loss_ci_high": high,
        f"eval/{name}/n": float(len(finite)),
    }


def write_row_losses(path: Path, ids: Sequence[str], losses: np.ndarray) -> None:
    """One ``{"id", "loss"}`` line per row (``null`` when no response token was left).

    Kept beside the means so that two runs can be compared row by row on the same answers: a
    paired difference has a far tighter interval than two independent means over 100 rows.
    """
    atomic_write_text(path, "".join(
        json.dumps({"id": i, "loss": float(v) if math.isfinite(v) else None}) + "\n"
        for i, v in zip(ids, losses.tolist(), strict=True)))


def read_row_losses(path: Path) -> dict[str, float]:
    """The finite per-row losses written by :func:`write_row_losses`, by row id."""
    rows = (json.loads(line) for line in path.read_text().splitlines() if line)
    return {r["id"]: float(r["loss"]) for r in rows if r["loss"] is not None}
