"""How much device memory each stage of a run needs, worked out before any weight is loaded.

A 7B model that does not fit should fail in a second with the numbers and the fixes, not after a
20-minute download, or after training, when evaluation runs out of memory. The estimate is per
device (one rank under ``torchrun``), for every stage the run will reach, each with its own peak:

* **reference / train**: weights in ``model.dtype`` (``auto`` resolved; counted exactly on the
  meta device), LoRA state (float32 weight, gradient and Adam's two moments: 16 bytes per
  adapter parameter), and the activations autograd keeps for one micro-batch (per-layer
  coefficients calibrated against autograd's saved tensors on CPU; ``tests/test_gpu_configs.py``
  re-measures them). Under FSDP
  or ZeRO-3 the weights and LoRA state are divided by the process count, but the layers being
  computed are gathered whole: the non-layer weights (embeddings, LM head) and two decoder
  layers (the one running and the one prefetched) are added back.
* **score**: the whole model on every rank (scoring shards rows, not weights), the reference
  adapter, and what the engine allocates for one batch of ``score.max_tokens_per_batch`` padded
  tokens: one layer's transient tensors, the final hidden states and the response rows gathered
  from them, and one chunk of logits (the LM head runs at response positions only, 64 rows at a
  time on the CPU; on CUDA as many as the memory the weights leave allows, up to 4096:
  ``lobass.scoring.engine.head_chunk``). No key/value cache: the engine's forwards keep none.
* **eval**: the merged model, then the largest of: held-out losses (as scoring), lm-eval's GSM8K
  and IFEval generation (``batch_size`` rows of up to ``max_length`` tokens of key/value cache;
  ``auto`` lets lm-eval find the batch that fits, counted here as one row), and the answers for
  the judge (``generation.batch_size`` rows of ``data.max_length + max_new_tokens`` tokens).
* **eval/vllm** (``eval.backend=vllm``): vLLM's own copy of the weights and at least one
  ``max_length`` sequence of cache beside the merged model the eval stage still holds.

Kernels, allocator fragmentation and autocast shift the figures by perhaps +-20%, so the check
fails only when a stage's estimate exceeds the device's total memory; the log shows every stage.
"""

from __future__ import annotations

import logging
import os

import torch
from omegaconf import DictConfig

from lobass.devices import check_device
from lobass.memory.shape import Shape, architecture_config, model_shape
from lobass.memory.stages import (
    BYTES,
    GIB,
    MemoryEstimate,
    StageEstimate,
    estimate_memory,
    generation_bytes,
    kv_bytes_per_token,
    layer_activation_bytes,
    scoring_activation_bytes,
    training_activation_bytes,
)

__all__ = [
    "BYTES", "GIB", "InsufficientMemoryError", "MemoryEstimate", "Shape", "StageEstimate",
    "architecture_config", "check_memory", "estimate_memory", "generation_bytes",
    "kv_bytes_per_token", "layer_activation_bytes", "model_shape", "scoring_activation_bytes",
    "training_activation_bytes", "visible_memory",
]

log = logging.getLogger(__name__)


class InsufficientMemoryError(RuntimeError):
    """A stage's estimate exceeds the memory of the device it runs on."""


def visible_memory(device: str) -> tuple[str, int]:
    """What a rank runs on and its total bytes: the smallest visible GPU, or host RAM."""
    if device == "cuda":
        sizes = [torch.cuda.get_device_properties(i).total_memory
                 for i in range(torch.cuda.device_count())]
        name = torch.cuda.get_device_name(0)
        return f"{len(sizes)} x {name} (smallest {min(sizes) / GIB:.0f} GiB)", min(sizes)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"CPU ({ram / GIB:.0f} GiB RAM)", ram


FIXES = {  # what lowers each stage's estimate
    "reference": "reference.batch_size or reference.micro_batch_size (passes of fewer rows, "
                 "the same optimiser step), "
                 "reference.gradient_checkpointing=true, data.max_length, or shard the weights "
                 "(reference=lora_gpu_fsdp under torchrun)",
    "train": "train.batch_size or train.micro_batch_size (passes of fewer rows, the same "
             "optimiser step), "
             "train.gradient_checkpointing=true, data.max_length, or shard the weights "
             "(train=lora_gpu_fsdp under torchrun)",
    "score": "score.max_tokens_per_batch",
    "eval": "eval.generation.batch_size, eval.gsm8k.batch_size / eval.ifeval.batch_size (auto "
            "fits itself), score.max_tokens_per_batch (held-out losses)",
    "eval/vllm": "eval.backend=hf, or eval.gsm8k.max_length / eval.ifeval.max_length",
}


def check_memory(cfg: DictConfig, model_path: str | None = None) -> MemoryEstimate | None:
    """Log every stage's estimate; raise when one cannot fit (``memory_check``: error, warn, off).

    Args:
        cfg: the composed config.
        model_path: local checkpoint to read the architecture from when ``model.arch`` is absent.

    Returns:
        The estimate, or None when the architecture is unknown offline or the check is off.

    Raises:
        InsufficientMemoryError: naming each stage that does not fit, its numbers and its knobs.
        DeviceUnavailableError: ``model.device=cuda`` without CUDA.

    """
    mode = str(cfg.memory_check)
    if mode not in ("error", "warn", "off"):
        raise ValueError(f"memory_check must be error, warn or off; got {mode!r}")
    if mode == "off":
        return None
    config = architecture_config(cfg.model, model_path)
    if config is None:
        log.info("model=%s: no model.arch and no local config.json; memory estimate skipped",
                 cfg.model.name)
        return None
    rank = max(int(cfg[g].lora.r) for g in ("reference", "train") if g in cfg)
    shape = model_shape(config, list(cfg.model.lora_targets), rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = check_device(cfg.model)
    name, available = visible_memory(device)
    estimate = estimate_memory(cfg, shape, world, device == "cuda", available)
    log.info("memory estimate for model=%s (%.2fB parameters, %.1fM LoRA) per device, by stage: "
             "%s; visible: %s", cfg.model.name, shape.n_params / 1e9, shape.n_lora / 1e6,
             estimate.describe(), name)
    over = [s for s in estimate.stages.values() if s.total > available]
    if over:
        message = (f"model={cfg.model.name} does not fit the {available / GIB:.1f} GiB of {name}: "
                   + "; ".join(f"{s.describe()} (lower {FIXES[s.stage]})" for s in over)
                   + ". Or pick a smaller model; memory_check=warn runs anyway.")
        if mode == "error":
            raise InsufficientMemoryError(message)
        log.warning(message)
    return estimate
