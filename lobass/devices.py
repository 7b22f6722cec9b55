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
