"""Glue between the score stage and the engine: one model, inputs per loss, non-finite check.

The model is loaded lazily, on the first shard that needs computing, so a run whose loss artifacts
are all complete never loads a model. It is loaded once: ``init`` and ``uncond`` disable the
reference adapter, ``ref`` enables it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lobass.artifacts import fingerprint
from lobass.formatting import IGNORE_INDEX, Features, response_only
from lobass.pool import Pool
from lobass.scoring.cherry import cherry_fields, cherry_passes
from lobass.scoring.engine import adapter_state, compute_response_losses
from lobass.scoring.store import ComputeFn
from lobass.shared_prefix import shared_prefix_length

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


CHERRY_LOSSES = ("ifd_cond", "ifd_alone")


@dataclass(frozen=True)
class LossInputs:
    """The rows each loss is computed on, and per-row facts the scorers need beside losses."""

    features: dict[str, list[Features]]  # loss -> one Features per pool row
    facts: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. ifd_fits: (N,) bool
    # loss -> what its inputs depend on beyond the pool's content key (its cache key adds it)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    def expected_nan(self, loss: str) -> np.ndarray:
        """Rows whose ``loss`` is NaN by construction: Cherry's passes with no answer token.

        Cherry's ``data_by_IFD.py`` skips such rows (a prompt that fills ``max_length``); so does
        ``scorer=ifd``, so their NaN is no fault for ``score.on_nonfinite`` to act on.
        """
        rows = self.features[loss]
        if loss not in CHERRY_LOSSES:
            return np.zeros(len(rows), dtype=bool)
        return np.array([f.n_response == 0 for f in rows], dtype=bool)


def loss_inputs(pool: Pool, losses: Sequence[str], tokenizer: Any,
                exclude_eos: bool = False) -> LossInputs:
    """The inputs of each loss, built once for every loss of the run.

    ``init`` and ``ref`` score the pool's rows, ``uncond`` their responses alone after one start
    token, ``ifd_cond`` and ``ifd_alone`` Cherry LLM's two passes (:mod:`lobass.scoring.cherry`).
    With ``exclude_eos`` the pool's rows leave their end-of-response token out of the mean
    (``score.exclude_eos``; see :func:`without_end_token`).

    Raises:
        ValueError: a Cherry loss is asked for while ``model.template`` is not ``alpaca``.

    """
    features: dict[str, list[Features]] = {}
    facts: dict[str, np.ndarray] = {}
    keys: dict[str, dict[str, Any]] = {}
    if set(CHERRY_LOSSES) & set(losses):
        if pool.tokens_key["template"] != "alpaca":
            raise ValueError(
                "scorer=ifd is Cherry LLM's IFD, computed on Cherry's Alpaca prompt, but "
                f"model.template={pool.tokens_key['template']} trains on another; set "
                "model.template=alpaca, or use scorer=ifd_chat (L(y|x) / L(y) in the model's "
                "own template)")
        passes = cherry_passes(pool.examples, tokenizer, pool.tokens_key["max_length"])
        features.update(ifd_cond=passes.cond, ifd_alone=passes.alone)
        facts["ifd_fits"] = passes.fits
        # Cherry reads a row's raw instruction/input split, which its content id does not hold.
        fields = fingerprint([cherry_fields(e) for e in pool.examples])
        keys = {loss: {"cherry_fields": fields} for loss in CHERRY_LOSSES}
    # L(y) of ifd_chat: BOS gives the first response token something to be predicted from.
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for loss in losses:
        if loss == "uncond":
            features[loss] = [response_only(f, start) for f in pool.features]
        elif loss not in CHERRY_LOSSES:
            features[loss] = list(pool.features)
        if exclude_eos and loss not in CHERRY_LOSSES:
            features[loss] = [without_end_token(f) for f in features[loss]]
            keys[loss] = {"exclude_eos": True}
    return LossInputs(features, facts, keys)


def without_end_token(features: Features) -> Features:
    """The row with its end-of-response token (EOS / end of turn) left out of the loss.

    Why it matters: that token weighs 1/n in the mean loss of an n-token answer and is learned
    first, so a short answer's loss falls fastest, which favours short rows under any loss-drop
    score. A truncated row has no end token (its response was cut) and a one-token response would
    be left with none, so both stay as they are.
    """
    if features.truncated or features.n_response < 2:
        return features
    labels = [*features.labels[:-1], IGNORE_INDEX]
    return Features(features.input_ids, labels, features.n_prompt, features.truncated)


def loss_fn(model: LazyModel, loss: str, features: Sequence[Features], *, max_tokens_per_batch: int,
            pad_token_id: int, share_prefix: bool, adapter: str | None = None) -> ComputeFn:
    """The shard function of one loss: losses of the given rows with the adapter set for it.

    The shared prefix is measured once over all the given rows (not per shard), so every shard,
    on any rank, in any run, encodes the same prefix and gets the same numbers. ``adapter`` names
    the peft adapter to activate first, when the model holds several (a cross-fitted
    reference's folds); ``None`` leaves the model's adapter as it is.
    """
    prefix = shared_prefix_length(features) if share_prefix else 0

    def compute(rows: list[int], progress: Callable[[int], None]) -> np.ndarray:
        current = model.get()
        if adapter is not None:
            current.set_adapter(adapter)
        with adapter_state(current, loss):
            return compute_response_losses(
                current, [features[i] for i in rows], max_tokens_per_batch=max_tokens_per_batch,
                pad_token_id=pad_token_id, prefix_length=prefix, progress=progress)

    return compute


def flag_nonfinite(losses: dict[str, np.ndarray], ids: Sequence[str],
                   on_nonfinite: str, expected: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Rows with a NaN or infinite loss, which must never be scored or selected silently.

    Args:
        losses: loss name -> ``(N,)`` values.
        ids: row ids (named in the message).
        on_nonfinite: ``error`` raises, ``drop`` logs a warning and lets the caller drop them.
        expected: loss name -> ``(N,)`` bool rows whose NaN is by construction
            (:meth:`LossInputs.expected_nan`): not flagged; the scorers that read them leave
            those rows unscored.

    Returns:
        ``(N,)`` bool mask of flagged rows.

    Raises:
        ValueError: some row is non-finite and ``on_nonfinite`` is ``error``.

    """
    expected = expected or {}
    unexpected = {name: ~np.isfinite(v) & ~expected.get(name, np.zeros(len(v), dtype=bool))
                  for name, v in losses.items()}
    bad = np.zeros(len(ids), dtype=bool)
    for rows in unexpected.values():
        bad |= rows
    if bad.any():
        first = [ids[i] for i in np.flatnonzero(bad)[:5]]
        which = {name: int(rows.sum()) for name, rows in unexpected.items()}
        if on_nonfinite == "error":
            raise ValueError(f"{int(bad.sum())} rows have a non-finite loss {which} (first ids: "
                             f"{first}); set score.on_nonfinite=drop to flag them, count them "
                             "and never select them")
        log.warning("score.on_nonfinite=drop: %d rows with a non-finite loss %s are flagged and "
                    "will not be selected (first ids: %s)", int(bad.sum()), which, first)
    return bad


def score_rows(ids: Sequence[str], sources: Sequence[str], features: Sequence[Features],
               losses: dict[str, np.ndarray], scorers: Sequence[Any], flagged: np.ndarray,
               seed: int, facts: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """``scores.jsonl`` rows: lengths, every loss, the first scorer's ``score`` and the others'.

    Flagged (non-finite) rows keep their flag and get no score, so they are never selected.
    ``facts`` (:attr:`LossInputs.facts`) reach the scorers beside the losses.
    """
    n_response = np.array([f.n_response for f in features])
    inputs = {**losses, **(facts or {})}
    values = {}
    for scorer in scorers:
        values[scorer.name] = np.asarray(scorer.compute(inputs, n_response, seed), dtype=np.float64)
        values[scorer.name][flagged] = np.nan

    def number(value: float) -> float | None:
        return float(value) if np.isfinite(value) else None

    rows = []
    for i, (row_id, source, f) in enumerate(zip(ids, sources, features, strict=True)):
        row: dict[str, Any] = {"id": row_id, "source": source, "n_tokens": len(f.input_ids),
                               "n_response_tokens": f.n_response, "truncated": f.truncated}
        for loss in ("init", "ref", "uncond", *CHERRY_LOSSES):
            if loss in losses or loss in ("init", "ref"):  # loss_init / loss_ref always present
                row[f"loss_{loss}"] = number(losses[loss][i]) if loss in losses else None
        row["score"] = number(values[scorers[0].name][i])
        row.update({f"score_{s.name}": number(values[s.name][i]) for s in scorers[1:]})
        if flagged[i]:
            row["nonfinite"] = True
        rows.append(row)
    return rows
