"""``run(cfg)``: the one place where the stages meet, in order, top to bottom.

data -> reference -> score -> select -> train -> eval. ``cfg.stages`` names the outputs wanted;
the stages they depend on run too, and every stage first looks for its content-addressed artifact
under ``artifacts_dir`` and reuses it when complete. The run ends by writing ``summary.json``
(stage timings and reuse, artifact paths, flat metrics) into the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lobass import distributed
from lobass.artifacts import atomic_write_json, atomic_write_text, ensure_artifact, fingerprint
from lobass.config import check_lora_targets, validate, validate_pool_size
from lobass.data import Example, ReadStats, pool_fingerprint, read_examples
from lobass.evaluation import heldout_loss_metrics, suite
from lobass.formatting import Features, tokenize_example
from lobass.memory import check_memory
from lobass.modeling import load_adapter, load_model, load_tokenizer, model_key, resolve_model_path
from lobass.scoring import Scorer, compute_response_losses, get_scorer, needed_losses
from lobass.scoring.runner import LazyModel, flag_nonfinite, loss_features, loss_fn, score_rows
from lobass.scoring.store import ensure_losses, write_row_losses
from lobass.selection import (
    export_rows,
    read_selected_ids,
    select_top,
    selected_rows,
    selection_size,
)
from lobass.tracking import NullLogger, RunLogger, make_logger
from lobass.training import train_lora

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What ``summary.json`` holds: stage timings and reuse, artifact paths, flat metrics."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the body sets ``record["reused"]``."""
        record: dict[str, Any] = {"seconds": 0.0, "reused": False}
        start = time.perf_counter()
        try:
            yield record
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            self.stages[name] = record
            log.info("stage %s: %.1f s%s", name, record["seconds"],
                     " (reused)" if record["reused"] else "")

    def as_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {"stages": self.stages, "artifacts": self.artifacts, "metrics": self.metrics}


