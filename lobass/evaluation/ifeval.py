"""IFEval through lm-eval, offline: its checkers' packages are dependencies, its NLTK data ships.

lm-eval's IFEval checkers import ``langdetect`` and ``immutabledict`` (project dependencies) and
split words and sentences with NLTK's English ``punkt_tab`` model, which lm-eval downloads from the
network on import when ``nltk.data.find`` misses it. No PyPI package ships that data on its own,
so lobass ships the English model (240 KB, MIT, ``resources/data/nltk_data``; see its LICENSE)
and appends its folder to ``nltk.data.path`` when this module is imported, before lm-eval's
checkers are: a ``punkt_tab`` the user installed still comes first. IFEval prompts are English,
and the checkers call only the English model.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import nltk
import yaml
from omegaconf import DictConfig

from lobass.config import RESOURCES
from lobass.evaluation.harness import build_lm, evaluate_tasks
from lobass.stats import wilson_interval

log = logging.getLogger(__name__)

# The shipped English punkt_tab (tokenizers/punkt_tab/english/) for lm-eval's IFEval checkers.
NLTK_DATA = RESOURCES / "data" / "nltk_data"
if str(NLTK_DATA) not in nltk.data.path:
    nltk.data.path.append(str(NLTK_DATA))

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
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        missing.append(f"NLTK data 'punkt_tab' (shipped in {NLTK_DATA}: is the package whole?)")
    return missing


def ifeval_task_config(ifeval_cfg: DictConfig) -> dict[str, Any]:
    """lm-eval's ``ifeval.yaml`` over the shipped ``input_data.jsonl`` instead of the hub copy.

    The whole task config is read from lm-eval's own YAML and only the data and generation keys
    are replaced: lm-eval 0.4.13 builds an inline dict as a new task (it no longer merges it
    over the registered ``ifeval``), so a dict with just the overrides has no ``doc_to_text``.
    """
    path = Path(ifeval_cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"eval.ifeval.path={path} does not exist")
    config = _read_task_yaml(ifeval_task_dir() / "ifeval.yaml")
    config.update({"dataset_path": "json", "dataset_name": None,
                   "dataset_kwargs": {"data_files": {"train": str(path)}}, "test_split": "train"})
    config["generation_kwargs"] = {**config["generation_kwargs"],
                                   "max_gen_toks": int(ifeval_cfg.max_gen_toks)}
    return config


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML whose ``!function module.name`` tags resolve in the task's own package.

    Written here because lm-eval's YAML loader is private and moved between 0.4 releases.
    """
    package = "lm_eval.tasks." + path.parent.name

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        module, name = str(loader.construct_scalar(node)).rsplit(".", 1)  # type: ignore[arg-type]
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    class TaskLoader(yaml.SafeLoader):
        """The safe loader plus lm-eval's ``!function`` tag."""

    TaskLoader.add_constructor("!function", function)
    config: dict[str, Any] = yaml.load(path.read_text(), Loader=TaskLoader)  # noqa: S506
    return config


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
