"""Glue between the score stage and the engine: one model, inputs per loss, non-finite check.

The model is loaded lazily, on the first shard that needs computing, so a run whose loss artifacts
are all complete never loads a model. It is loaded once: ``init`` and ``uncond`` disable the
reference adapter, ``ref`` enables it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lobass.formatting import Features, response_only
from lobass.scoring.engine import adapter_state, compute_response_losses, shared_prefix_length
from lobass.scoring.store import ComputeFn

log = logging.getLogger(__name__)


class LazyModel:
    """Calls ``load`` on first use only and keeps the model for every later loss."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._model: Any = None
        self.loads = 0

    def get(self) -> Any:
        """The model, loaded now if it was not yet."""
        if self._model is None:
            self._model = self._load()
            self.loads += 1
        return self._model

    def drop(self) -> None:
        """Forget the model (the caller then frees its memory); a later ``get`` loads it again."""
        self._model = None


def loss_features(features: Sequence[Features], loss: str, start_token_id: int) -> list[Features]:
    """The inputs of a loss: the pool's rows, or their responses alone for ``uncond``."""
    if loss == "uncond":
        return [response_only(f, start_token_id) for f in features]
    return list(features)


def loss_fn(model: LazyModel, loss: str, features: Sequence[Features], *, max_tokens_per_batch: int,
            pad_token_id: int, share_prefix: bool) -> ComputeFn:
    """The shard function of one loss: losses of the given rows with the adapter set for it.

    The shared prefix is measured once over the whole pool (not per shard), so every shard, on
    any rank, in any run, encodes the same prefix and gets the same numbers.
    """
    prefix = shared_prefix_length(features) if share_prefix else 0

    def compute(rows: list[int], progress: Callable[[int], None]) -> np.ndarray:
        current = model.get()
        with adapter_state(current, loss):
            return compute_response_losses(
                current, [features[i] for i in rows], max_tokens_per_batch=max_tokens_per_batch,
                pad_token_id=pad_token_id, prefix_length=prefix, progress=progress)

    return compute


def flag_nonfinite(losses: dict[str, np.ndarray], ids: Sequence[str],
                   on_nonfinite: str) -> np.ndarray:
    """Rows with a NaN or infinite loss, which must never be scored or selected silently.

    Args:
        losses: loss name -> ``(N,)`` values.
        ids: row ids (named in the message).
        on_nonfinite: ``error`` raises, ``drop`` logs a warning and lets the caller drop them.

    Returns:
        ``(N,)`` bool mask of flagged rows.

    Raises:
        ValueError: some row is non-finite and ``on_nonfinite`` is ``error``.

    """
    bad = np.zeros(len(ids), dtype=bool)
    for values in losses.values():
        bad |= ~np.isfinite(values)
    if bad.any():
        first = [ids[i] for i in np.flatnonzero(bad)[:5]]
        which = {name: int((~np.isfinite(v)).sum()) for name, v in losses.items()}
        if on_nonfinite == "error":
            raise ValueError(f"{int(bad.sum())} rows have a non-finite loss {which} (first ids: "
                             f"{first}); set score.on_nonfinite=drop to flag them, count them "
                             "and never select them")
        log.warning("score.on_nonfinite=drop: %d rows with a non-finite loss %s are flagged and "
                    "will not be selected (first ids: %s)", int(bad.sum()), which, first)
    return bad


def score_rows(ids: Sequence[str], sources: Sequence[str], features: Sequence[Features],
               losses: dict[str, np.ndarray], scorers: Sequence[Any], flagged: np.ndarray,
               seed: int) -> list[dict[str, Any]]:
    """``scores.jsonl`` rows: lengths, every loss, the first scorer's ``score`` and the others'.

    Flagged (non-finite) rows keep their flag and get no score, so they are never selected.
    """
    n_response = np.array([f.n_response for f in features])
    values = {}
    for scorer in scorers:
        values[scorer.name] = np.asarray(scorer.compute(losses, n_response, seed), dtype=np.float64)
        values[scorer.name][flagged] = np.nan

    def number(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    rows = []
    for i, (row_id, source, f) in enumerate(zip(ids, sources, features, strict=True)):
        row: dict[str, Any] = {"id": row_id, "source": source, "n_tokens": len(f.input_ids),
                               "n_response_tokens": f.n_response, "truncated": f.truncated}
        for loss in ("init", "ref", "uncond"):
            if loss in losses or loss != "uncond":  # loss_init / loss_ref always present
                row[f"loss_{loss}"] = number(losses[loss][i]) if loss in losses else None
        row["score"] = number(values[scorers[0].name][i])
        row.update({f"score_{s.name}": number(values[s.name][i]) for s in scorers[1:]})
        if flagged[i]:
            row["nonfinite"] = True
        rows.append(row)
    return rows
