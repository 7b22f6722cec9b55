"""``run(cfg)``: the recipe. Pool, reference, score, select, train, eval, in that order.

Each line below is one stage call that returns a :class:`~lobass.context.StageResult`; the stage
bodies live beside the code they drive (``pool.py``, ``finetune.py``, ``scoring/stage.py``,
``selection.py``, ``evaluation/stage.py``). ``cfg.stages`` names the outputs wanted; the stages
they depend on run too, and every stage first looks for its content-addressed artifact and reuses
it when complete. The run ends by writing ``summary.json`` (stage timings and reuse, artifact
paths, flat metrics) into the run directory.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lobass import distributed
from lobass.artifacts import atomic_write_json, fingerprint
from lobass.config import check_lora_targets
from lobass.context import Context, StageResult
from lobass.devices import enable_tf32
from lobass.evaluation.stage import eval_recipe, evaluate
from lobass.finetune import finetune, fit_reference, weights_recipe
from lobass.pool import Pool
from lobass.preflight import open_context, preflight, record_failure
from lobass.schema.rules import STAGES
from lobass.scoring import compute_response_losses
from lobass.scoring.stage import needs_reference, score, scorer_label
from lobass.selection import select
from lobass.signals import sigterm_raises
from lobass.summary import Summary, format_summary, publish
from lobass.tracking import NullLogger, make_logger

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
    enable_tf32()  # float32 matmuls on TF32 tensor cores on CUDA; nothing on the CPU
    preflight(cfg, run_dir)  # every value, the device, the judge: before any row or model
    summary = Summary()
    # Under torchrun only rank 0 tracks and writes the summary; the other ranks only compute.
    tracker = (make_logger(cfg.logger, {**_loggable_config(cfg), "provenance": summary.provenance},
                           run_dir) if distributed.is_main() else NullLogger())
    exit_code = 0
    try:
        ctx = open_context(cfg, summary.metrics, tracker)  # 0) the pool, before any model loads
        wanted = wanted_stages(cfg)
        if fine_tunes(cfg, wanted):
            check_lora_targets(cfg.model, ctx.model_path)  # meta device: no weights are read
        stages = Stages(ctx, summary, run_dir)
        for name in wanted:  # each pulls the stages it reads, once
            getattr(stages, name)
        summary.point = point_identity(cfg, stages.selection(), ctx.pool)
        publish(summary, tracker)
    except BaseException:
        record_failure(run_dir)  # beside the partial summary
        exit_code = 1  # the tracker marks the run failed
        raise
    finally:
        if distributed.is_main():
            atomic_write_json(run_dir / "summary.json", summary.as_dict())
        tracker.finish(exit_code)
    log.info("summary written to %s\n%s", run_dir / "summary.json", format_summary(summary))
    return summary.as_dict()


def wanted_stages(cfg: DictConfig) -> list[str]:
    """The stages ``cfg.stages`` names, in run order; ``train=none`` keeps only ``eval``."""
    wanted = [name for name in STAGES if name in set(cfg.stages)]
    if not cfg.train.enabled:  # the initial model itself is the point
        log.info("train=none (train.enabled=false): evaluating the initial model; stages %s "
                 "skipped", sorted(set(wanted) - {"eval"}))
        return [name for name in wanted if name == "eval"]
    return wanted


def fine_tunes(cfg: DictConfig, wanted: list[str]) -> bool:
    """Whether the run trains an adapter: the reference, or one on the selection.

    Its LoRA targets are then checked before the first stage, not found wrong after minutes of
    scoring.
    """
    trains = bool({"train", "eval"} & set(wanted)) and bool(cfg.train.enabled)
    scores = trains or bool({"score", "select"} & set(wanted))
    return trains or "reference" in wanted or (scores and needs_reference(cfg))


class Stages:
    """The recipe's stages, each run on first use after the stages it reads.

    Asking for ``eval`` trains, which selects, which scores, which fits the reference when the
    scorer reads ``L_ref``: what a stage needs is derived here, by the stage, and each runs once.
    """

    def __init__(self, ctx: Context, summary: Summary, run_dir: Path) -> None:
        self.ctx, self.cfg, self.summary, self.run_dir = ctx, ctx.cfg, summary, run_dir

    @cached_property
    def reference(self) -> StageResult:
        """1) The initial model fine-tuned with LoRA on the pool.

        Or one adapter per fold of it (reference.fit=cross_fit). reference.seed: one reference
        serves every training seed of a sweep.
        """
        return self.summary.stage("reference", lambda: fit_reference(self.ctx))

    @cached_property
    def score(self) -> StageResult:
        """2) per-row losses (each computed once) combined by the scorer."""
        reference = (self.reference if needs_reference(self.cfg) or "reference" in vars(self)
                     else None)
        return self.summary.stage("score", lambda: score(self.ctx, reference))

    @cached_property
    def select(self) -> StageResult:
        """3) top rows by score, exported in the pool's own format."""
        scored = self.score
        return self.summary.stage("select", lambda: select(self.ctx, scored))

    @cached_property
    def train(self) -> StageResult:
        """4) LoRA fine-tune of the initial model on the selection.

        The reference itself when the selection is the whole pool and recipes and seeds agree.
        """
        chosen = set(self.select.ids)
        rows = [i for i, row_id in enumerate(self.ctx.pool.ids) if row_id in chosen]
        return self.summary.stage("train", lambda: finetune(self.ctx, rows, self.cfg.train,
                                                            seed=self.cfg.seed))

    @cached_property
    def eval(self) -> StageResult:
        """5) benchmarks, reference-answer losses, answers judged against a baseline's."""
        trained = self.train if self.cfg.train.enabled else None
        baseline = self.cfg.eval.judge.baseline
        if baseline == "full_data":
            full = self.summary.stage("baseline", lambda: _full_data_baseline(self.ctx, trained))
            baseline = full.artifacts.get("baseline_eval")  # None: this run is full data
        adapter = Path(trained.artifacts["adapter"]) if trained else None
        return self.summary.stage("eval", lambda: evaluate(
            self.ctx, adapter, seed=self.cfg.seed, judge_baseline=baseline,
            response_losses=compute_response_losses, run_dir=self.run_dir))

    def selection(self) -> StageResult | None:
        """The select stage's result when this run selected, else None (no stage is run)."""
        return vars(self).get("select")


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
    fine_tune = bool(cfg.train.enabled)
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
