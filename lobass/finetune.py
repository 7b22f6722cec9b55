"""The fine-tune artifact: one kind for the reference model and for every selection's model.

A fine-tune is keyed on what changes its weights and nothing else: the rows trained on (their
content ids, in order), how they are tokenised, the recipe without its bookkeeping fields, the
seed, the LoRA targets and the initial model. So the full-data model *is* the reference whenever
their recipes and seeds agree, by content addressing alone, and ``train.logging_steps=1`` reuses
a model that was trained with other logging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lobass import distributed
from lobass.artifacts import atomic_write_json, ensure_artifact, fingerprint
from lobass.context import Context, StageResult
from lobass.devices import check_device, free_memory, weight_sharding
from lobass.model_card import write_adapter_card
from lobass.modeling import load_model
from lobass.schema.specs import TrainSpec
from lobass.schema.walk import without_defaults
from lobass.tracking import TrainingCurves
from lobass.training import (
    rows_per_pass,
    shares_prefix,
    train_lora,
    training_arguments,
    training_plan,
)

log = logging.getLogger(__name__)

# Recipe fields that change how often a run logs or checkpoints, or which rows it is given
# (``reference.fraction``, ``reference.seed``, ``reference.fit`` and ``reference.folds`` are
# resolved into the rows and the seed before the key is made), but never the weights it ends with.
BOOKKEEPING = ("logging_steps", "save_steps", "save_total_limit", "eval_steps", "fraction", "seed",
               "fit", "folds")
# Fields added after fine-tune keys were first made; at their schema default (eager, one
# process, grad_accum as given, training on) a recipe's key is the one it had before them.
LATER_FIELDS = ("compile", "enabled", "global_batch_size", "fsdp", "fsdp_config", "deepspeed")
TRAINED_IDS = "trained_ids.json"  # in every fine-tune artifact: the row ids it trained on
FOLDS_FILE = "folds.json"  # a cross-fitted reference: each fold's adapter, trained and scored ids


def weights_recipe(recipe: DictConfig) -> dict[str, Any]:
    """The ``train``/``reference`` group without its bookkeeping fields: the fine-tune's recipe."""
    container = OmegaConf.to_container(recipe, resolve=True)
    assert isinstance(container, dict)
    rows = rows_per_pass(recipe)
    if rows == container["batch_size"]:
        container.pop("micro_batch_size", None)  # no split: the keys of unsplit fine-tunes stay
    else:  # the rows per pass a cap resolves to (a divisor keeps the key it had before)
        container["micro_batch_size"] = rows
    if not shares_prefix(recipe):  # not applied (off, LoRA dropout, checkpointing): keys as before
        container.pop("share_prefix", None)
    fields = without_defaults({str(k): v for k, v in container.items()}, TrainSpec, LATER_FIELDS)
    return {k: v for k, v in fields.items() if k not in BOOKKEEPING}


def reference_rows(cfg: DictConfig, n_pool: int) -> list[int]:
    """Pool rows the reference trains on: all, or a ``reference.fraction`` sampled with its seed."""
    return sample_share(list(range(n_pool)), cfg.reference.fraction, cfg.reference.seed)


def sample_share(rows: list[int], fraction: float, seed: int) -> list[int]:
    """``rows`` (fraction 1), or a seeded ``fraction`` of them (at least one) in their order."""
    if fraction >= 1:
        return rows
    k = max(1, round(fraction * len(rows)))  # a cheaper reference on a seeded share
    return sorted(random.Random(seed).sample(rows, k))


