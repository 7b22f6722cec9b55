"""lm-eval plumbing shared by the benchmark tasks: the model wrapper and one task manager.

lm-eval's default task registry is slow to index (benchmarks/README.md) and fetches its datasets
from the hub, so we never build it: tasks come from YAMLs shipped in ``lobass/tasks`` (or, for
IFEval, lm-eval's own folder alone) with local data files substituted, and one ``TaskManager``
serves a whole run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
BACKENDS = ("hf", "vllm")
VLLM_MARGIN_BYTES = 2 * 2**30  # left free for this process's tensors beside vLLM's share


def build_task_manager(include_paths: list[Path] | None = None) -> Any:
    """A ``TaskManager`` that indexes only the given folders, never lm-eval's default registry."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths or []]
    return TaskManager(include_defaults=False, include_path=paths or None)


def lm_batch_size(value: Any) -> int | str:
    """``eval.<task>.batch_size`` as lm-eval takes it: a positive number, or ``auto``/``auto:N``.

    ``auto`` has lm-eval find the largest batch that fits the device (the GPU default); it is
    handed through as it is.

    Raises:
        ValueError: anything else, naming the valid forms.

    """
    text = str(value)
    if text == "auto" or (text.startswith("auto:") and text[5:].replace(".", "", 1).isdigit()):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"eval batch_size must be a positive number, auto or auto:N; got {value!r}")


def vllm_device_env(local_rank: int, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` that leaves vLLM this rank's own GPU and no other.

    vLLM places its engine on the first visible device, which is GPU 0 for every ``torchrun``
    rank unless the engine process sees only the rank's GPU (lm-eval's VLLM says to select GPUs
    this way). ``visible`` is the job's own list (a SLURM allocation, say): the rank's entry of it.
    """
    devices = [d for d in (visible or "").split(",") if d.strip()]
    if not devices:
        return str(local_rank)
    if local_rank >= len(devices):
        raise ValueError(f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible} lists "
                         f"{len(devices)} device(s)")
    return devices[local_rank].strip()


def _build_vllm(model_path: str, *, revision: str | None, dtype: str, max_length: int,
                adapter_dir: Path | None, max_lora_rank: int) -> Any:
    """lm-eval's vLLM model on this rank's GPU, started once memory from earlier stages is back.

    vLLM refuses to start unless ``gpu_memory_utilization`` x the card is free, so what the
    stages before left (a trainer's cycles, the allocator's cache) is collected first, and the
    share vLLM asks for is what is free now, less a margin for this process's own tensors.
    """
    import gc

    import torch

    try:
        from lm_eval.models.vllm_causallms import VLLM
    except ImportError as err:
        raise ImportError("eval.backend=vllm needs vLLM, which pins its own torch and "
                          "transformers: pip install vllm==0.33.0 into a separate environment "
                          "and run the eval stage from it (docs/gpu.md, section 5), or use "
                          "eval.backend=hf") from err
    gc.collect()  # frees models whose last references were cycles (accelerate's forward wraps)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    utilization = round(max(0.05, (free - VLLM_MARGIN_BYTES) / total), 3)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = vllm_device_env(local_rank, previous)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine's own process
    log.info("eval.backend=vllm: %s@%s on GPU %s, gpu_memory_utilization %.3f (%.1f of %.1f GiB "
             "free)", model_path, revision, os.environ["CUDA_VISIBLE_DEVICES"], utilization,
             free / 2**30, total / 2**30)
    try:
        # vLLM cannot take an in-memory model: it loads the same initial weights (at the pinned
        # revision) and serves the trained adapter as a LoRA request, equivalent to the merge.
        return VLLM(pretrained=model_path, revision=revision, dtype=dtype,
                    max_model_len=max_length, gpu_memory_utilization=utilization,
                    lora_local_path=str(adapter_dir) if adapter_dir else None,
                    max_lora_rank=max_lora_rank, batch_size="auto")
    finally:  # the engine process has started; this process keeps its own view of the GPUs
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def build_lm(model: Any, tokenizer: Any, backend: str, *, batch_size: int | str,
             max_length: int, model_path: str | None = None, adapter_dir: Path | None = None,
             max_lora_rank: int = 16, dtype: str = "auto", revision: str | None = None) -> Any:
    """The lm-eval model object for ``eval.backend``.

    Args:
        model: the in-memory transformers model (adapter merged); used by ``hf``.
        tokenizer: its tokenizer.
        backend: ``hf`` (the in-memory model, nothing reloaded) or ``vllm`` (GPU: vLLM loads the
            initial weights from ``model_path`` and applies the LoRA adapter in ``adapter_dir``).
        batch_size: prompts per generation call, or ``auto`` (``hf``); vLLM schedules its own.
        max_length: context limit prompts are truncated to.
        model_path: initial model directory or hub id (``vllm``).
        adapter_dir: peft adapter directory (``vllm``).
        max_lora_rank: LoRA rank the vLLM engine must accept (``train.lora.r``).
        dtype: weights dtype for vLLM.
        revision: ``model.revision``, the commit vLLM loads (``vllm``).

    Raises:
        ValueError: an unknown backend, a bad batch size, or ``vllm`` without a model path.

    """
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm_batch_size(batch_size),
                    max_length=max_length)
    if backend == "vllm":
        if model_path is None:
            raise ValueError("eval.backend=vllm needs the initial model's path")
        return _build_vllm(model_path, revision=revision, dtype=dtype, max_length=max_length,
                           adapter_dir=adapter_dir, max_lora_rank=max_lora_rank)
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

