"""The score stage: every loss the scorers need, each computed once, then one score per row.

One model serves every loss: the reference adapter disabled gives ``L_init`` (and ``L(y)``),
enabled gives ``L_ref``. Each loss is its own resumable, sharded artifact, so ``scorer=loss`` then
``scorer=lobass`` computes ``L_init`` once; the scores of a set of scorers are one more artifact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lobass.artifacts import atomic_write_text, ensure_artifact, fingerprint
from lobass.context import Context, StageResult
from lobass.devices import free_memory
from lobass.jsonrows import jsonl_text, read_jsonl
from lobass.modeling import INFERENCE_ADAPTER, load_adapter, load_model
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
    names = dict.fromkeys([cfg.scorer.name, *cfg.score.extra_scorers])
    return [get_scorer(name) for name in names]


def needs_reference(cfg: DictConfig) -> bool:
    """Whether any of the run's scorers needs ``L_ref``, hence the reference model."""
    return "ref" in needed_losses(run_scorers(cfg))


def scorer_label(cfg: DictConfig) -> str:
    """The scorer's name in a point's identity, marked where its losses differ from the plain one.

    Why: with the end token left out (``score.exclude_eos``), or with ``L_ref`` from a
    cross-fitted reference (``reference.fit=cross_fit``), the scores differ, so the run is a point
    of its own (never pooled over seeds with the plain scorer's runs); a scorer that reads no such
    loss is unchanged.
    """
    name = str(cfg.scorer.name)
    needed = set(needed_losses(run_scorers(cfg)))
    marks = []
    if cfg.score.exclude_eos and needed - set(CHERRY_LOSSES):
        marks.append("EOS excluded")
    if "ref" in needed and cfg.reference.fit == "cross_fit":
        marks.append(f"cross-fit reference, {cfg.reference.folds} folds")
    return f"{name} ({', '.join(marks)})" if marks else name


@dataclass(frozen=True)
class RefAdapter:
    """One reference adapter and the pool rows it gives ``L_ref`` for."""

    adapter: Path  # its ``adapter/`` directory, inside a fine-tune artifact
    rows: list[int]  # pool indices, in pool order
    name: str  # its peft adapter name in the one scoring model


def reference_adapters(reference: StageResult | None, ids: list[str],
                       artifacts_dir: Path) -> list[RefAdapter]:
    """The reference stage's adapters: one for every row, or one per cross-fitting fold.

    A cross-fitted reference (``reference_folds``, ``folds.json``) lists per fold its adapter's
    fine-tune key and the ids it scores: the ids its adapter never trained on.

    Raises:
        ValueError: the folds do not score every pool row exactly once.

    """
    if reference is None:
        return []
    if "reference_adapter" in reference.artifacts:  # in sample: one adapter scores every row
        return [RefAdapter(Path(reference.artifacts["reference_adapter"]), list(range(len(ids))),
                           "default")]
    manifest_path = Path(reference.artifacts["reference_folds"])
    manifest = json.loads(manifest_path.read_text())
    index = {row_id: i for i, row_id in enumerate(ids)}
    # peft names the first adapter it loads "default"; the others get their fold's name
    adapters = [RefAdapter(artifacts_dir / "finetune" / fold["adapter"] / "adapter",
                           sorted(index[row_id] for row_id in fold["scored_ids"]),
                           "default" if f == 0 else f"fold{fold['fold']}")
                for f, fold in enumerate(manifest["per_fold"])]
    scored = sorted(i for a in adapters for i in a.rows)
    if scored != list(range(len(ids))):
        raise ValueError(f"{manifest_path} does not score every pool row exactly once "
                         f"({len(scored)} scored, {len(ids)} rows)")
    return adapters


