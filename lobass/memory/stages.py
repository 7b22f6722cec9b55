"""Bytes per device of each stage: training, scoring, evaluation, vLLM (see ``lobass.memory``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from lobass.devices import model_dtype, weight_sharding
from lobass.memory.shape import Shape
from lobass.scoring.engine import HEAD_CHUNK, head_chunk
from lobass.training import rows_per_pass

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LORA_BYTES_PER_PARAM = 16  # float32 weight + gradient + Adam's exp_avg and exp_avg_sq
CUDA_RUNTIME_BYTES = 1 * GIB  # CUDA context, cuBLAS/cuDNN workspaces: present before any tensor
TRAIN_LOGIT_BYTES = 12  # per (token x vocab): bf16 logits, float32 copy, log-softmax, its grad
VLLM_OVERHEAD_BYTES = 2 * GIB  # vLLM's profiling forward, sampler and CUDA graphs beside the cache

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
class StageEstimate:
    """Peak bytes per device of one stage, by part (a part of 0 is left out of the line)."""

    stage: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The stage's peak: all its parts are held at once."""
        return sum(self.parts.values())

    def describe(self) -> str:
        """``stage: 18.2 GiB = weights 12.6 + ...``, for the log and the error message."""
        parts = " + ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.stage} {self.total / GIB:.1f} GiB = {parts}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Every stage's estimate; the run needs the largest."""

    stages: dict[str, StageEstimate]

    @property
    def peak(self) -> StageEstimate:
        """The stage with the largest estimate."""
        return max(self.stages.values(), key=lambda s: s.total)

    @property
    def total(self) -> int:
        """Bytes the run needs per device: its largest stage."""
        return self.peak.total

    def describe(self) -> str:
        """One clause per stage, in GiB."""
        return "; ".join(s.describe() for s in self.stages.values())


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


def kv_bytes_per_token(shape: Shape, dtype: str) -> int:
    """Key/value cache bytes of one token over all layers."""
    return shape.layers * 2 * shape.kv * BYTES[dtype]


def _transient_bytes(shape: Shape, dtype: str) -> int:
    """Forward-only bytes alive at once inside one layer, per token.

    The residual, the normed input, attention output and o_proj output (4 x h), keys and values
    joined with any cached prefix (2 x kv), and the MLP's gate, up and their product (3 x I).
    """
    return (4 * shape.hidden + 2 * shape.kv + 3 * shape.intermediate) * BYTES[dtype]


def scoring_activation_bytes(shape: Shape, dtype: str, max_tokens_per_batch: int,
                             head_rows: int = HEAD_CHUNK) -> int:
    """Peak of one scoring batch as ``lobass.scoring.engine`` computes it.

    Per padded token: one layer's transient tensors, the final hidden states and the response
    rows gathered from them (2 x h). No key/value cache: the engine's batches keep none (the
    shared prefix's, a few tokens, is negligible). Once per batch: a ``head_rows``-row chunk of
    logits in the model dtype, their float32 copy and cross-entropy's float32 log-softmax
    (``HEAD_CHUNK`` on the CPU; on CUDA :func:`lobass.scoring.engine.head_chunk`).
    """
    per_token = _transient_bytes(shape, dtype) + 2 * shape.hidden * BYTES[dtype]
    head = head_rows * shape.vocab * (BYTES[dtype] + 4 + 4)
    return max_tokens_per_batch * per_token + head


def generation_bytes(shape: Shape, dtype: str, rows: int, context: int, prompt: int) -> int:
    """Peak of ``generate()`` over ``rows`` prompts of ``prompt`` tokens growing to ``context``.

    The key/value cache of every row at full length, the prefill's transient tensors, and float32
    logits (and their softmax) of the last position only: generate keeps one position per row.
    """
    cache = rows * context * kv_bytes_per_token(shape, dtype)
    prefill = rows * prompt * _transient_bytes(shape, dtype)
    return cache + prefill + rows * shape.vocab * 4 * 2


def lm_eval_rows(batch_size: Any) -> int:
    """Rows per lm-eval call: the number, or 1 for ``auto`` (lm-eval then finds what fits)."""
    return 1 if str(batch_size).startswith("auto") else int(batch_size)


