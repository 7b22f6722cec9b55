"""IFEval through lm-eval, when its checkers can run offline; otherwise a logged, recorded skip.

lm-eval's IFEval checkers import ``langdetect`` and ``immutabledict`` and count sentences with
NLTK's ``punkt_tab`` model, which lm-eval downloads from the network on import when it is missing.
No PyPI package ships the ``punkt_tab`` data (the ones named for it download it at install time or
are empty), and the model is not ours to re-ship, so on a machine without it IFEval is skipped
and the reason goes into the eval artifact's ``skipped.json`` and the log. Install the data once
with ``python -m nltk.downloader punkt_tab`` (and ``pip install langdetect immutabledict``) to turn
it on.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lobass.evaluation.harness import build_lm, evaluate_tasks
from lobass.stats import wilson_interval

log = logging.getLogger(__name__)

TASK = "ifeval"
METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
           "inst_level_loose_acc")


def ifeval_task_dir() -> Path:
    """lm-eval's own IFEval folder (YAML and checkers), indexed alone by our task manager."""
    spec = importlib.util.find_spec("lm_eval")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "tasks" / "ifeval"


def ifeval_missing() -> list[str]:
    """What IFEval lacks on this machine to run offline (empty: it can run)."""
    missing = [f"python package {name!r}" for name in ("langdetect", "immutabledict")
               if importlib.util.find_spec(name) is None]
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        missing.append("NLTK data 'punkt_tab' (python -m nltk.downloader punkt_tab)")
    return missing


def ifeval_task_config(ifeval_cfg: DictConfig) -> dict[str, Any]:
    """lm-eval's ``ifeval`` task over the shipped ``input_data.jsonl`` instead of the hub copy."""
    path = Path(ifeval_cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.ifeval.path={path} does not exist")
    return {"task": TASK, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"train": str(path)}}, "test_split": "train",
            "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0,
                                  "max_gen_toks": int(ifeval_cfg.max_gen_toks)}}


def evaluate_ifeval(model: Any, tokenizer: Any, ifeval_cfg: DictConfig, *, chat: bool, seed: int,
                    task_manager: Any, backend: str = "hf", model_path: str | None = None,
                    adapter_dir: Path | None = None, max_lora_rank: int = 16,
                    revision: str | None = None) -> dict[str, float]:
    """IFEval prompt- and instruction-level accuracies (strict and loose) with Wilson intervals.

    ``task_manager`` must index :func:`ifeval_task_dir`. Instruction-level accuracies are over
    instructions, whose count lm-eval does not report, so their interval uses the prompt count
    (conservative: there are 1-3 instructions per prompt).
    """
    lm = build_lm(model, tokenizer, backend, batch_size=ifeval_cfg.batch_size,
                  max_length=int(ifeval_cfg.max_length), model_path=model_path,
                  adapter_dir=adapter_dir, max_lora_rank=max_lora_rank, revision=revision)
    results = evaluate_tasks(lm, [ifeval_task_config(ifeval_cfg)], task_manager,
                             limit=ifeval_cfg.limit, chat=chat, num_fewshot=0, seed=seed)
    n = int(results["n-samples"][TASK]["effective"])
    row = results["results"][TASK]
    metrics = {"eval/ifeval/n": float(n)}
    for name in METRICS:
        value = float(row[f"{name},none"])
        low, high = wilson_interval(value * n, n)
        metrics.update({f"eval/ifeval/{name}": value, f"eval/ifeval/{name}_ci_low": low,
                        f"eval/ifeval/{name}_ci_high": high})
    return metrics
