"""The select stage: scores -> top-k ids (by ratio or count), exported in the pool's format."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lobass.artifacts import atomic_write_json, atomic_write_text, ensure_artifact, fingerprint
from lobass.context import Context, StageResult
from lobass.data import Example


def selection_size(n_pool: int, ratio: float | None, count: int | None) -> int:
    """How many rows to keep: ``count`` when given, else ``ratio`` of the pool (rounded, >= 1).

    Raises:
        ValueError: neither or both given, a ratio outside (0, 1], or a count outside [1, pool].

    """
    if (ratio is None) == (count is None):
        raise ValueError("set exactly one of selection.ratio and selection.count "
                         f"(got ratio={ratio}, count={count})")
    if count is not None:
        if not 1 <= count <= n_pool:
            raise ValueError(f"selection.count must be in [1, {n_pool}] (the pool size), "
                             f"got {count}")
        return int(count)
    assert ratio is not None
    if not 0 < ratio <= 1:
        raise ValueError(f"selection.ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_pool, math.floor(ratio * n_pool + 0.5)))


def select_top(ids: Sequence[str], scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest finite scores; ties are broken by id so the result is stable.

    Rows with a non-finite score are never selected.

    Raises:
        ValueError: fewer than ``k`` rows have a finite score.

    """
    finite = [i for i in range(len(ids)) if np.isfinite(scores[i])]
    if len(finite) < k:
        raise ValueError(f"only {len(finite)} rows have a finite score; cannot select {k}")
    finite.sort(key=lambda i: (-float(scores[i]), ids[i]))
    return finite[:k]


def export_rows(examples: Sequence[Example]) -> str:
    """The selected rows as JSON Lines in their pool's own format (ready for other trainers)."""
    return "".join(json.dumps(e.raw, ensure_ascii=False) + "\n" for e in examples)


def read_selected_ids(path: Path) -> list[str]:
    """Ids of a ``selected.jsonl`` file, in rank order."""
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line]


def selected_rows(examples: Sequence[Example], chosen: Sequence[int],
                  scores: np.ndarray) -> list[dict[str, Any]]:
    """``selected.jsonl`` rows: rank, id, source and score of every chosen example."""
    return [
        {"rank": rank, "id": examples[i].id, "source": examples[i].source,
         "score": float(scores[i])}
        for rank, i in enumerate(chosen)
    ]


def select(ctx: Context, scored: StageResult) -> StageResult:
    """The select stage: the top ``selection`` rows by score, exported in the pool's own format.

    Args:
        ctx: the run's context.
        scored: the score stage's result (its artifact names the key; its scores rank the rows).

    Returns:
        The selection artifact (``selected.jsonl``, ``export.jsonl``, ``meta.json``) with the
        chosen ids in rank order and ``select/count``.

    """
    cfg, pool = ctx.cfg, ctx.pool
    assert scored.scores is not None
    scores = scored.scores
    k = selection_size(len(pool.examples), cfg.selection.ratio, cfg.selection.count)
    # The export carries each row as stored: its key follows the rows' metadata too.
    key = fingerprint({"scores": scored.directory.name, "k": k, "rows": pool.rows_fingerprint()})

    def build(work: Path) -> dict[str, Any]:
        chosen = select_top(pool.ids, scores, k)
        rows = selected_rows(pool.examples, chosen, scores)
        atomic_write_text(work / "selected.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(work / "export.jsonl", export_rows([pool.examples[i] for i in chosen]))
        atomic_write_json(work / "meta.json", {"count": k, "pool": len(pool.examples),
                                               "ratio": cfg.selection.ratio})
        return {"count": k}

    directory, reused = ensure_artifact(ctx.artifacts_dir / "selection" / key, build)
    ids = read_selected_ids(directory / "selected.jsonl")
    ctx.tracker.log_file("selected", "selection", directory / "selected.jsonl")
    return StageResult(directory, reused, {"select/count": float(len(ids))},
                       {"selected": str(directory / "selected.jsonl")}, ids=ids)