def score(ctx: Context, reference: StageResult | None) -> StageResult:
    """Losses and scores of every pool row.

    Args:
        ctx: the run's context.
        reference: the reference stage's result (``None`` when no scorer needs ``L_ref``): its
            adapter, or with ``reference.fit=cross_fit`` its folds, each fold's adapter scoring
            the rows it never trained on (batched per fold; ``L_init`` is one pass as before).

    Returns:
        The scores artifact (``scores.jsonl``) with ``score/*`` metrics; the score histogram is
        logged to the tracker. A cross-fitted run's rows name the adapter that gave their
        ``loss_ref`` (``ref_adapter``, a fine-tune key).

    """
    cfg, pool = ctx.cfg, ctx.pool
    scorers = run_scorers(cfg)
    adapters = reference_adapters(reference, pool.ids, ctx.artifacts_dir)
    cross_fit = reference is not None and "reference_folds" in reference.artifacts

    def load() -> Any:  # one model for every loss: the adapters disabled give L_init and L(y)
        model = load_model(cfg.model, ctx.model_path)
        if not adapters:
            return model
        model = load_adapter(model, adapters[0].adapter)
        for extra in adapters[1:]:  # a few MB each: every fold's adapter beside the first
            model.load_adapter(str(extra.adapter), adapter_name=extra.name,
                               **INFERENCE_ADAPTER)  # in the model's dtype, as the first
        return model

    model = LazyModel(load)  # loaded only if some shard is missing
    tok = ctx.tokenizer
    # each loss's rows, built once; score.exclude_eos leaves the end token out of the mean
    inputs = loss_inputs(pool, needed_losses(scorers), tok,
                         exclude_eos=bool(cfg.score.exclude_eos))
    # in sample, every key is what it was before reference.fit existed
    fit = {"fit": "cross_fit", "folds": len(adapters)} if cross_fit else {}
    losses: dict[str, np.ndarray] = {}
    loss_keys: list[Any] = []
    all_reused = True
    metrics: dict[str, float] = {}
    for loss in needed_losses(scorers):  # each loss once, whatever scorers share it
        parts: list[RefAdapter | None] = [*adapters] if loss == "ref" and adapters else [None]
        values = np.full(len(pool.ids), np.nan)
        keys, computed = [], 0.0
        for part in parts:  # the rows each adapter scores (all rows but for cross-fitting)
            rows = part.rows if part else list(range(len(pool.ids)))
            ids = [pool.ids[i] for i in rows]
            # The batch budget, the shard size (rows are batched within a shard) and prefix
            # sharing move losses by ~1e-7 (summation order): in the key, so a cached loss is
            # always exactly what this config computes.
            directory = ctx.artifacts_dir / "losses" / fingerprint({
                **pool.content_key(), "loss": loss,
                "adapter": part.adapter.parent.name if part else None,
                **({**fit, "fold_rows": fingerprint(ids)} if part and fit else {}),
                "max_tokens_per_batch": cfg.score.max_tokens_per_batch,
                "shard_rows": cfg.score.shard_rows,
                "share_prefix": cfg.score.share_prefix, **inputs.keys.get(loss, {})})
            features = inputs.features[loss]
            compute = loss_fn(model, loss, [features[i] for i in rows],
                              max_tokens_per_batch=cfg.score.max_tokens_per_batch,
                              pad_token_id=tok.pad_token_id, share_prefix=cfg.score.share_prefix,
                              adapter=part.name if part and cross_fit else None)
            result = ensure_losses(directory, ids, compute, shard_rows=cfg.score.shard_rows,
                                   desc=f"score loss={loss}" + (f" ({part.name})" if fit and part
                                                                else ""))
            values[rows] = result.values
            all_reused = all_reused and result.reused
            keys.append(directory.name)
            computed += 0.0 if result.reused else float(result.meta["shards_computed"])
        losses[loss] = values
        loss_keys.append(keys if fit and loss == "ref" else keys[0])
        metrics[f"score/{loss}_shards_computed"] = computed
    model.drop()
    free_memory()
    flagged = flag_nonfinite(losses, pool.ids, cfg.score.on_nonfinite,
                             {loss: inputs.expected_nan(loss) for loss in losses})
    metrics.update({
        "score/rows": float(len(pool.ids)), "score/model_loads": float(model.loads),
        "score/truncated": float(sum(f.truncated for f in pool.features)),
        # rows flagged for a non-finite loss (score.on_nonfinite=drop): never selected
        "score/nonfinite": float(flagged.sum()),
    })
    seeded = any(s.name == "random" for s in scorers)
    key = fingerprint({"losses": loss_keys, "scorers": [s.name for s in scorers],
                       "seed": cfg.seed if seeded else None, "rows": pool.rows_fingerprint(),
                       **fit})
    scored_by = {i: a.adapter.parent.name for a in adapters for i in a.rows} if fit else {}

    def build(work: Path) -> dict[str, Any]:
        rows = score_rows(pool.ids, [e.source for e in pool.examples], pool.features, losses,
                          scorers, flagged, cfg.seed, inputs.facts)
        for i, row in enumerate(rows):  # cross-fit: which fold's adapter gave this loss_ref
            if i in scored_by:
                row["ref_adapter"] = scored_by[i]
        atomic_write_text(work / SCORES_FILE, jsonl_text(rows))
        return {"scorers": [s.name for s in scorers], "flagged": int(flagged.sum()), **fit}

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
