"""The eval stage: reference-answer losses, lm-eval benchmarks, answers, and the pairwise judge.

The evaluated model is the initial model with a fine-tune's adapter merged in, so lm-eval and
generation see a plain transformers model. The per-row response losses come from the scoring
engine, handed in by the pipeline as ``response_losses`` (stage packages never import each other).

Under ``torchrun`` every rank loads the model and takes a share of the held-out losses (every
world-th row) and of the answers (every world-th batch); rank 0 gathers them in order and writes
the artifact, the same files as one process writes. lm-eval's benchmarks and the judge run on
rank 0 while the others wait (:func:`evaluate` says why).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from lobass import distributed
from lobass.artifacts import (
    atomic_write_json,
    atomic_write_text,
    ensure_artifact,
    file_sha256,
    fingerprint,
    write_row_losses,
)
from lobass.context import Context, StageResult
from lobass.devices import free_memory
from lobass.evaluation import judge as judging
from lobass.evaluation import suite
from lobass.evaluation.generation import judged_sets
from lobass.evaluation.heldout import (
    PER_PROMPT_COLUMNS,
    PER_PROMPT_LOSSES,
    heldout_loss_metrics,
    per_prompt_losses,
    without_first_and_last,
)
from lobass.formatting import Features, tokenize_example
from lobass.modeling import (
    checkpoint_fingerprint,
    checkpoint_path,
    load_adapter,
    load_model,
    load_tokenizer,
)
from lobass.schema.eval_specs import PromptSetSpec, ReferenceLossSpec
from lobass.schema.walk import without_defaults
from lobass.shared_prefix import shared_prefix_length

log = logging.getLogger(__name__)

# (model, features, max_tokens_per_batch, pad_token_id) -> (N,) mean response losses
ResponseLosses = Callable[..., np.ndarray]


def evaluate(ctx: Context, adapter: Path | None, *, seed: int, judge_baseline: str | None,
             response_losses: ResponseLosses, run_dir: Path | None = None) -> StageResult:
    """Evaluate the initial model with ``adapter`` merged in (or as it is); one artifact per key.

    Args:
        ctx: the run's context.
        adapter: a fine-tune's ``adapter/`` directory; ``None`` evaluates the initial model itself
            (``train=none``: the row every arm is measured from).
        seed: lm-eval's seed and the judge's bootstrap seed.
        judge_baseline: what the answers are judged against (an eval artifact or run directory,
            or a generations file); ``None``: answers are saved, nothing is judged.
        response_losses: the scoring engine's ``compute_response_losses``.
        run_dir: where a copy of the per-prompt losses goes (the run directory, committed with
            a study); ``None``: the artifact's own file is listed.

    Returns:
        The eval artifact (``metrics.json``, ``losses/<set>.jsonl``, ``per_prompt_losses.csv``,
        ``judge/``), its metrics and, as ``per_prompt_losses``, the CSV's path.

    Under ``torchrun`` the losses and the answers are sharded over the ranks. lm-eval stays on
    rank 0: handed an in-memory model, its ``HFLM`` runs as one process (rank 0 of 1), and its
    own data parallelism loads the weights by path under ``accelerate`` (the merged adapter is
    not on disk); it then re-batches each rank's share of the questions by length (and ``auto``
    takes the smallest batch over ranks), so left padding, and with it greedy answers, could
    differ from one process. The judge is one API client or one local model: rank 0 too.

    """
    cfg = ctx.cfg
    ev = OmegaConf.merge(cfg.eval, {"judge": {"baseline": judge_baseline}})
    assert isinstance(ev, DictConfig)
    judged = judging.judge_inputs(ev)  # baseline answers and judge prompt: a change re-judges
    # format 3: the artifact keeps per_prompt_losses.csv (with the trimmed losses), and answer
    # lengths are gen_len_tokens.
    # What is evaluated: a fine-tune (its key names the initial model and how rows are tokenised)
    # or the initial model, whose held-out losses depend on the same tokens key.
    evaluated = adapter.parent.name if adapter else f"initial-{fingerprint(ctx.pool.tokens_key)}"
    judge_model = (_judge_checkpoint(ev.judge, Path(cfg.models_dir).resolve())
                   if judged is not None else None)  # the judge runs only with a baseline
    allow = bool(cfg.data.allow_special_tokens)  # also in the tokens key
    key = fingerprint({"adapter": evaluated, "eval": eval_recipe(ev, judge_model),
                       "seed": seed, "judged": judged, "format": 3,
                       "loss_batch": cfg.score.max_tokens_per_batch})

    def build(work: Path) -> dict[str, Any]:  # on every rank under torchrun (collective)
        main = distributed.is_main()
        model = load_model(cfg.model, ctx.model_path)
        if adapter is not None:
            model = load_adapter(model, adapter).merge_and_unload().eval()
        metrics: dict[str, float] = {}
        # a) reference-free: mean response loss on held-out reference answers, and without each
        #    answer's first and last tokens where the set asks (reference_loss.<set>.trimmed)
        tables: list[pd.DataFrame] = []
        budget = cfg.score.max_tokens_per_batch
        for name, examples in suite.reference_sets(ev).items():
            features = [tokenize_example(e, ctx.tokenizer, cfg.model.template,
                                         cfg.data.max_length, allow_special_tokens=allow)
                        for e in examples]
            losses = _losses(response_losses, model, features, budget)
            metrics.update(heldout_loss_metrics(losses, name))
            if main:
                write_row_losses(work / "losses" / f"{name}.jsonl", [e.id for e in examples],
                                 losses)
            trimmed = np.full(len(features), np.nan)  # (N,)
            if name in suite.trimmed_sets(ev):  # a second pass: the engine returns means only
                trimmed = _losses(response_losses, model,
                                  [without_first_and_last(f) for f in features], budget)
                metrics.update(heldout_loss_metrics(trimmed, name, "loss_trimmed"))
            tables.append(per_prompt_losses(name, [e.id for e in examples], features, losses,
                                            trimmed))
        table = pd.concat(tables) if tables else pd.DataFrame(columns=PER_PROMPT_COLUMNS)
        if main:
            atomic_write_text(work / PER_PROMPT_LOSSES, table.to_csv(index=False))
        # b) greedy answers per prompt set, each its own resumable artifact (ranks share it)
        began = time.perf_counter()
        generations = suite.generate_sets(
            model, ctx.tokenizer, ev, ctx.artifacts_dir, template=cfg.model.template,
            allow_special_tokens=allow,
            key={"adapter": evaluated, "model": ctx.pool.tokens_key["model"]})
        metrics["eval/generate_seconds"] = time.perf_counter() - began  # sets reused: ~0
        metrics.update(suite.generation_set_metrics(generations))
        if ev.backend == "vllm" or not main:  # vLLM loads its own copy and wants the memory
            del model
            model = None
            free_memory()
        # c) benchmarks through lm-eval: GSM8K, IFEval (skipped, with the reason, when offline);
        #    rank 0 alone (see the docstring), the other ranks wait
        began = time.perf_counter()
        bench, skipped = distributed.on_main(functools.partial(
            suite.run_benchmarks, model, ctx.tokenizer, ev, chat=cfg.model.template == "chat",
            seed=seed, model_path=ctx.model_path, adapter_dir=adapter,
            max_lora_rank=int(cfg.train.lora.r), revision=cfg.model.revision))
        metrics.update(bench)
        metrics["eval/benchmarks_seconds"] = time.perf_counter() - began  # GSM8K's generation
        del model  # the judge may load another model
        free_memory()
        # d) pairwise judge against the baseline's answers, both orders: rank 0 alone
        if judged is not None:
            def judge_answers() -> dict[str, float]:
                judge = judging.make_judge(ev.judge, _judge_loader(ctx), cfg.model.template)
                verdicts = judging.judge_sets(judge, ev.judge, {
                    k: v for k, v in generations.items() if k in judged_sets(ev)}, work,
                    seed=seed)
                del judge
                free_memory()
                return verdicts

            metrics.update(distributed.on_main(judge_answers))
        elif generations:
            log.info("eval.judge.baseline is null: answers saved, no pairwise judging")
        if main:
            atomic_write_json(work / "generations.json",
                              {k: str(v) for k, v in generations.items()})
            atomic_write_json(work / "skipped.json", skipped)
            atomic_write_json(work / "metrics.json", metrics)
        return {"metrics": sorted(metrics), "skipped": skipped}

    directory, reused = ensure_artifact(ctx.artifacts_dir / "eval" / key, build, collective=True)
    metrics = json.loads((directory / "metrics.json").read_text())
    answers = json.loads((directory / "generations.json").read_text())  # set -> answers file
    table = directory / PER_PROMPT_LOSSES
    if run_dir is not None:  # beside summary.json: what a study commits to re-derive decisions
        atomic_write_text(run_dir / PER_PROMPT_LOSSES, table.read_text())
        table = run_dir / PER_PROMPT_LOSSES
    return StageResult(directory, reused, metrics, {
        "eval": str(directory), "per_prompt_losses": str(table),
        **{f"generations/{name}": path for name, path in answers.items()}})


# eval config fields that name a file the evaluation reads: keyed by the file's content
FILE_FIELDS = ("path", "test_path", "fewshot_path", "questions", "answers")


def eval_recipe(ev: DictConfig, judge_model: str | None) -> dict[str, Any]:
    """The ``eval`` group as its artifact key holds it: every input file by its content.

    Why: a held-out, reference-answer, GSM8K, IFEval or prompt file edited in place must give
    new metrics, and the same file found at another path (another clone) the same ones. The
    judge's baseline answers are keyed by content in ``judge_inputs``, its model by its files.

    Args:
        ev: the run's ``eval`` group (with its resolved judge baseline).
        judge_model: fingerprint of a local judge model's files (:func:`_judge_checkpoint`).

    """
    def by_content(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ({"sha256": file_sha256(Path(v))}
                        if k in FILE_FIELDS and isinstance(v, str) and Path(v).is_file()
                        else by_content(v)) for k, v in node.items()}
        return node

    recipe = OmegaConf.to_container(ev, resolve=True)
    assert isinstance(recipe, dict)
    # fields added after eval keys were first made: at their defaults, out of the key
    sets, losses = recipe["generation"]["sets"], recipe["reference_loss"]
    later_set, later_loss = ("judge", "max_new_tokens"), ("trimmed",)
    recipe["generation"]["sets"] = {n: without_defaults(s, PromptSetSpec, later_set)
                                    for n, s in sets.items()}
    recipe["reference_loss"] = {n: without_defaults(r, ReferenceLossSpec, later_loss)
                                for n, r in losses.items()}
    judge = recipe["judge"]
    judge.pop("probe_timeout_s", None)  # how long the pre-flight waits: bookkeeping
    judge.pop("allow_any_env", None)  # which key variable the pre-flight accepts: bookkeeping
    judge.pop("baseline", None)  # its answers' content is in judge_inputs
    if judge["name"] != "local_hf":  # only a local judge's log-prob verdicts read the margin
        judge.pop("tie_margin", None)
    if judge_model is not None:
        judge["model"] = judge_model
    return by_content(recipe)


def _judge_checkpoint(judge_cfg: DictConfig, models_dir: Path) -> str | None:
    """Fingerprint of a local judge model's files (``None``: no local checkpoint to read).

    A ``local_hf`` judge named by a directory or a hub id without a pinned commit is keyed by
    the files it is loaded from, as the initial model is (:func:`lobass.modeling.model_key`).
    """
    name = judge_cfg.model
    if judge_cfg.name != "local_hf" or name is None:  # a server's judge, or the initial model
        return None
    path, local = checkpoint_path(str(name), None, "eval.judge.model")
    return checkpoint_fingerprint(Path(path), models_dir) if local else None


def _losses(response_losses: ResponseLosses, model: Any, features: Sequence[Features],
            budget: int) -> np.ndarray:
    """``(N,)`` response losses of ``features``; under ``torchrun`` each rank scores a share.

    Every rank encodes the prefix that all ``N`` rows share, as one process would: a share's own
    longest common prefix can be longer, and would change the float results. The shares are
    batched apart from each other, so a row's padding may differ from one process's (results
    within float rounding, 1e-6 in fp32 on CPU).
    """
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    pad_id = int(pad[0] if isinstance(pad, list) else pad)
    prefix = shared_prefix_length(features)

    def share_losses(share: list[Features]) -> list[float]:
        if distributed.group_size() > 1:
            log.info("eval losses: rank %d of %d scores %d of %d rows", distributed.group_rank(),
                     distributed.group_size(), len(share), len(features))
        return response_losses(model, share, max_tokens_per_batch=budget, pad_token_id=pad_id,
                               prefix_length=prefix).tolist()

    return np.asarray(distributed.map_shards(share_losses, features), dtype=np.float64)  # (N,)


def _judge_loader(ctx: Context) -> Callable[[str | None], tuple[Any, Any]]:
    """``load(name)``: the judge model and tokenizer (``None``: the run's initial model)."""

    def load(name: str | None) -> tuple[Any, Any]:
        if name is None:  # the embedded/initial model judges
            return load_model(ctx.cfg.model, ctx.model_path), ctx.tokenizer
        path = checkpoint_path(name, None, "eval.judge.model")[0]  # the files its key holds
        judge_cfg = OmegaConf.merge(ctx.cfg.model, {"source": "hub", "hub_id": path,
                                                    "revision": None})
        assert isinstance(judge_cfg, DictConfig)
        return load_model(judge_cfg, path), load_tokenizer(judge_cfg, path)

    return load
