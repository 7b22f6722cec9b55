"""FLOPs the scoring engine executes, and the bf16 peak of the GPU it runs on (for MFU).

Model FLOP utilisation here counts only work the engine does: the decoder body for every token
outside the shared prefix (the prefix is encoded once per run, not once per row), the LM head at
response positions only, and causal attention over the keys each token sees. Counting
``2 x params x tokens`` instead, as the "effective" rate does, credits the engine with work it
skips, which inflates MFU by the share of prompt positions the LM head never sees.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Dense bf16 tensor-core peaks (TFLOP/s, FP32 accumulate, no sparsity) from NVIDIA's data sheets,
# matched in order against torch.cuda.get_device_name(): the first pattern that matches wins, so
# the PCIe and NVL variants come before the plain "H100"/"H200" (which are the SXM parts).
BF16_PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", 835.0),
    (r"H200 NVL", 835.0),
    (r"H100", 989.0),  # "NVIDIA H100 80GB HBM3": SXM5
    (r"H200", 989.0),  # "NVIDIA H200": SXM, same tensor cores as H100 SXM, more memory
    (r"A100", 312.0),  # 40 GB and 80 GB, SXM4 and PCIe alike
    (r"L40S", 362.0),
    (r"A10G", 70.0),  # AWS's A10 variant
    (r"A10\b", 125.0),
    (r"L4\b", 121.0),
    (r"RTX 4090", 165.0),  # FP32 accumulate (330 with FP16 accumulate)
]


def bf16_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by the name CUDA reports, or None when it is not in the table."""
    return next((tf for pattern, tf in BF16_PEAK_TFLOPS if re.search(pattern, device_name)),
                None)


@dataclass(frozen=True)
class Dims:
    """What the FLOP count needs from a model."""

    body_params: int  # every matmul weight of the decoder (no embedding lookup, no LM head)
    head_params: int  # the LM head (vocabulary x hidden)
    layers: int
    hidden: int  # query width: attention heads x head dim


def model_dims(model: Any) -> Dims:
    """``Dims`` of a transformers causal LM (tied embeddings counted once, as the LM head)."""
    config = model.config.get_text_config()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    tied = embed.data_ptr() == head.data_ptr()
    body = total - embed.numel() - (0 if tied else head.numel())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Dims(body, head.numel(), config.num_hidden_layers,
                config.num_attention_heads * head_dim)


def attention_pairs(length: int, start: int) -> int:
    """Causal (query, key) pairs of positions ``start..length-1``: position p sees p + 1 keys."""
    return (length * (length + 1) - start * (start + 1)) // 2


def engine_flops(dims: Dims, features: Sequence[Any], prefix: int) -> float:
    """Forward FLOPs the engine executes on ``features`` with a shared prefix of ``prefix``.

    Per row: ``2 x body`` per token after the prefix, ``4 x hidden`` per layer and attended key
    (QK^T and AV), ``2 x head`` per response position; plus the prefix's body and attention once.
    Padding is not counted: it is waste, not work.
    """
    flops = 2 * dims.body_params * prefix + 4 * dims.layers * dims.hidden * attention_pairs(
        prefix, 0)
    for f in features:
        n = len(f.input_ids)
        flops += 2 * dims.body_params * (n - prefix)
        flops += 4 * dims.layers * dims.hidden * attention_pairs(n, prefix)
        flops += 2 * dims.head_params * f.n_response
    return float(flops)


def naive_flops(dims: Dims, features: Sequence[Any]) -> float:
    """Forward FLOPs of ``model(input_ids, labels=...)`` row by row: LM head at every position."""
    return float(sum(2 * (dims.body_params + dims.head_params) * len(f.input_ids)
                     + 4 * dims.layers * dims.hidden * attention_pairs(len(f.input_ids), 0)
                     for f in features))
