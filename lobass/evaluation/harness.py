"""lm-eval plumbing shared by the benchmark tasks: the model wrapper and one task manager.

lm-eval's default task registry takes ~15 s to index and fetches its datasets from the hub, so we
never build it: tasks come from YAMLs shipped in ``lobass/tasks`` (or, for IFEval, lm-eval's own
folder alone) with local data files substituted, and one ``TaskManager`` serves a whole run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
BACKENDS = ("hf", "vllm")


def build_task_manager(include_paths: list[Path] | None = None) -> Any:
    """A ``TaskManager`` that indexes only the given folders, never lm-eval's default registry."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths or []]
    return TaskManager(include_defaults=False, include_path=paths or None)


def build_lm(model: Any, tokenizer: Any, backend: str, *, batch_size: int, max_length: int,
             model_path: str | None = None, adapter_dir: Path | None = None,
             max_lora_rank: int = 16, dtype: str = "auto") -> Any:
    """The lm-eval model object for ``eval.backend``.

    Args:
        model: the in-memory transformers model (adapter merged); used by ``hf``.
        tokenizer: its tokenizer.
        backend: ``hf`` (the in-memory model, nothing reloaded) or ``vllm`` (GPU: vLLM loads the
            initial weights from ``model_path`` and applies the LoRA adapter in ``adapter_dir``).
        batch_size: prompts per generation call (``hf``); vLLM schedules its own batches.
        max_length: context limit prompts are truncated to.
        model_path: initial model directory or hub id (``vllm``).
        adapter_dir: peft adapter directory (``vllm``).
        max_lora_rank: LoRA rank the vLLM engine must accept (``train.lora.r``).
        dtype: weights dtype for vLLM.

    Raises:
        ValueError: an unknown backend, or ``vllm`` without a model path.

    """
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    max_length=max_length)
    if backend == "vllm":
        if model_path is None:
            raise ValueError("eval.backend=vllm needs the initial model's path")
        try:
            from lm_eval.models.vllm_causallms import VLLM
        except ImportError as err:
            raise ImportError("eval.backend=vllm needs vLLM: `pip install vllm` (GPU), or use "
                              "eval.backend=hf") from err

        # vLLM cannot take an in-memory model: it loads the same initial weights and serves the
        # trained adapter as a LoRA request, which is equivalent to the merged model.
        return VLLM(pretrained=model_path, dtype=dtype, max_model_len=max_length,
                    lora_local_path=str(adapter_dir) if adapter_dir else None,
                    max_lora_rank=max_lora_rank, batch_size="auto")
    raise ValueError(f"eval.backend must be one of {BACKENDS}, got {backend!r}")


def evaluate_tasks(lm: Any, tasks: list[dict[str, Any]], task_manager: Any, *,
                   limit: int | None, chat: bool, num_fewshot: int, seed: int) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` with seeds fixed and bootstrap off (we compute intervals)."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        limit=limit,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat and num_fewshot > 0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
        bootstrap_iters=0,
    )
    assert results is not None  # only None on non-zero ranks
    return results