def assign_folds(ids: Sequence[str], folds: int, seed: int) -> list[int]:
    """The cross-fitting fold (``0 .. folds-1``) of each row, from its content id alone.

    Rows are sorted by a hash of ``seed`` and their id, then dealt round-robin: the folds are
    balanced (their sizes differ by at most one), a row keeps its fold whatever the order of the
    pool, and another ``seed`` deals other folds. Written by hand because the splitters of
    scikit-learn (``KFold`` with a shuffle) assign by position, not by content.

    Args:
        ids: content ids, unique (the pool de-duplicates them).
        folds: number of folds, at least 2.
        seed: ``reference.seed``.

    Returns:
        One fold index per id, in the order given.

    """
    def rank(row_id: str) -> tuple[str, str]:
        return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest(), row_id

    order = sorted(range(len(ids)), key=lambda i: rank(ids[i]))
    fold = [0] * len(ids)
    for position, index in enumerate(order):
        fold[index] = position % folds
    return fold


def fit_reference(ctx: Context) -> StageResult:
    """The reference stage: one adapter on the pool, or one per fold (``reference.fit``).

    ``in_sample`` (the paper) fine-tunes on the pool (or a ``reference.fraction`` of it), so the
    reference scores rows it trained on. ``cross_fit`` deals the pool into ``reference.folds``
    folds (:func:`assign_folds`) and fine-tunes one adapter per fold on the other folds' rows
    (``reference.fraction`` then samples within those rows), so every row gets ``L_ref`` from an
    adapter that never saw it, as RHO-LOSS trains its model on held-out data. Each fold's adapter
    is a plain fine-tune artifact (keyed on its rows); ``reference/<key>/folds.json`` names them
    with the ids each trained on and the ids it scores.

    Returns:
        ``in_sample``: the fine-tune (``reference_adapter``). ``cross_fit``: the folds manifest
        (``reference_folds``), ``reference/fold<f>/*`` metrics per fold and their totals.

    """
    cfg, pool = ctx.cfg, ctx.pool
    ref, n = cfg.reference, len(pool.ids)
    if ref.fit == "in_sample":
        return finetune(ctx, reference_rows(cfg, n), ref, seed=ref.seed, name="reference")
    k = int(ref.folds)
    if n < k:
        raise ValueError(f"reference.folds={k} needs at least {k} pool rows (one scored row per "
                         f"fold); the pool has {n}: lower reference.folds or use more data")
    fold_of = assign_folds(pool.ids, k, int(ref.seed))
    fits: list[StageResult] = []
    folds: list[dict[str, Any]] = []
    metrics = {"reference/folds": float(k)}
    for f in range(k):
        held = [i for i in range(n) if fold_of[i] == f]
        trained = sample_share([i for i in range(n) if fold_of[i] != f], ref.fraction, ref.seed)
        log.info("reference.fit=cross_fit: fold %d/%d trains on %d rows, scores %d", f + 1, k,
                 len(trained), len(held))
        fit = finetune(ctx, trained, ref, seed=ref.seed, name="reference")
        fits.append(fit)
        folds.append({"fold": f, "adapter": fit.directory.name,
                      "trained_ids": [pool.ids[i] for i in trained],
                      "scored_ids": [pool.ids[i] for i in held]})
        metrics.update({name.replace("reference/", f"reference/fold{f}/", 1): value
                        for name, value in fit.metrics.items()})
    for total in ("steps", "examples", "response_tokens"):  # the cost of all folds together
        metrics[f"reference/{total}"] = sum(fit.metrics.get(f"reference/{total}", 0.0)
                                            for fit in fits)
    manifest = {"fit": "cross_fit", "folds": k, "seed": int(ref.seed),
                "fraction": float(ref.fraction), "per_fold": folds}
    key = fingerprint({"fit": "cross_fit", "folds": k,
                       "adapters": [fold["adapter"] for fold in folds],
                       "scored": fingerprint([fold["scored_ids"] for fold in folds])})

    def build(work: Any) -> dict[str, Any]:
        atomic_write_json(work / FOLDS_FILE, manifest)
        return {"fit": "cross_fit", "folds": k}

    directory, reused = ensure_artifact(ctx.artifacts_dir / "reference" / key, build)
    return StageResult(directory, reused and all(fit.reused for fit in fits), metrics,
                       {"reference_folds": str(directory / FOLDS_FILE)})


