"""The score stage: every loss the scorers need, each computed once, then one score per row.

One model serves every loss: the reference adapter disabled gives ``L_init`` (and ``L(y)``),
enabled gives ``L_ref``. Each loss is its own resumable, sharded artifact, so ``scorer=loss`` then
``scorer=lobass`` computes ``L_init`` once; the scores of a set of scorers are one more artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lobass.artifacts import atomic_write_text, ensure_artifact, fingerprint
from lobass.context import Context, StageResult
from lobass.devices import free_memory
from lobass.jsonrows import jsonl_text, read_jsonl
from lobass.modeling import load_adapter, load_model
from lobass.scoring.runner import (
    CHERRY_LOSSES,
    LazyModel,
    flag_nonfinite,
    loss_fn,
    loss_inputs,
    score_rows,
)
from lobass.scoring.scorers import Scorer, get_scorer, needed_losses
from lobass.scoring.store import ensure_losses

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"


def run_scorers(cfg: DictConfig) -> list[Scorer]:
    """The run's scorer first, then ``score.extra_scorers`` (written as ``score_<name>``)."""
    names = dict.fromkeys([cfg.scorer.name, *(cfg.score.get("extra_scorers") or [])])
    return [get_scorer(name) for name in names]


def needs_reference(cfg: DictConfig) -> bool:
    """Whether any of the run's scorers needs ``L_ref``, hence the reference model."""
    return "ref" in needed_losses(run_scorers(cfg))


def scorer_label(cfg: DictConfig) -> str:
    """The scorer's name in a point's identity, marked when ``score.exclude_eos`` changed a loss.

    Why: with the end token left out the scores differ, so the run is a point of its own (never
    pooled over seeds with the plain scorer's runs); a scorer that reads no loss is unchanged.
    """
    name = str(cfg.scorer.name)
    changed = set(needed_losses(run_scorers(cfg))) - set(CHERRY_LOSSES)
    return f"{name} (EOS excluded)" if cfg.score.get("exclude_eos", False) and changed else name


def score(ctx: Context, reference_adapter: Path | None) -> StageResult:
    """Losses and scores of every pool row.

    Args:
        ctx: the run's context.
        reference_adapter: the reference's ``adapter/`` directory (``None`` when no scorer needs
            ``L_ref``).

    Returns:
        The scores artifact (``scores.jsonl``) with ``score/*`` metrics; the score histogram is
        logged to the tracker.

    """
    cfg, pool = ctx.cfg, ctx.pool
    scorers = run_scorers(cfg)

    def load() -> Any:  # one model for every loss: the adapter disabled gives L_init and L(y)
        model = load_model(cfg.model, ctx.model_path)
        return load_adapter(model, reference_adapter) if reference_adapter else model

    model = LazyModel(load)  # loaded only if some shard is missing
    tok = ctx.tokenizer
    # each loss's rows, built once; score.exclude_eos leaves the end token out of the mean
    inputs = loss_inputs(pool, needed_losses(scorers), tok,
                         exclude_eos=bool(cfg.score.get("exclude_eos", False)))
    losses: dict[str, np.ndarray] = {}
    loss_keys, all_reused = [], True
    metrics: dict[str, float] = {}
    for loss in needed_losses(scorers):  # each loss once, whatever scorers share it
        # The batch budget, the shard size (rows are batched within a shard) and prefix sharing
        # move losses by ~1e-7 (summation order): in the key, so a cached loss is always exactly
        # what this config computes.
        directory = ctx.artifacts_dir / "losses" / fingerprint({
            **pool.content_key(), "loss": loss,
            "adapter": reference_adapter.parent.name if loss == "ref" and reference_adapter
            else None,
            "max_tokens_per_batch": cfg.score.max_tokens_per_batch,
            "shard_rows": cfg.score.shard_rows,
            "share_prefix": cfg.score.share_prefix, **inputs.keys.get(loss, {})})
        compute = loss_fn(model, loss, inputs.features[loss],
                          max_tokens_per_batch=cfg.score.max_tokens_per_batch,
                          pad_token_id=tok.pad_token_id, share_prefix=cfg.score.share_prefix)
        result = ensure_losses(directory, pool.ids, compute, shard_rows=cfg.score.shard_rows,
                               desc=f"score loss={loss}")
        losses[loss], all_reused = result.values, all_reused and result.reused
        loss_keys.append(directory.name)
        metrics[f"score/{loss}_shards_computed"] = 0.0 if result.reused else float(
            result.meta["shards_computed"])
    model.drop()
    free_memory()
    flagged = flag_nonfinite(losses, pool.ids, cfg.score.on_nonfinite,
                             {loss: inputs.expected_nan(loss) for loss in losses})
    metrics.update({
        "score/rows": float(len(pool.ids)), "score/model_loads": float(model.loads),
        "score/truncated": float(sum(f.truncated for f in pool.features)),
        "score/nonfinite": float(flagged.sum()), "score/skipped": float(flagged.sum()),
    })
    seeded = any(s.name == "random" for s in scorers)
    key = fingerprint({"losses": loss_keys, "scorers": [s.name for s in scorers],
                       "seed": cfg.seed if seeded else None, "rows": pool.rows_fingerprint()})

    def build(work: Path) -> dict[str, Any]:
        rows = score_rows(pool.ids, [e.source for e in pool.examples], pool.features, losses,
                          scorers, flagged, cfg.seed, inputs.facts)
        atomic_write_text(work / SCORES_FILE, jsonl_text(rows))
        return {"scorers": [s.name for s in scorers], "flagged": int(flagged.sum())}

    # Rank 0 writes the one scores artifact; the other ranks wait for it and read it.
    directory, reused = ensure_artifact(ctx.artifacts_dir / "scores" / key, build)
    scores = read_scores(directory)
    ctx.tracker.log_histogram("score/distribution", scores)
    metrics.update(score_stats(scores))
    return StageResult(directory, reused and all_reused, metrics,
                       {"scores": str(directory / SCORES_FILE)}, scores=scores)


def read_scores(directory: Path) -> np.ndarray:
    """``(N,)`` scores of a scores artifact in pool order (NaN for flagged rows)."""
    rows = read_jsonl(directory / SCORES_FILE)
    return np.array([r["score"] if r["score"] is not None else np.nan for r in rows], dtype=float)


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """Mean, std, min and max of the finite scores."""
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return {}
    return {"score/mean": float(finite.mean()), "score/std": float(finite.std()),
            "score/min": float(finite.min()), "score/max": float(finite.max())}
