"""GSM8K through lm-eval on the shipped task YAML: strict and flexible answer extraction.

The task is lm-eval's own ``gsm8k`` (v3) over local JSONL files: ``lobass/tasks/lobass_gsm8k.yaml``
with the test and few-shot files, ``num_fewshot`` and ``max_gen_toks`` filled in from
``eval.gsm8k``. On the ``hf`` backend the in-memory model (adapter merged) is handed to lm-eval, so
nothing is reloaded from a hub id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from lobass.evaluation.harness import TASKS_DIR, build_lm, build_task_manager, evaluate_tasks
from lobass.stats import wilson_interval

log = logging.getLogger(__name__)

TASK = "lobass_gsm8k"
FILTERS = {"strict": "strict-match", "flexible": "flexible-extract"}


def gsm8k_task_config(gsm_cfg: DictConfig) -> dict[str, Any]:
    """The shipped GSM8K task YAML with local test (and few-shot) files filled in."""
    config: dict[str, Any] = yaml.safe_load((TASKS_DIR / f"{TASK}.yaml").read_text())
    for key in ("test_path", "fewshot_path"):
        if not Path(gsm_cfg[key]).is_file():
            raise FileNotFoundError(f"eval.gsm8k.{key}={gsm_cfg[key]} does not exist")
    config["dataset_kwargs"] = {
        "data_files": {"test": str(gsm_cfg.test_path), "train": str(gsm_cfg.fewshot_path)}
    }
    config["num_fewshot"] = int(gsm_cfg.num_fewshot)
    config["generation_kwargs"]["max_gen_toks"] = int(gsm_cfg.max_gen_toks)
    return config


def gsm8k_metrics(row: dict[str, Any], n: int) -> dict[str, float]:
    """``eval/gsm8k/*`` from lm-eval's result row: accuracies, ``n`` and Wilson 95% intervals."""
    metrics = {"eval/gsm8k/n": float(n)}
    for name, key in FILTERS.items():
        acc = float(row[f"exact_match,{key}"])
        low, high = wilson_interval(acc * n, n)
        metrics[f"eval/gsm8k/{name}_acc"] = acc
        metrics[f"eval/gsm8k/{name}_acc_ci_low"] = low
        metrics[f"eval/gsm8k/{name}_acc_ci_high"] = high
    return metrics


def evaluate_gsm8k(model: Any, tokenizer: Any, gsm_cfg: DictConfig, *, chat: bool, seed: int,
                   task_manager: Any = None, backend: str = "hf", model_path: str | None = None,
                   adapter_dir: Path | None = None, max_lora_rank: int = 16,
                   revision: str | None = None) -> dict[str, float]:
    """GSM8K exact-match accuracy (strict ``#### n`` and flexible last-number extraction).

    Args:
        model: a transformers causal LM (adapter merged), already on its device (``hf``).
        tokenizer: its tokenizer.
        gsm_cfg: ``eval.gsm8k`` config (``limit`` questions, ``num_fewshot``, ``batch_size``).
        chat: wrap prompts in the model's chat template (instruction-tuned models).
        seed: seeds lm-eval's few-shot sampling.
        task_manager: the run's lm-eval ``TaskManager`` (``harness.build_task_manager``); one
            without any include path is built when ``None``.
        backend: ``hf`` or ``vllm`` (``eval.backend``).
        model_path: initial model path (``vllm`` only).
        adapter_dir: LoRA adapter directory (``vllm`` only).
        max_lora_rank: LoRA rank (``vllm`` only).
        revision: ``model.revision`` vLLM loads (``vllm`` only).

    Returns:
        ``eval/gsm8k/{strict,flexible}_acc`` with ``_ci_low``/``_ci_high`` and ``eval/gsm8k/n``.

    """
    lm = build_lm(model, tokenizer, backend, batch_size=gsm_cfg.batch_size,
                  max_length=int(gsm_cfg.max_length), model_path=model_path,
                  adapter_dir=adapter_dir, max_lora_rank=max_lora_rank, revision=revision)
    results = evaluate_tasks(lm, [gsm8k_task_config(gsm_cfg)],
                             task_manager or build_task_manager(),
                             limit=gsm_cfg.limit, chat=chat,
                             num_fewshot=int(gsm_cfg.num_fewshot), seed=seed)
    n = int(results["n-samples"][TASK]["effective"])
    metrics = gsm8k_metrics(results["results"][TASK], n)
    log.info("eval.gsm8k: strict %.3f, flexible %.3f on %d questions",
             metrics["eval/gsm8k/strict_acc"], metrics["eval/gsm8k/flexible_acc"], n)
    return metrics
