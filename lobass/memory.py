"""How much device memory a run needs, worked out before any weight is loaded.

A 7B model that does not fit should fail in a second with the numbers and the fixes, not after a
20-minute download and an out-of-memory error in the middle of the first backward pass. The
estimate is per device (one rank under ``torchrun``) and has four parts:

* **weights**: every parameter of the architecture in ``model.dtype`` (counted exactly on the meta
  device, no memory used); divided by the process count under FSDP or DeepSpeed ZeRO-3.
* **LoRA state**: adapter parameters, their gradients and Adam's two moments, all float32
  (peft keeps adapters in float32 when the base is bf16): 16 bytes per adapter parameter.
* **activations**: what autograd keeps for the backward pass at ``batch_size x max_length``
  tokens, from per-layer coefficients calibrated by measuring autograd's saved tensors on CPU
  (``tests/test_gpu_configs.py`` re-measures them), plus the logits and their loss.
* **scoring**: the forward-only peak of the scoring pass at ``score.max_tokens_per_batch``.

It is an estimate (kernels, allocator fragmentation and autocast shift it by perhaps +-20%), so the
check fails only when the estimate exceeds the device's total memory; the log line always shows it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_BYTES_PER_PARAM = 16  # float32 weight + gradient + Adam's exp_avg and exp_avg_sq
CUDA_RUNTIME_BYTES = 1 * GIB  # CUDA context, cuBLAS/cuDNN workspaces: present before any tensor
TRAIN_LOGIT_BYTES = 12  # per (token x vocab): bf16 logits, float32 copy, log-softmax, its grad
SCORE_LOGIT_BYTES = 8  # per (response token x vocab): float32 logits and log-softmax, no grads

# Bytes autograd keeps per token and per decoder layer, per unit of hidden size (h), key/value
# width (kv = kv heads x head dim) and MLP width (I), measured on CPU with LoRA on every linear
# projection (saved_tensors_hooks over one forward pass, 1 vs 2 layers). In bf16 the h term is
# larger than half the float32 one because norms compute in float32 and peft casts each adapter
# input to its float32 weights. LoRA dropout adds a masked copy and its mask of every adapted
# input ("dropout" bytes per input feature).
LAYER_COEFFICIENTS = {
    "bfloat16": {"h": 36, "kv": 4, "I": 10, "dropout": 4},
    "float16": {"h": 36, "kv": 4, "I": 10, "dropout": 4},
    "float32": {"h": 24, "kv": 8, "I": 16, "dropout": 6},
}


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that the estimate needs."""

    n_params: int  # all parameters, tied embeddings counted once
    n_lora: int  # adapter parameters for the configured rank and target modules
    lora_inputs: int  # sum of in_features over the adapted linears of one layer
    layers: int
    hidden: int
    kv: int  # key/value width: kv heads x head dim
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by part."""

    weights: int
    lora_state: int
    activations: int  # training peak at batch_size x max_length
    scoring: int  # forward-only peak at score.max_tokens_per_batch
    runtime: int  # CUDA context and workspaces (0 on CPU)

    @property
    def total(self) -> int:
        """Peak bytes: training and scoring never hold their activations at the same time."""
        return (self.weights + self.lora_state + max(self.activations, self.scoring)
                + self.runtime)

    def describe(self) -> str:
        """One line in GiB, for the log and the error message."""
        return (f"{self.total / GIB:.1f} GiB = weights {self.weights / GIB:.1f} + LoRA state "
                f"{self.lora_state / GIB:.2f} + max(training activations "
                f"{self.activations / GIB:.1f}, scoring {self.scoring / GIB:.1f}) + runtime "
                f"{self.runtime / GIB:.1f}")


class InsufficientMemoryError(RuntimeError):
    """The estimate exceeds the memory of the visible devices."""


def architecture_config(model_cfg: DictConfig, model_path: str | None = None,
                        **overrides: Any) -> Any:
    """The transformers config of the model's architecture, without downloading anything.

    Args:
        model_cfg: the ``model`` group; its ``arch`` block (the hub ``config.json`` fields that
            matter, with ``model_type``) is used when present.
        model_path: a local checkpoint directory to read ``config.json`` from otherwise.
        **overrides: fields to replace, e.g. ``num_hidden_layers=2`` for a small test model.

    Returns:
        A ``PretrainedConfig``, or None when neither source is available offline.

    """
    from transformers import AutoConfig

    arch = model_cfg.get("arch")
    if arch is not None:
        fields: dict[str, Any] = OmegaConf.to_container(arch, resolve=True)  # type: ignore[assignment]
        model_type = fields.pop("model_type")
        return AutoConfig.for_model(model_type, **{**fields, **overrides})
    if model_path is None:
        return None
    try:
        config = AutoConfig.from_pretrained(model_path, revision=model_cfg.get("revision"),
                                            trust_remote_code=model_cfg.trust_remote_code)
    except OSError:  # a hub id that is not in the local cache (offline)
        return None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def model_shape(config: Any, lora_targets: list[str], rank: int) -> Shape:
    """Count parameters and adapter sizes exactly on an empty (meta-device) copy of the model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    targets = set(lora_targets)
    adapted = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    n_lora = sum(rank * (m.in_features + m.out_features) for _, m in adapted)
    layer_zero = [m for name, m in adapted if ".layers.0." in f".{name}."]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(
        n_params=n_params,
        n_lora=n_lora,
        lora_inputs=sum(m.in_features for m in layer_zero),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
    )


