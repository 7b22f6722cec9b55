"""``run(cfg)``: the recipe. Pool, reference, score, select, train, eval, in that order.

Each line below is one stage call that returns a :class:`~lobass.context.StageResult`; the stage
bodies live beside the code they drive (``pool.py``, ``finetune.py``, ``scoring/stage.py``,
``selection.py``, ``evaluation/stage.py``). ``cfg.stages`` names the outputs wanted; the stages
they depend on run too, and every stage first looks for its content-addressed artifact and reuses
it when complete. The run ends by writing ``summary.json`` (stage timings and reuse, artifact
paths, flat metrics) into the run directory.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lobass import distributed
from lobass.artifacts import atomic_write_json, atomic_write_text, check_output_dirs, fingerprint
from lobass.config import check_lora_targets, check_secrets, validate, validate_pool
from lobass.contamination import audit
from lobass.context import Context, StageResult
from lobass.devices import check_device
from lobass.evaluation.stage import eval_recipe, evaluate
from lobass.evaluation.suite import preflight_judge
from lobass.finetune import finetune, fit_reference, weights_recipe
from lobass.memory import check_memory
from lobass.modeling import load_tokenizer, model_key, resolve_model_path
from lobass.pool import Pool, read_pool, tokenize_pool
from lobass.scoring import compute_response_losses
from lobass.scoring.stage import needs_reference, score, scorer_label
from lobass.selection import select
from lobass.signals import sigterm_raises
from lobass.summary import Summary, format_summary
from lobass.tracking import NullLogger, log_run_outputs, make_logger

log = logging.getLogger(__name__)


@sigterm_raises()  # a scheduler's SIGTERM records the failure like Ctrl-C
def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stages that ``cfg.stages`` asks for, reusing cached artifacts.

    Args:
        cfg: the composed Hydra config (``conf/config.yaml``).

    Returns:
        The summary (also written to ``<run dir>/summary.json``).

    """
    run_dir = _run_dir(cfg)
    (run_dir / "error.txt").unlink(missing_ok=True)  # left by an earlier failed attempt
    (run_dir / "summary.json").unlink(missing_ok=True)  # and its partial summary: not this run's
    try:
        check_secrets(cfg)  # a key typed into the config must reach no file, not even config.yaml
        # The resolved config beside summary.json: what the report reads a point's identity from.
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        validate(cfg)  # every value, before any file is read or model loaded
        check_output_dirs(run_dir, Path(cfg.artifacts_dir), Path(cfg.models_dir))
        check_device(cfg.model)  # model.device=cuda without CUDA fails here, not as a CPU crawl
        preflight_judge(cfg.eval, list(cfg.stages))  # a remote judge's key and server, now
    except Exception:  # a sweep point with a bad value fails alone, and says why
        _record_failure(run_dir)
        raise
    wanted = set(cfg.stages)
    # train=none: the initial model itself is the point (every arm is measured from it)
    fine_tune = bool(cfg.train.get("enabled", True))
    if not fine_tune:  # nothing to select or train: only the evaluation is asked for
        log.info("train=none (train.enabled=false): evaluating the initial model; stages %s "
                 "skipped", sorted(wanted - {"eval"}))
        wanted &= {"eval"}
    need_train = fine_tune and bool(wanted & {"train", "eval"})
    need_select = need_train or "select" in wanted
    need_score = need_select or "score" in wanted
    need_reference = "reference" in wanted or (need_score and needs_reference(cfg))
    summary = Summary()
    # Under torchrun only rank 0 tracks and writes the summary; the other ranks only compute.
    tracker = (make_logger(cfg.logger, {**_loggable_config(cfg), "provenance": summary.provenance},
                           run_dir) if distributed.is_main() else NullLogger())
    exit_code = 0
    try:
        # 0) pool: read and check the data and the LoRA targets before any model loads; tokenise
        examples, read_metrics = read_pool(cfg.data)
        summary.metrics.update(read_metrics)
        # overlap with every eval set counted (data/contamination/*), dropped if data.decontaminate
        examples, audit_metrics = audit(examples, cfg.eval,
                                        drop=bool(cfg.data.get("decontaminate", False)))
        summary.metrics.update(audit_metrics)
        # selection.count per ranked group, keep_sources and the listed file, against the pool
        summary.metrics.update(validate_pool(cfg, examples))
        models_dir = Path(cfg.models_dir).resolve()
        model_path, _ = resolve_model_path(cfg.model, models_dir)
        check_memory(cfg, model_path)  # logs the per-device estimate; fails before any load
        if need_reference or need_train:
            check_lora_targets(cfg.model, model_path)  # meta device: no weights are read
        tokenizer = load_tokenizer(cfg.model, model_path)
        pool, pool_metrics = tokenize_pool(cfg, examples, tokenizer,
                                           model_key(cfg.model, model_path, models_dir))
        summary.metrics.update(pool_metrics)
        ctx = Context(cfg, pool, model_path, tokenizer, Path(cfg.artifacts_dir).resolve(),
                      tracker)

        # 1) reference: the initial model fine-tuned with LoRA on the pool, or one per fold of it
        #    (reference.fit=cross_fit); reference.seed: one serves every training seed of a sweep
        reference = None
        if need_reference:
            reference = summary.stage("reference", lambda: fit_reference(ctx))

        # 2) score: per-row losses (each computed once) combined by the scorer
        if need_score:
            scored = summary.stage("score", lambda: score(ctx, reference))

        # 3) select: top rows by score, exported in the pool's own format
        if need_select:
            selected = summary.stage("select", lambda: select(ctx, scored))

        # 4) train: LoRA fine-tune of the initial model on the selection (the reference itself
        #    when the selection is the whole pool and the recipes and seeds agree)
        if need_train:
            chosen = set(selected.ids)
            rows = [i for i, row_id in enumerate(pool.ids) if row_id in chosen]
            trained = summary.stage("train", lambda: finetune(ctx, rows, cfg.train,
                                                              seed=cfg.seed))

        # 5) eval: benchmarks, reference-answer losses, answers judged against a baseline's
        if "eval" in wanted:
            baseline = cfg.eval.judge.baseline
            if baseline == "full_data":
                full = summary.stage("baseline", lambda: _full_data_baseline(
                    ctx, trained if need_train else None))
                baseline = full.artifacts.get("baseline_eval")  # None: this run is full data
            adapter = Path(trained.artifacts["adapter"]) if need_train else None
            summary.stage("eval", lambda: evaluate(
                ctx, adapter, seed=cfg.seed, judge_baseline=baseline,
                response_losses=compute_response_losses, run_dir=run_dir))

        summary.point = point_identity(cfg, selected if need_select else None, pool)
        tracker.log_table("summary/point", ["key", "value"],
                          [[k, json.dumps(v)] for k, v in summary.point.items()])
        summary.metrics.update({f"time/{k}_seconds": v["seconds"]
                                for k, v in summary.stages.items()})
        tracker.log_metrics(summary.metrics)
        tracker.log_table("summary/stages", ["stage", "seconds", "reused"],
                          [[k, v["seconds"], v["reused"]] for k, v in summary.stages.items()])
        log_run_outputs(tracker, summary.artifacts)  # adapters, scores, answers
    except BaseException:
        _record_failure(run_dir)  # beside the partial summary
        exit_code = 1  # the tracker marks the run failed
        raise
    finally:
        if distributed.is_main():
            atomic_write_json(run_dir / "summary.json", summary.as_dict())
        tracker.finish(exit_code)
    log.info("summary written to %s\n%s", run_dir / "summary.json", format_summary(summary))
    return summary.as_dict()


