"""Which device a run's models use, how training shards them, and freeing memory between stages.

A GPU recipe must never fall back to the CPU without a word (a 7B run would crawl for weeks), and
a stage's model must not outlive the stage (the next stage would run out of memory).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig

DEVICES = ("auto", "cuda", "cpu")
SHARDINGS = ("fsdp", "zero3")
AUTO = "auto"  # model.dtype and score.shard_rows: chosen for the device the run finds
CPU_SHARD_ROWS = 256  # score.shard_rows=auto on the CPU: what every CPU losses key was made with
# score.shard_rows=auto on CUDA: a shard holds this many batches of the longest rows, so the
# GPU's batches are full (a shard's last batch is partial) and rows sort by length over more rows.
CUDA_SHARD_BATCHES = 16


class DeviceUnavailableError(RuntimeError):
    """``model.device=cuda`` on a machine where torch sees no CUDA device."""


def check_device(model_cfg: DictConfig) -> str:
    """The device the run's models use: ``model.device`` resolved, or a loud error.

    ``auto`` takes CUDA when torch sees it, else the CPU; ``cuda`` never falls back, because a
    7B recipe that quietly ran on the CPU would take weeks and compare its memory against host RAM.

    Args:
        model_cfg: the ``model`` config group (``device``: auto, cuda or cpu; absent = auto).

    Returns:
        ``"cuda"`` or ``"cpu"``.

    Raises:
        ValueError: an unknown ``model.device``, listing the valid ones.
        DeviceUnavailableError: ``cuda`` asked for and unavailable, naming both fixes.

    """
    return resolve_device(str(model_cfg.device), f"model={model_cfg.name}")


def resolve_device(device: str, who: str) -> str:
    """``auto``/``cuda``/``cpu`` resolved to ``cuda`` or ``cpu`` (see :func:`check_device`).

    Raises:
        ValueError: an unknown device, listing the valid ones.
        DeviceUnavailableError: ``cuda`` asked for and unavailable, naming both fixes.

    """
    if device not in DEVICES:
        raise ValueError(f"model.device must be one of {', '.join(DEVICES)}; got {device!r}")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise DeviceUnavailableError(
            f"{who} asks for model.device=cuda, but torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda}) sees no CUDA device. On a GPU machine, install "
            "the CUDA build its driver runs (bash scripts/setup.sh picks it from nvidia-smi); to "
            "run on this machine's CPU anyway (slow for GPU-sized models), add model.device=cpu.")
    if device == "auto":
        return "cuda" if available else "cpu"
    return device


def device_type(device: str) -> str:
    """``model.device`` as the device a run would use, never raising (for choosing defaults).

    ``cuda`` without CUDA counts as the CPU here: :func:`check_device` refuses it before any
    work, with the fix; a default chosen for it is never used.
    """
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str, bf16_supported: bool) -> str:
    """``model.dtype``, with ``auto`` chosen for the device: a pure function (tested on CPU).

    ``auto`` is bfloat16 on a CUDA device that runs it natively (Ampere or newer): half the
    memory and tensor-core speed, and training's bf16 autocast needs no loss scaling. Float32
    everywhere else: on a CPU bf16 is ~6x slower (no native support, benchmarks/README.md), and
    on an older GPU float16 would need loss scaling that LoRA recipes here do not set up.

    Args:
        dtype: ``model.dtype`` as configured (``auto``, ``float32``, ``bfloat16``, ``float16``).
        device: the resolved device, ``cuda`` or ``cpu``.
        bf16_supported: native bf16 on that device (compute capability 8.0 or newer).

    Returns:
        A concrete dtype name; any other value is returned as it is (the schema checks it).

    """
    if dtype != AUTO:
        return dtype
    return "bfloat16" if device == "cuda" and bf16_supported else "float32"


def model_dtype(model_cfg: DictConfig) -> str:
    """``model.dtype`` resolved on this machine (see :func:`resolve_dtype`)."""
    device = device_type(str(model_cfg.device))
    # Native bf16 only (compute capability 8.0+): torch counts a V100's emulated bf16 as
    # supported by default, at a fraction of float32's speed. No tensor is made to ask.
    supported = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return resolve_dtype(str(model_cfg.dtype), device, supported)


def resolve_shard_rows(shard_rows: int | str, device: str, max_tokens_per_batch: int,
                       max_length: int) -> int:
    """``score.shard_rows``, with ``auto`` chosen for the device: a pure function.

    A shard is the unit of resume and of work per rank, and rows are batched within it, so its
    size moves losses by float rounding and stays in the losses key: it must follow from the
    config alone, never from memory free at the moment (a resumed run must find its shards, and
    the same config must give the same key). Memory does not bound it either: a shard's rows go
    through the model one batch of ``max_tokens_per_batch`` at a time (the budget is what memory
    sets). On the CPU ``auto`` is 256, what every CPU key was made with. On CUDA, the rows of
    ``CUDA_SHARD_BATCHES`` batches of rows of ``max_length`` tokens (at least 256): 512 for
    ``score=gpu``'s 16384-token budget over 512-token rows; typical rows are shorter, so a shard
    fills several times more full batches than that.

    Args:
        shard_rows: ``score.shard_rows`` as configured (an integer or ``auto``).
        device: the resolved device, ``cuda`` or ``cpu``.
        max_tokens_per_batch: ``score.max_tokens_per_batch``.
        max_length: ``data.max_length`` (the longest a row can be).

    Returns:
        Rows per shard.

    """
    if shard_rows != AUTO:
        return int(shard_rows)
    if device != "cuda":
        return CPU_SHARD_ROWS
    return max(CPU_SHARD_ROWS, CUDA_SHARD_BATCHES * (max_tokens_per_batch // max_length))


def resolve_auto(cfg: DictConfig) -> None:
    """Replace ``auto`` in ``model.dtype`` and ``score.shard_rows`` by this machine's choice.

    Done once, in the config itself (like the schema's defaults), before any key is computed:
    every key then holds the concrete value, so a CPU float32 artifact is never reused by a
    CUDA bf16 run, and CPU keys are exactly what they were when the configs said float32 / 256.
    """
    from omegaconf import open_dict

    with open_dict(cfg):
        if "model" in cfg and cfg.model.get("dtype") == AUTO:
            cfg.model.dtype = model_dtype(cfg.model)
        score = cfg.get("score")
        if score is not None and score.get("shard_rows") == AUTO and "model" in cfg:
            score.shard_rows = resolve_shard_rows(
                AUTO, device_type(str(cfg.model.device)), int(score.max_tokens_per_batch),
                int(cfg.data.max_length))


def enable_tf32() -> bool:
    """Let float32 matmuls use TF32 tensor cores on CUDA; a no-op (False) without CUDA.

    Float32 on an Ampere-or-newer GPU otherwise runs at the plain FP32 rate (8x below TF32 on an
    A100, ~15x on an H100); TF32 keeps float32's range with a 10-bit mantissa, which moves losses
    by ~1e-4 relative: what ``model_key`` marks for a float32 CUDA model. bf16 work is unchanged.
    Called once at the start of a run (``lobass.pipeline.run``) and by the benchmarks.
    """
    if not torch.cuda.is_available():
        return False  # the CPU path computes exactly as before (tests pin its numbers)
    # One call, the API every torch since 1.12 takes (the allow_tf32 flags are deprecated from
    # 2.9). cuDNN convolutions already default to TF32, and a decoder has none.
    torch.set_float32_matmul_precision("high")
    return True


def weight_sharding(train_cfg: DictConfig | None) -> str | None:
    """``fsdp`` or ``zero3`` when a ``train``/``reference`` group shards the weights, else None.

    ZeRO stages 1 and 2 shard only optimiser state and gradients, which for LoRA are small: the
    frozen weights stay whole on every rank, so only stage 3 counts. A DeepSpeed JSON path is not
    read here and counts as unsharded (the memory estimate's safe side).
    """
    if train_cfg is None:
        return None
    if bool(train_cfg.fsdp):
        return "fsdp"
    deepspeed = train_cfg.deepspeed
    if isinstance(deepspeed, DictConfig):
        stage = (deepspeed.get("zero_optimization") or {}).get("stage")
        if stage is not None and int(stage) == 3:
            return "zero3"
    return None


def device_map(device: str) -> dict[str, Any] | None:
    """Where ``from_pretrained`` puts every weight: this rank's own GPU, or None (the CPU)."""
    if device != "cuda":
        return None  # the CPU path loads as it always has (tests pin its numbers)
    return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}


def free_memory() -> None:
    """Give back the memory of models a stage has dropped, before the next stage loads its own.

    A dropped model is not freed by ``del`` alone: accelerate rebinds ``model.forward`` (and
    ``Trainer`` keeps the model in its state), which leaves reference cycles that only the cycle
    collector breaks; then CUDA's caching allocator still holds the blocks until they are emptied.
    Without this, a 13B stage's weights outlive it and the next stage runs out of memory.
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
