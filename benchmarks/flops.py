"""FLOPs the scoring engine executes, and the dense peaks of the GPU it runs on (for MFU).

MFU divides by the peak of the precision the matmuls actually run at: bf16 for a bf16 model,
TF32 for a float32 model on CUDA with TF32 on (lobass enables it), plain FP32 otherwise. Dividing
bf16 work by an FP32 ceiling (or float32 work by the bf16 peak) misstates it by 2-15x.

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


@dataclass(frozen=True)
class Peaks:
    """Dense peaks of one GPU in TFLOP/s (no 2:4 sparsity), and the document they come from."""

    bf16: float  # tensor cores, FP32 accumulate (FP16 is the same rate on every part listed)
    tf32: float  # tensor cores: float32 matmuls with TF32 on (lobass.devices.enable_tf32)
    fp32: float  # CUDA cores: float32 with TF32 off
    source: str


# Matched in order against torch.cuda.get_device_name(): the first pattern that matches wins, so
# the PCIe and NVL variants come before the plain "H100"/"H200" (which are the SXM parts).
# NVIDIA's datasheets print tensor-core figures "with sparsity" (marked *): the dense figure is
# half of it, which is what is listed here.
PEAK_TFLOPS: list[tuple[str, Peaks]] = [
    (r"H100.*PCIe", Peaks(756.0, 378.0, 51.0, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe "
                                             "(BF16 1,513*, TF32 756*, FP32 51 TFLOPS)")),
    (r"H100 NVL", Peaks(835.0, 417.5, 60.0, "NVIDIA H100 datasheet, H100 NVL (BF16 1,671*, "
                                           "TF32 835*, FP32 60 TFLOPS)")),
    (r"H200 NVL", Peaks(835.0, 417.5, 60.0, "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL "
                                           "(BF16 1,671*, TF32 835*, FP32 60 TFLOPS)")),
    (r"H100", Peaks(989.0, 494.5, 67.0, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM "
                                       "(BF16 1,979*, TF32 989*, FP32 67 TFLOPS)")),
    (r"H200", Peaks(989.0, 494.5, 67.0, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM "
                                       "(BF16 1,979*, TF32 989*, FP32 67 TFLOPS)")),
    (r"A100", Peaks(312.0, 156.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet, 40/80 GB, SXM "
                                       "and PCIe (BF16 312, TF32 156, FP32 19.5 TFLOPS)")),
    (r"L40S", Peaks(362.0, 183.0, 91.6, "NVIDIA L40S datasheet (BF16 733*, TF32 366*, FP32 "
                                       "91.6 TFLOPS)")),
    # AWS's A10 variant has no NVIDIA datasheet: figures as AWS quotes them (BF16 70, TF32 35,
    # FP32 35 dense), e.g. baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference
    (r"A10G", Peaks(70.0, 35.0, 35.0, "AWS EC2 G5 A10G (no NVIDIA datasheet; AWS's figures: "
                                     "BF16 70, TF32 35, FP32 35 TFLOPS dense)")),
    (r"A10\b", Peaks(125.0, 62.5, 31.2, "NVIDIA A10 Tensor Core GPU datasheet (BF16 250*, TF32 "
                                        "125*, FP32 31.2 TFLOPS)")),
    (r"L4\b", Peaks(121.0, 60.0, 30.3, "NVIDIA L4 Tensor Core GPU datasheet (BF16 242*, TF32 "
                                       "120*, FP32 30.3 TFLOPS)")),
    (r"RTX 4090", Peaks(165.2, 82.6, 82.6, "NVIDIA Ada GPU architecture whitepaper, GeForce "
                                          "RTX 4090 (BF16 FP32-accumulate 165.2, TF32 82.6 "
                                          "dense; 330 with FP16 accumulate)")),
]


def device_peaks(device_name: str) -> Peaks | None:
    """Dense peaks of a GPU by the name CUDA reports, or None when it is not in the table."""
    return next((peaks for pattern, peaks in PEAK_TFLOPS if re.search(pattern, device_name)),
                None)


def precision(dtype: str, tf32: bool) -> str:
    """Which peak a model in ``dtype`` runs its matmuls at: ``bf16``, ``tf32`` or ``fp32``.

    bf16 and fp16 weights run on the half-precision tensor cores (the same dense rate on every
    part listed); float32 on the TF32 tensor cores when TF32 is on, else on the CUDA cores.
    """
    if dtype in ("bfloat16", "float16", "torch.bfloat16", "torch.float16"):
        return "bf16"
    return "tf32" if tf32 else "fp32"


def peak_tflops(device_name: str, dtype: str, tf32: bool) -> float | None:
    """Dense peak for ``dtype``'s matmuls (see :func:`precision`), or None for an unknown GPU."""
    peaks = device_peaks(device_name)
    return getattr(peaks, precision(dtype, tf32)) if peaks else None


def bf16_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by the name CUDA reports, or None when it is not in the table."""
    return peak_tflops(device_name, "bfloat16", False)


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