@dataclass
class Pool:
    """The tokenised pool and the keys that identify it."""

    examples: list[Example]
    features: list[Features]
    key: dict[str, Any]  # model, data fingerprint and formatting: what every artifact depends on


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stages that ``cfg.stages`` asks for, reusing cached artifacts.

    Args:
        cfg: the composed Hydra config (``conf/config.yaml``).

    Returns:
        The summary (also written to ``<run dir>/summary.json``).

    """
    run_dir = _run_dir(cfg)
    (run_dir / "error.txt").unlink(missing_ok=True)  # left by an earlier failed attempt
    try:
        # The resolved config beside summary.json: what the report reads scorer, ratio, seed from.
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        validate(cfg)
    except Exception:  # a sweep point with a bad value fails alone, and says why
        _record_failure(run_dir)
        raise
    artifacts_dir = Path(cfg.artifacts_dir).resolve()
    wanted = set(cfg.stages)
    need_train = bool(wanted & {"train", "eval"})
    need_select = need_train or "select" in wanted
    need_score = need_select or "score" in wanted
    need_reference = "reference" in wanted or (
        need_score and "ref" in needed_losses(_scorers(cfg)))
    summary = Summary()
    # Under torchrun only rank 0 tracks and writes the summary; the other ranks only compute.
    tracker = (make_logger(cfg.logger, _loggable_config(cfg), run_dir) if distributed.is_main()
               else NullLogger())
    try:
        # 0) data: read and check the pool and the LoRA targets before any model loads; tokenise
        examples = _read_pool(cfg, summary)
        validate_pool_size(cfg, len(examples))
        model_path, _ = resolve_model_path(cfg.model, Path(cfg.models_dir).resolve())
        check_memory(cfg, model_path)  # logs the per-device estimate; fails before any load
        if need_reference or need_train:
            check_lora_targets(cfg.model, model_path)  # meta device: no weights are read
        tokenizer = load_tokenizer(cfg.model, model_path)
        pool = _load_pool(cfg, examples, tokenizer, summary)

        # 1) reference: the initial model fine-tuned with LoRA on the pool
        reference_dir: Path | None = None
        if need_reference:
            with summary.stage("reference") as record:
                reference_dir, record["reused"] = _reference(cfg, pool, model_path, tokenizer,
                                                             artifacts_dir, tracker)
            summary.artifacts["reference_adapter"] = str(reference_dir / "adapter")
            summary.metrics.update(
                {k.replace("train/", "reference/"): v for k, v in
                 json.loads((reference_dir / "train_metrics.json").read_text()).items()})

        # 2) score: per-row losses (each computed once) combined by the scorer
        scores_dir: Path | None = None
        if need_score:
            with summary.stage("score") as record:
                scores_dir, record["reused"] = _score(cfg, pool, model_path, tokenizer,
                                                      reference_dir, artifacts_dir, summary)
            summary.artifacts["scores"] = str(scores_dir / "scores.jsonl")
            scores = _read_scores(scores_dir)
            tracker.log_histogram("score/distribution", scores)
            summary.metrics.update(_score_stats(scores))

        # 3) select: top rows by score, exported in the pool's own format
        selection_dir: Path | None = None
        if need_select:
            assert scores_dir is not None
            with summary.stage("select") as record:
                selection_dir, record["reused"] = _select(cfg, pool, scores_dir, artifacts_dir)
            summary.artifacts["selected"] = str(selection_dir / "selected.jsonl")
            summary.metrics["select/count"] = float(
                json.loads((selection_dir / "meta.json").read_text())["count"])
            tracker.log_file("selected", "selection", selection_dir / "selected.jsonl")

        # 4) train: LoRA fine-tune of the initial model on the selection
        adapter_dir: Path | None = None
        if need_train:
            assert selection_dir is not None
            selected = set(read_selected_ids(selection_dir / "selected.jsonl"))
            with summary.stage("train") as record:
                adapter_dir, record["reused"] = _train(cfg, pool, selected, model_path,
                                                       tokenizer, artifacts_dir, tracker)
            summary.artifacts["adapter"] = str(adapter_dir / "adapter")
            summary.metrics.update(json.loads((adapter_dir / "train_metrics.json").read_text()))

        # 5) eval: benchmarks, reference-answer losses, answers judged against a baseline's
        if "eval" in wanted:
            assert adapter_dir is not None
            eval_cfg = cfg
            if cfg.eval.judge.baseline == "full_data":
                with summary.stage("baseline") as record:
                    eval_cfg, record["reused"] = _full_data_baseline(
                        cfg, pool, adapter_dir, model_path, tokenizer, artifacts_dir, tracker)
                if eval_cfg.eval.judge.baseline:
                    summary.artifacts["baseline_eval"] = str(eval_cfg.eval.judge.baseline)
            with summary.stage("eval") as record:
                eval_dir, record["reused"] = _evaluate(eval_cfg, pool, adapter_dir, model_path,
                                                       tokenizer, artifacts_dir)
            summary.metrics.update(json.loads((eval_dir / "metrics.json").read_text()))
            summary.artifacts["eval"] = str(eval_dir)  # a later run's eval.judge.baseline

        summary.metrics.update({f"time/{k}_seconds": v["seconds"]
                                for k, v in summary.stages.items()})
        tracker.log_metrics(summary.metrics)
        tracker.log_table("summary/stages", ["stage", "seconds", "reused"],
                          [[k, v["seconds"], v["reused"]] for k, v in summary.stages.items()])
    except BaseException:
        _record_failure(run_dir)  # beside the partial summary
        raise
    finally:
        if distributed.is_main():
            atomic_write_json(run_dir / "summary.json", summary.as_dict())
        tracker.finish()
    log.info("summary written to %s\n%s", run_dir / "summary.json", format_summary(summary))
    return summary.as_dict()


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


def _read_pool(cfg: DictConfig, summary: Summary) -> list[Example]:
    """Every source of ``data`` read and de-duplicated, with per-source counts in the summary."""
    data = cfg.data
    sources = {data.source: data, **(data.mix or {})}
    examples: list[Example] = []
    seen: set[str] = set()
    for name, source in sources.items():
        rows, stats = read_examples(source.path, source.reader, source=str(name),
                                    max_rows=source.max_rows, on_bad_row=data.on_bad_row)
        unique = [e for e in rows if e.id not in seen]  # a row in two mixed files counts once
        stats.skipped["duplicate"] += len(rows) - len(unique)
        seen.update(e.id for e in unique)
        examples += unique
        summary.metrics.update(ReadStats(len(unique), stats.skipped).as_metrics(f"data/{name}"))
    return examples


def _load_pool(cfg: DictConfig, examples: list[Example], tokenizer: Any,
               summary: Summary) -> Pool:
    data = cfg.data
    features = [tokenize_example(e, tokenizer, cfg.model.template, data.max_length)
                for e in examples]
    summary.metrics["data/pool_rows"] = float(len(examples))
    summary.metrics["data/truncated"] = float(sum(f.truncated for f in features))
    summary.metrics["data/tokens"] = float(sum(len(f.input_ids) for f in features))
    log.info("data=%s: %d rows, %d truncated to data.max_length=%d", data.name, len(examples),
             summary.metrics["data/truncated"], data.max_length)
    key = {"model": model_key(cfg.model), "pool": pool_fingerprint(examples),
           "template": cfg.model.template, "max_length": data.max_length}
    return Pool(examples, features, key)


def _train_config(group: DictConfig) -> dict[str, Any]:
    container: dict[str, Any] = OmegaConf.to_container(group, resolve=True)  # type: ignore[assignment]
    return container


def _reference(cfg: DictConfig, pool: Pool, model_path: str, tokenizer: Any,
               artifacts_dir: Path, tracker: RunLogger) -> tuple[Path, bool]:
    # reference.seed (not the run's seed): one reference serves every seed of a sweep.
    key = fingerprint({**pool.key, "reference": _train_config(cfg.reference),
                       "targets": list(cfg.model.lora_targets)})

    def build(work: Path) -> dict[str, Any]:
        rows = list(range(len(pool.features)))
        if cfg.reference.fraction < 1:  # a cheaper reference on a seeded share of the pool
            k = max(1, round(cfg.reference.fraction * len(rows)))
            rows = sorted(random.Random(cfg.reference.seed).sample(rows, k))
        model = load_model(cfg.model, model_path)
        metrics = train_lora(model, tokenizer, [pool.features[i] for i in rows], cfg.reference,
                             list(cfg.model.lora_targets), work, seed=cfg.reference.seed,
                             report_to=tracker.report_to, dtype=cfg.model.dtype)
        if distributed.is_main():
            atomic_write_json(work / "train_metrics.json", metrics)
        return {"rows": len(rows)}

    # Every rank trains (data parallel under torchrun); rank 0 alone locks and publishes.
    return distributed.ensure_artifact_all_ranks(artifacts_dir / "reference" / key, build)


def _scorers(cfg: DictConfig) -> list[Scorer]:
    """The run's scorer first, then ``score.extra_scorers`` (written as ``score_<name>``)."""
    names = dict.fromkeys([cfg.scorer.name, *(cfg.score.get("extra_scorers") or [])])
    return [get_scorer(name) for name in names]