def response_tokens_trained(n_response: Sequence[int], steps: int, recipe: DictConfig) -> float:
    """Response tokens a fine-tune trained on: what "matched in tokens" compares.

    Whole epochs count every row's response tokens; the steps of an unfinished epoch (a
    ``max_steps`` run) count their rows at the mean response length, because length-grouped
    batches make the exact rows of a partial epoch a matter of the sampler's order.
    """
    plan = training_plan(recipe)
    epochs, rest = divmod(steps, plan.steps_per_epoch(len(n_response)))
    partial_rows = min(len(n_response), rest * plan.rows_per_step)
    mean = sum(n_response) / len(n_response)
    return float(epochs * sum(n_response) + partial_rows * mean)


def finetune(ctx: Context, rows: Sequence[int], recipe: DictConfig, *, seed: int,
             name: str = "train") -> StageResult:
    """LoRA fine-tune of the initial model on pool ``rows`` (pool order), built once per key.

    Args:
        ctx: the run's context.
        rows: indices into the pool.
        recipe: a ``train`` or ``reference`` config group.
        seed: LoRA init, data order and dropout.
        name: metric prefix (``train`` or ``reference``) and summary name of the adapter.

    Returns:
        The artifact (``adapter/``, ``train_metrics.json``, ``log_history.json``) and its
        metrics under ``<name>/``.

    """
    cfg, pool = ctx.cfg, ctx.pool
    targets = list(cfg.model.lora_targets)
    key = fingerprint({**pool.tokens_key, "rows": fingerprint([pool.ids[i] for i in rows]),
                       "recipe": weights_recipe(recipe), "seed": seed, "targets": targets})

    def build(work: Any) -> dict[str, Any]:
        # FSDP / DeepSpeed state lives as long as this fine-tune, not into the next stage.
        with distributed.stage_scope(name):
            return train(work)

    def train(work: Any) -> dict[str, Any]:
        device, sharding = check_device(cfg.model), weight_sharding(recipe)
        # ZeRO-3 must see live TrainingArguments while the model is built (zero.Init shards the
        # weights as they load); train_lora makes its own, equal ones.
        zero3_args = (training_arguments(recipe, work / "checkpoints", seed, "none",
                                         cfg.model.dtype, device) if sharding == "zero3" else None)
        model = load_model(cfg.model, ctx.model_path, sharding=sharding)
        curves = TrainingCurves(ctx.tracker, "reference" if name == "reference" else "finetune")
        metrics = train_lora(model, ctx.tokenizer, [pool.features[i] for i in rows], recipe,
                             targets, work, seed=seed, callbacks=[curves],
                             dtype=cfg.model.dtype, device=device)
        del model, zero3_args
        free_memory()  # the next stage loads its own copy
        metrics["train/response_tokens"] = response_tokens_trained(
            [pool.features[i].n_response for i in rows], int(metrics["train/steps"]), recipe)
        if distributed.is_main():
            atomic_write_json(work / "train_metrics.json", metrics)
            write_adapter_card(work / "adapter", cfg, recipe,
                               [pool.examples[i].source for i in rows], seed, metrics, name=name)
            # which rows, so a cross-fitted reference can be audited (no row scored by its model)
            atomic_write_json(work / TRAINED_IDS, [pool.ids[i] for i in rows])
        return {"rows": len(rows)}

    # Every rank trains (data parallel under torchrun); rank 0 alone locks and publishes.
    directory, reused = ensure_artifact(ctx.artifacts_dir / "finetune" / key, build,
                                        collective=True)
    metrics = json.loads((directory / "train_metrics.json").read_text())
    adapter_name = "reference_adapter" if name == "reference" else "adapter"
    return StageResult(directory, reused,
                       {k.replace("train/", f"{name}/", 1): v for k, v in metrics.items()},
                       {adapter_name: str(directory / "adapter")})