def _weights(shape: Shape, dtype: str, sharding: str | None, world: int) -> int:
    """Weight bytes one rank holds at its peak (see the module docstring for sharding)."""
    full = shape.n_params * BYTES[dtype]
    if sharding is None or world <= 1:
        return full
    gathered = (shape.n_params - shape.layers * shape.layer_params + 2 * shape.layer_params)
    return min(full, full // world + gathered * BYTES[dtype])


def estimate_memory(cfg: DictConfig, shape: Shape, world: int, on_cuda: bool,
                    device_bytes: int | None = None) -> MemoryEstimate:
    """Per-device bytes of every stage the run reaches.

    Args:
        cfg: the composed config (``model``, ``data``, ``reference``, ``train``, ``score``,
            ``eval``, ``stages``), ``auto`` values resolved (``lobass.config.validate``).
        shape: from ``model_shape``.
        world: processes sharing the work (``WORLD_SIZE``); only FSDP and ZeRO-3 divide weights.
        on_cuda: add the CUDA runtime's fixed cost.
        device_bytes: the device's total memory; on CUDA the LM-head chunk is then the one the
            engine will choose once the model is loaded (``head_chunk`` of what the weights and
            runtime leave: at least what it finds free then), else ``HEAD_CHUNK``.

    Raises:
        ValueError: an unknown ``model.dtype``.

    """
    dtype = model_dtype(cfg.model)  # auto resolved as the run resolves it
    if dtype not in BYTES:
        raise ValueError(f"model.dtype must be one of {sorted(BYTES)}, got {dtype!r}")
    runtime = CUDA_RUNTIME_BYTES if on_cuda else 0
    full = shape.n_params * BYTES[dtype]
    wanted = set(cfg.stages)
    trains = bool(wanted & {"train", "eval"})
    scores = trains or bool(wanted & {"score", "select"})
    stages: dict[str, StageEstimate] = {}
    for name in ("reference", "train"):
        if name not in cfg or not (name in wanted or (name == "reference" and scores)
                                   or (name == "train" and trains)):
            continue
        g = cfg[name]
        sharding = weight_sharding(g)
        split = world if sharding else 1
        stages[name] = StageEstimate(name, {
            "weights": _weights(shape, dtype, sharding, world),
            "LoRA state": shape.n_lora * LORA_BYTES_PER_PARAM // split,
            "activations": training_activation_bytes(
                shape, dtype, rows_per_pass(g),
                int(cfg.data.max_length),
                bool(g.gradient_checkpointing), float(g.lora.dropout)),
            "runtime": runtime})
    budget = int(cfg.score.max_tokens_per_batch)
    head_rows = (head_chunk("cuda", device_bytes - full - runtime, shape.vocab, BYTES[dtype])
                 if on_cuda and device_bytes else HEAD_CHUNK)
    scoring = scoring_activation_bytes(shape, dtype, budget, head_rows)
    if scores:
        stages["score"] = StageEstimate("score", {
            # an adapter loaded for inference takes the model's dtype (modeling.load_adapter)
            "weights": full, "adapter": shape.n_lora * BYTES[dtype],
            "activations": scoring, "runtime": runtime})
    if "eval" in wanted and "eval" in cfg:
        ev = cfg.eval
        work = {"held-out losses": scoring}
        for task in ("gsm8k", "ifeval"):
            t = ev[task]
            if t.enabled and ev.backend == "hf":
                length = int(t.max_length)
                work[task] = generation_bytes(shape, dtype, lm_eval_rows(t.batch_size), length,
                                              length - int(t.max_gen_toks))
        gen = ev.generation
        if gen.enabled:
            prompt = int(cfg.data.max_length)
            # the longest cap of any enabled set (a set may set its own max_new_tokens)
            new = max([int(gen.max_new_tokens)] + [int(s.max_new_tokens) for s in
                       gen.sets.values() if s.enabled and s.max_new_tokens])
            work["generation"] = generation_bytes(shape, dtype, int(gen.batch_size),
                                                  prompt + new, prompt)
        step = max(work, key=lambda k: work[k])
        stages["eval"] = StageEstimate("eval", {"weights": full, step: work[step],
                                                "runtime": runtime})
        if ev.backend == "vllm":
            length = max(int(ev[t].max_length) for t in ("gsm8k", "ifeval") if t in ev)
            stages["eval/vllm"] = StageEstimate("eval/vllm", {
                "merged model": full, "vLLM weights": full,
                "vLLM LoRA": shape.n_lora * BYTES[dtype],
                "vLLM cache": length * kv_bytes_per_token(shape, dtype),
                "vLLM overhead": VLLM_OVERHEAD_BYTES, "runtime": runtime})
    return MemoryEstimate(stages)