def _loss_dir(artifacts_dir: Path, pool: Pool, loss: str, reference_dir: Path | None) -> Path:
    adapter = reference_dir.name if loss == "ref" and reference_dir else None
    return artifacts_dir / "losses" / fingerprint({**pool.key, "loss": loss, "adapter": adapter})


def _score(cfg: DictConfig, pool: Pool, model_path: str, tokenizer: Any,
           reference_dir: Path | None, artifacts_dir: Path, summary: Summary) -> tuple[Path, bool]:
    scorers = _scorers(cfg)
    distributed.init_from_env()  # under torchrun, ranks split every loss's shards

    def load() -> Any:  # one model for every loss: the adapter disabled gives L_init and L(y)
        model = load_model(cfg.model, model_path)
        return load_adapter(model, reference_dir / "adapter") if reference_dir else model

    model = LazyModel(load)  # loaded only if some shard is missing
    ids = [e.id for e in pool.examples]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    losses: dict[str, np.ndarray] = {}
    loss_keys, all_reused = [], True
    for loss in needed_losses(scorers):  # each loss once, whatever scorers share it
        directory = _loss_dir(artifacts_dir, pool, loss, reference_dir)
        compute = loss_fn(model, loss, loss_features(pool.features, loss, start),
                          max_tokens_per_batch=cfg.score.max_tokens_per_batch,
                          pad_token_id=tokenizer.pad_token_id, share_prefix=cfg.score.share_prefix)
        result = ensure_losses(directory, ids, compute, shard_rows=cfg.score.shard_rows,
                               desc=f"score loss={loss}")
        losses[loss], all_reused = result.values, all_reused and result.reused
        loss_keys.append(directory.name)
        summary.metrics[f"score/{loss}_shards_computed"] = 0.0 if result.reused else float(
            result.meta["shards_computed"])
    flagged = flag_nonfinite(losses, ids, cfg.score.on_nonfinite)
    summary.metrics.update({
        "score/rows": float(len(ids)), "score/model_loads": float(model.loads),
        "score/truncated": float(sum(f.truncated for f in pool.features)),
        "score/nonfinite": float(flagged.sum()), "score/skipped": float(flagged.sum()),
    })
    seeded = any(s.name == "random" for s in scorers)
    key = fingerprint({"losses": loss_keys, "scorers": [s.name for s in scorers],
                       "seed": cfg.seed if seeded else None})

    def build_scores(work: Path) -> dict[str, Any]:
        rows = score_rows(ids, [e.source for e in pool.examples], pool.features, losses, scorers,
                          flagged, cfg.seed)
        atomic_write_text(work / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return {"scorers": [s.name for s in scorers], "flagged": int(flagged.sum())}

    # Rank 0 writes the one scores artifact; the other ranks wait for it and read it.
    scores_dir, reused = distributed.on_main(
        lambda: ensure_artifact(artifacts_dir / "scores" / key, build_scores))
    return scores_dir, reused and all_reused


def _pad_id(model: Any) -> int:
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return int(pad[0] if isinstance(pad, list) else pad)


def _read_scores(directory: Path) -> np.ndarray:
    rows = [json.loads(line) for line in (directory / "scores.jsonl").read_text().splitlines()]
    return np.array([r["score"] if r["score"] is not None else np.nan for r in rows], dtype=float)


def _score_stats(scores: np.ndarray) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return {}
    return {"score/mean": float(finite.mean()), "score/std": float(finite.std()),
            "score/min": float(finite.min()), "score/max": float(finite.max())}


def _select(cfg: DictConfig, pool: Pool, scores_dir: Path,
            artifacts_dir: Path) -> tuple[Path, bool]:
    k = selection_size(len(pool.examples), cfg.selection.ratio, cfg.selection.count)
    key = fingerprint({"scores": scores_dir.name, "k": k})

    def build(work: Path) -> dict[str, Any]:
        scores = _read_scores(scores_dir)
        chosen = select_top([e.id for e in pool.examples], scores, k)
        rows = selected_rows(pool.examples, chosen, scores)
        atomic_write_text(work / "selected.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(work / "export.jsonl", export_rows([pool.examples[i] for i in chosen]))
        atomic_write_json(work / "meta.json", {"count": k, "pool": len(pool.examples),
                                               "ratio": cfg.selection.ratio})
        return {"count": k}

    return ensure_artifact(artifacts_dir / "selection" / key, build)


def _train(cfg: DictConfig, pool: Pool, selected: set[str], model_path: str, tokenizer: Any,
           artifacts_dir: Path, tracker: RunLogger) -> tuple[Path, bool]:
    rows = [i for i, e in enumerate(pool.examples) if e.id in selected]  # pool order
    if _is_reference_run(cfg, len(rows), len(pool.examples)):
        # Full data with the reference's own recipe: the reference model *is* this fine-tune.
        log.info("selection is the whole pool and train == reference: reusing the reference")
        return _reference(cfg, pool, model_path, tokenizer, artifacts_dir, tracker)
    key = fingerprint({**pool.key, "rows": fingerprint(sorted(selected)),
                       "train": _train_config(cfg.train), "seed": cfg.seed,
                       "targets": list(cfg.model.lora_targets)})

    def build(work: Path) -> dict[str, Any]:
        model = load_model(cfg.model, model_path)
        metrics = train_lora(model, tokenizer, [pool.features[i] for i in rows], cfg.train,
                             list(cfg.model.lora_targets), work, seed=cfg.seed,
                             report_to=tracker.report_to, dtype=cfg.model.dtype)
        if distributed.is_main():
            atomic_write_json(work / "train_metrics.json", metrics)
        return {"rows": len(rows)}

    return distributed.ensure_artifact_all_ranks(artifacts_dir / "train" / key, build)


def _is_reference_run(cfg: DictConfig, n_selected: int, n_pool: int) -> bool:
    reference = _train_config(cfg.reference)
    fraction, seed = reference.pop("fraction"), reference.pop("seed")
    return (n_selected == n_pool and fraction == 1 and seed == cfg.seed
            and reference == _train_config(cfg.train))


def _full_data_baseline(cfg: DictConfig, pool: Pool, adapter_dir: Path, model_path: str,
                        tokenizer: Any, artifacts_dir: Path,
                        tracker: RunLogger) -> tuple[DictConfig, bool]:
    """``eval.judge.baseline=full_data``: the config that judges against the full-data model.

    The full-data model (the initial model fine-tuned on the whole pool with ``reference.seed``;
    the reference itself when the recipes match) is trained and evaluated, without a judge, once
    per sweep: both are content-addressed artifacts. The run that *is* the full-data model gets
    no judge (it would face itself) and so shares that very evaluation artifact.
    """
    baseline_cfg = OmegaConf.merge(cfg, {"seed": cfg.reference.seed,
                                         "eval": {"judge": {"baseline": None}}})
    assert isinstance(baseline_cfg, DictConfig)
    everything = {e.id for e in pool.examples}
    full_dir, trained_reused = _train(baseline_cfg, pool, everything, model_path, tokenizer,
                                      artifacts_dir, tracker)
    if full_dir == adapter_dir:
        log.info("eval.judge.baseline=full_data: this run is the full-data model; no judge")
        unjudged = OmegaConf.merge(cfg, {"eval": {"judge": {"baseline": None}}})
        assert isinstance(unjudged, DictConfig)
        return unjudged, trained_reused
    eval_dir, eval_reused = _evaluate(baseline_cfg, pool, full_dir, model_path, tokenizer,
                                      artifacts_dir)
    judged = OmegaConf.merge(cfg, {"eval": {"judge": {"baseline": str(eval_dir)}}})
    assert isinstance(judged, DictConfig)
    return judged, trained_reused and eval_reused


def _evaluate(cfg: DictConfig, pool: Pool, adapter_dir: Path, model_path: str, tokenizer: Any,
              artifacts_dir: Path) -> tuple[Path, bool]:
    ev = cfg.eval
    judged = suite.judge_inputs(ev)  # baseline answers and judge prompt: a change re-judges
    # format 2: the artifact also keeps per-row losses (losses/<set>.jsonl) for paired reports
    key = fingerprint({"adapter": adapter_dir.name, "eval": _train_config(ev), "seed": cfg.seed,
                       "judged": judged, "format": 2})

    def build(work: Path) -> dict[str, Any]:
        # Merge the adapter into a fresh copy of the initial weights: lm-eval and generation then
        # see a plain transformers model with no peft indirection.
        model = load_adapter(load_model(cfg.model, model_path), adapter_dir / "adapter")
        model = model.merge_and_unload().eval()
        metrics: dict[str, float] = {}
        # a) reference-free: mean response loss on held-out reference answers
        for name, examples in suite.reference_sets(ev).items():
            features = [tokenize_example(e, tokenizer, cfg.model.template, cfg.data.max_length)
                        for e in examples]
            losses = compute_response_losses(
                model, features, max_tokens_per_batch=cfg.score.max_tokens_per_batch,
                pad_token_id=_pad_id(model))
            metrics.update(heldout_loss_metrics(losses, name))
            write_row_losses(work / "losses" / f"{name}.jsonl", [e.id for e in examples], losses)
        # b) benchmarks through lm-eval: GSM8K, IFEval (skipped, with the reason, when offline)
        bench, skipped = suite.run_benchmarks(
            model, tokenizer, ev, chat=cfg.model.template == "chat", seed=cfg.seed,
            model_path=model_path, adapter_dir=adapter_dir / "adapter",
            max_lora_rank=int(cfg.train.lora.r))
        metrics.update(bench)
        # c) greedy answers per prompt set, each its own resumable artifact
        generations = suite.generate_sets(
            model, tokenizer, ev, artifacts_dir, template=cfg.model.template,
            key={"adapter": adapter_dir.name, "model": model_key(cfg.model)})
        metrics.update(suite.generation_set_metrics(generations))
        # d) pairwise judge against the baseline run's answers, both orders
        if judged is not None:
            del model  # the judge may load another model

            def load_local(name: str | None) -> tuple[Any, Any]:
                if name is None:  # the embedded/initial model judges
                    return load_model(cfg.model, model_path), tokenizer
                judge_cfg = OmegaConf.merge(cfg.model, {"source": "hub", "hub_id": name,
                                                        "revision": None})
                assert isinstance(judge_cfg, DictConfig)
                return load_model(judge_cfg, name), load_tokenizer(judge_cfg, name)

            judge = suite.make_judge(ev.judge, load_local, cfg.model.template)
            metrics.update(suite.judge_sets(judge, ev.judge, generations, work, seed=cfg.seed))
        elif generations:
            log.info("eval.judge.baseline is null: answers saved, no pairwise judging")
        atomic_write_json(work / "generations.json", {k: str(v) for k, v in generations.items()})
        atomic_write_json(work / "skipped.json", skipped)
        atomic_write_json(work / "metrics.json", metrics)
        return {"metrics": sorted(metrics), "skipped": skipped}

    return ensure_artifact(artifacts_dir / "eval" / key, build)


def format_summary(summary: Summary) -> str:
    """A short plain-text table of stage timings and metrics for the end of a run."""
    lines = [f"{'stage':<12}{'seconds':>10}  reused"]
    lines += [f"{name:<12}{rec['seconds']:>10.1f}  {'yes' if rec['reused'] else 'no'}"
              for name, rec in summary.stages.items()]
    shown = [k for k in summary.metrics if k.startswith(("eval/", "train/", "select/", "score/"))
             and not k.endswith(("_stderr", "ci_low", "ci_high"))]
    lines.append(f"\n{'metric':<32}{'value':>12}")
    lines += [f"{k:<32}{summary.metrics[k]:>12.4f}" for k in shown]
    return "\n".join(lines)
