"""The eval stage's steps, driven by the ``eval`` config (the pipeline calls them in order).

Reference-free losses, lm-eval benchmarks (GSM8K, IFEval), generation per prompt set (each set its
own resumable artifact, so changing only the judge or the baseline reuses the answers). The
pairwise judge, from its prompt to its verdicts, is :mod:`lobass.evaluation.judge`. Stage modules
never import each other: the pipeline passes in what needs scoring or model loading as callables.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lobass.artifacts import ensure_artifact, file_sha256, fingerprint
from lobass.data import Example, read_examples
from lobass.evaluation.generation import (
    enabled_prompt_sets,
    generate_responses,
    generation_metrics,
)
from lobass.evaluation.gsm8k import evaluate_gsm8k
from lobass.evaluation.harness import build_task_manager
from lobass.evaluation.ifeval import evaluate_ifeval, ifeval_missing, ifeval_task_dir
from lobass.evaluation.prompts import read_prompts, read_reference_set
from lobass.jsonrows import read_jsonl

log = logging.getLogger(__name__)

def reference_sets(eval_cfg: DictConfig) -> dict[str, list[Example]]:
    """Held-out examples whose responses the evaluated model is scored on, by metric name."""
    sets: dict[str, list[Example]] = {}
    held = eval_cfg.heldout
    if held.enabled:
        sets["heldout"], _ = read_examples(held.path, held.reader, source="heldout",
                                           max_rows=held.max_rows)
    for name, ref in eval_cfg.reference_loss.items():
        if ref.enabled:
            sets[str(name)] = read_reference_set(str(name), ref)
    return sets


def trimmed_sets(eval_cfg: DictConfig) -> set[str]:
    """Reference-loss sets that also report ``loss_trimmed`` (``reference_loss.<set>.trimmed``)."""
    return {str(name) for name, ref in eval_cfg.reference_loss.items()
            if ref.enabled and ref.trimmed}


def run_benchmarks(model: Any, tokenizer: Any, eval_cfg: DictConfig, *, chat: bool, seed: int,
                   model_path: str, adapter_dir: Path | None, max_lora_rank: int,
                   revision: str | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """GSM8K and IFEval through lm-eval with one task manager.

    Returns:
        The metrics, and what was skipped with the reason (IFEval without its NLTK data).

    """
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    run_ifeval = bool(eval_cfg.ifeval.enabled)
    if run_ifeval and (missing := ifeval_missing()):
        skipped["ifeval"] = ("lm-eval's IFEval checkers cannot run offline here; missing: "
                             + "; ".join(missing))
        log.warning("eval.ifeval skipped: %s", skipped["ifeval"])
        metrics["eval/ifeval/skipped"] = 1.0  # the flag in summary.json; the reason: skipped.json
        run_ifeval = False
    if not (eval_cfg.gsm8k.enabled or run_ifeval):
        return metrics, skipped
    manager = build_task_manager([ifeval_task_dir()] if run_ifeval else [])
    common = {"chat": chat, "seed": seed, "task_manager": manager, "backend": eval_cfg.backend,
              "model_path": model_path, "adapter_dir": adapter_dir,
              "max_lora_rank": max_lora_rank, "revision": revision}
    if eval_cfg.gsm8k.enabled:
        metrics.update(evaluate_gsm8k(model, tokenizer, eval_cfg.gsm8k, **common))
    if run_ifeval:
        metrics.update(evaluate_ifeval(model, tokenizer, eval_cfg.ifeval, **common))
    return metrics, skipped


def generate_sets(model: Any, tokenizer: Any, eval_cfg: DictConfig, artifacts_dir: Path, *,
                  key: dict[str, Any], template: str,
                  allow_special_tokens: bool = False) -> dict[str, Path]:
    """Answer every enabled prompt set; each set is its own artifact under ``generations/``.

    Under ``torchrun`` every rank calls this with its own copy of the model and answers a share.

    Args:
        model: the evaluated model (adapter merged).
        tokenizer: its tokenizer.
        eval_cfg: the ``eval`` config.
        artifacts_dir: the artifact cache.
        key: what identifies the evaluated model (adapter, initial model), hashed into each key.
        template: ``model.template``.
        allow_special_tokens: ``data.allow_special_tokens``: special-token strings in a prompt
            are control tokens (``False``: plain text).

    Returns:
        The generations JSONL of each set.

    """
    generation = eval_cfg.generation
    paths: dict[str, Path] = {}
    for name, spec in enabled_prompt_sets(eval_cfg).items():
        prompts = read_prompts(spec.path, spec.reader, spec.max_rows)
        # a set's own cap (the answer-length endpoint's 256) or the generation-wide one
        max_new = int(spec.max_new_tokens or generation.max_new_tokens)
        set_key = fingerprint({**key, "template": template, "prompts": file_sha256(Path(spec.path)),
                               "text": "special-tokens-allowed" if allow_special_tokens
                               else "plain-v1",
                               "reader": spec.reader, "max_rows": spec.max_rows,
                               "max_new_tokens": max_new})

        def build(work: Path, name: str = name, prompts: Any = prompts,
                  max_new: int = max_new) -> dict[str, Any]:
            rows = generate_responses(model, tokenizer, prompts, work / f"{name}.jsonl",
                                      template=template,
                                      allow_special_tokens=allow_special_tokens,
                                      max_new_tokens=max_new,
                                      batch_size=int(generation.batch_size), set_name=name)
            return {"set": name, "rows": len(rows)}

        # every rank answers its share of the batches (generate_responses), rank 0 publishes
        directory, _ = ensure_artifact(artifacts_dir / "generations" / set_key, build,
                                       collective=True)
        paths[name] = directory / f"{name}.jsonl"
    return paths


def generation_set_metrics(paths: dict[str, Path]) -> dict[str, float]:
    """Answer counts and lengths of every set."""
    metrics: dict[str, float] = {}
    for name, path in paths.items():
        rows = read_jsonl(path)
        metrics.update(generation_metrics(rows, name))
    return metrics
