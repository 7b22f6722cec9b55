"""Evaluation: GSM8K through lm-eval on a shipped task YAML, and held-out response loss.

The model object (adapter merged in memory) is handed to lm-eval directly, so nothing is reloaded
from a hub id. lm-eval's default task registry takes ~15 s to index and needs the network for its
datasets, so we build our task from a YAML shipped in ``lobass/tasks`` with the local data file
substituted, and skip the default registry entirely.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"


def gsm8k_task_config(gsm_cfg: DictConfig) -> dict[str, Any]:
    """The shipped GSM8K task YAML with local test (and few-shot) files filled in."""
    config: dict[str, Any] = yaml.safe_load((TASKS_DIR / "lobass_gsm8k.yaml").read_text())
    config["dataset_kwargs"] = {
        "data_files": {"test": str(gsm_cfg.test_path), "train": str(gsm_cfg.fewshot_path)}
    }
    config["num_fewshot"] = int(gsm_cfg.num_fewshot)
    config["generation_kwargs"]["max_gen_toks"] = int(gsm_cfg.max_gen_toks)
    return config


def evaluate_gsm8k(model: Any, tokenizer: Any, gsm_cfg: DictConfig, *, chat: bool,
                   seed: int) -> dict[str, float]:
    """GSM8K exact-match accuracy (strict ``#### n`` and flexible last-number extraction).

    Args:
        model: a transformers causal LM (adapter merged), already on its device.
        tokenizer: its tokenizer.
        gsm_cfg: ``eval.gsm8k`` config (``limit`` questions, ``num_fewshot``, ``batch_size``).
        chat: wrap prompts in the model's chat template (instruction-tuned models).
        seed: seeds lm-eval's few-shot sampling.

    Returns:
        ``eval/gsm8k/strict_acc``, ``eval/gsm8k/flexible_acc``, their standard errors and ``n``.

    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(gsm_cfg.batch_size),
              max_length=int(gsm_cfg.max_length))
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[gsm8k_task_config(gsm_cfg)],
        task_manager=TaskManager(include_defaults=False),
        limit=gsm_cfg.limit,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat and int(gsm_cfg.num_fewshot) > 0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
        bootstrap_iters=0,
    )
    assert results is not None  # only None on non-zero ranks
    row = results["results"]["lobass_gsm8k"]
    n = results["n-samples"]["lobass_gsm8k"]["effective"]
    metrics = {"eval/gsm8k/n": float(n)}
    for name, key in (("strict", "strict-match"), ("flexible", "flexible-extract")):
        metrics[f"eval/gsm8k/{name}_acc"] = float(row[f"exact_match,{key}"])
        stderr = row.get(f"exact_match_stderr,{key}")
        if isinstance(stderr, float):
            metrics[f"eval/gsm8k/{name}_acc_stderr"] = stderr
    return metrics


def heldout_loss_metrics(losses: np.ndarray, name: str) -> dict[str, float]:
    """Mean held-out response loss with a normal-approximation 95% interval over rows."""
    finite = losses[np.isfinite(losses)]
    mean = float(finite.mean())
    half = 1.96 * float(finite.std(ddof=1)) / np.sqrt(len(finite)) if len(finite) > 1 else 0.0
    return {
        f"eval/{name}/loss": mean,
        f"eval/{name}/loss_ci_low": mean - half,
        f"eval/{name}/loss_ci_high": mean + half,
        f"eval/{name}/n": float(len(finite)),
    }