def point_identity(cfg: DictConfig, selected: StageResult | None, pool: Pool) -> dict[str, Any]:
    """What makes this run a point of a study; the report groups runs by it, pooling only seeds.

    The pool (its content key: every row as read, with its source and raw record, and how its
    text becomes tokens) and the initial model (its content key), then the scorer (marked when
    ``score.exclude_eos`` changed its losses), selection rule (its mode, size, order or band,
    per-source settings, as the select stage resolved them), training budget, training seed and
    reference seed. ``train=none`` (the initial model) has no scorer, selection or budget.

    ``recipe`` and ``eval`` are content keys too: runs trained with another learning rate or
    LoRA rank (the recipe of ``train`` without its budget, which ``train`` names), or measured
    on other eval sets or sizes, are other experiments, never seeds of one point. The
    reference's recipe, where the scorer reads it, is the scorer's like ``reference_seed``
    (``reference_recipe``): it keeps two LoBaSS points apart, and random rows, which read no
    reference, stay LoBaSS's baseline.
    """
    fine_tune = bool(cfg.train.get("enabled", True))
    budget = ("epochs", "max_steps")
    # the train recipe only: an arm and its random baseline must share it, and random reads
    # no reference; the reference's recipe, like its seed, is the scorer's (below)
    recipe = {"train": {k: v for k, v in weights_recipe(cfg.train).items() if k not in budget}}
    data = {"pool": f"{cfg.data.name}-" + fingerprint(
                {**pool.tokens_key, "model": None, "rows": pool.rows_fingerprint()}),
            "model": pool.tokens_key["model"],
            "recipe": f"recipe-{fingerprint(recipe)}" if fine_tune else None,
            "eval": f"eval-{fingerprint(eval_recipe(cfg.eval, None))}"}
    if not fine_tune:
        return data | {"scorer": None, "selection": None, "train": None, "seed": cfg.seed,
                       "reference_seed": None}
    return data | {"scorer": scorer_label(cfg),
                   "selection": selected.identity if selected else None,
                   "train": {"epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps},
                   "seed": cfg.seed,
                   # a scorer without L_ref does not depend on the reference: no identity
                   "reference_seed": cfg.reference.seed if needs_reference(cfg) else None,
                   "reference_recipe": f"recipe-{fingerprint(weights_recipe(cfg.reference))}"
                   if needs_reference(cfg) else None}


def _full_data_baseline(ctx: Context, trained: StageResult | None) -> StageResult:
    """``eval.judge.baseline=full_data``: the full-data model, evaluated unjudged, once a sweep.

    The full-data model is the initial model fine-tuned on the whole pool with ``train`` and
    ``reference.seed``: by content addressing, the reference itself when the recipes match, and
    this very run's model when it is the full-data point (which then has nothing to be judged
    against). Its metrics are not this run's: only the ``baseline_eval`` path is returned.
    """
    cfg = ctx.cfg
    # train=none has no recipe of its own: the full data is then trained as the reference was.
    recipe = cfg.train if trained is not None else cfg.reference
    full = finetune(ctx, range(len(ctx.pool.examples)), recipe, seed=cfg.reference.seed)
    if trained is not None and full.directory == trained.directory:
        log.info("eval.judge.baseline=full_data: this run is the full-data model; no judge")
        return StageResult(full.directory, full.reused)
    ev = evaluate(ctx, Path(full.artifacts["adapter"]), seed=cfg.reference.seed,
                  judge_baseline=None, response_losses=compute_response_losses)
    return StageResult(ev.directory, full.reused and ev.reused,
                       artifacts={"baseline_eval": str(ev.directory)})


def _record_failure(run_dir: Path) -> None:
    """Keep the traceback being handled in ``error.txt``, where the sweep report looks."""
    atomic_write_text(run_dir / "error.txt", traceback.format_exc())


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        path = Path(cfg.output_dir).resolve()
    else:
        from hydra.core.hydra_config import HydraConfig

        path = Path(HydraConfig.get().runtime.output_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _loggable_config(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