def layer_activation_bytes(shape: Shape, dtype: str, lora_dropout: float) -> int:
    """Bytes autograd keeps for one token in one decoder layer (no checkpointing)."""
    c = LAYER_COEFFICIENTS[dtype]
    per_token = c["h"] * shape.hidden + c["kv"] * shape.kv + c["I"] * shape.intermediate
    if lora_dropout > 0:
        per_token += c["dropout"] * shape.lora_inputs
    return per_token


def training_activation_bytes(shape: Shape, dtype: str, batch_size: int, max_length: int,
                              checkpointing: bool, lora_dropout: float) -> int:
    """Activation peak of one training micro-batch of ``batch_size x max_length`` tokens.

    With gradient checkpointing each layer keeps only its input (``h`` values per token) and one
    layer at a time is recomputed in full during the backward pass.
    """
    tokens = batch_size * max_length
    layer = layer_activation_bytes(shape, dtype, lora_dropout)
    if checkpointing:
        kept = shape.layers * shape.hidden * BYTES[dtype] + layer
    else:
        kept = shape.layers * layer
    return tokens * (kept + TRAIN_LOGIT_BYTES * shape.vocab)


def scoring_activation_bytes(shape: Shape, dtype: str, max_tokens_per_batch: int) -> int:
    """Forward-only peak of one scoring batch.

    Counts one layer's transient tensors (four of width h, three of width I), the key/value cache
    transformers keeps for every layer during a forward pass, and float32 logits with their
    log-softmax (an upper bound: logits are only taken at response positions).
    """
    el = BYTES[dtype]
    transient = (4 * shape.hidden + 3 * shape.intermediate) * el
    cache = shape.layers * 2 * shape.kv * el
    return max_tokens_per_batch * (transient + cache + SCORE_LOGIT_BYTES * shape.vocab)


def estimate_memory(cfg: DictConfig, shape: Shape, world: int, on_cuda: bool) -> MemoryEstimate:
    """Bytes per device for the run's model, training groups and scoring budget.

    Args:
        cfg: the composed config (``model``, ``data``, ``reference``, ``train``, ``score``).
        shape: from ``model_shape``.
        world: processes sharing the work (``WORLD_SIZE``); only FSDP and ZeRO-3 divide weights.
        on_cuda: add the CUDA runtime's fixed cost.

    """
    dtype = str(cfg.model.dtype)
    if dtype not in BYTES:
        raise ValueError(f"model.dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    groups = [cfg[name] for name in ("reference", "train") if name in cfg]
    sharded = any(bool(g.get("fsdp", False)) or _zero_stage(g.get("deepspeed")) == 3
                  for g in groups)
    activations = max(
        (training_activation_bytes(shape, dtype, int(g.batch_size), int(cfg.data.max_length),
                                   bool(g.gradient_checkpointing), float(g.lora.dropout))
         for g in groups), default=0)
    weights = shape.n_params * BYTES[dtype]
    return MemoryEstimate(
        weights=weights // world if sharded else weights,
        lora_state=shape.n_lora * LORA_BYTES_PER_PARAM,
        activations=activations,
        scoring=scoring_activation_bytes(shape, dtype, int(cfg.score.max_tokens_per_batch)),
        runtime=CUDA_RUNTIME_BYTES if on_cuda else 0,
    )


def _zero_stage(deepspeed: Any) -> int | None:
    if isinstance(deepspeed, DictConfig):
        stage = deepspeed.get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None else None
    return None  # a JSON path: not read here, counted as unsharded (the safe side)


def visible_memory() -> tuple[str, int]:
    """The device a rank trains on and its total bytes: the smallest visible GPU, else host RAM."""
    if torch.cuda.is_available():
        sizes = [torch.cuda.get_device_properties(i).total_memory
                 for i in range(torch.cuda.device_count())]
        name = torch.cuda.get_device_name(0)
        return f"{len(sizes)} x {name} (smallest {min(sizes) / GIB:.0f} GiB)", min(sizes)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"CPU ({ram / GIB:.0f} GiB RAM)", ram


def check_memory(cfg: DictConfig, model_path: str | None = None) -> MemoryEstimate | None:
    """Log the estimate; raise when it cannot fit (``memory_check``: error, warn or off).

    Args:
        cfg: the composed config.
        model_path: local checkpoint to read the architecture from when ``model.arch`` is absent.

    Returns:
        The estimate, or None when the architecture is unknown offline or the check is off.

    Raises:
        InsufficientMemoryError: with the numbers and the knobs that lower them.

    """
    mode = str(cfg.get("memory_check", "error"))
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
    estimate = estimate_memory(cfg, shape, world, torch.cuda.is_available())
    device, available = visible_memory()
    log.info("memory estimate for model=%s (%.2fB parameters, %.1fM LoRA) per device: %s; "
             "visible: %s", cfg.model.name, shape.n_params / 1e9, shape.n_lora / 1e6,
             estimate.describe(), device)
    if estimate.total > available:
        message = (
            f"model={cfg.model.name} needs about {estimate.describe()} per device, more than the "
            f"{available / GIB:.1f} GiB of {device}. Lower train.batch_size/reference.batch_size "
            "(global_batch_size keeps the optimiser step), set *.gradient_checkpointing=true, "
            "lower score.max_tokens_per_batch or data.max_length, shard the weights over GPUs "
            "(train=lora_gpu_fsdp under torchrun), or pick a smaller model. memory_check=warn "
            "runs anyway.")
        if mode == "error":
            raise InsufficientMemoryError(message)
        log.warning(message)
    return estimate
