"""Per-example response losses of a causal LM, batched by length: the hot loop of scoring.

A loss here is the mean token cross-entropy over the labelled (response) tokens of one example.
Three things make it cheaper than ``model(**inputs, labels=...)`` row by row, without changing the
numbers beyond float rounding (tests hold it to 1e-4 of that slow path):

- rows are sorted by length and packed under a padded-token budget, so padding is near zero;
- the LM head runs only at positions that predict a response token, in chunks, so the
  full-vocabulary logits of prompt tokens are never materialised;
- the token prefix that every row shares (chat-template header, default system prompt) is encoded
  once and its key/value cache is reused by every batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from lobass.formatting import IGNORE_INDEX, Features
from lobass.response_loss import base_model, logit_softcap, response_token_losses
from lobass.shared_prefix import PrefixCache, cache_keyword, output_cache, shared_prefix_length

log = logging.getLogger(__name__)

# initial model, reference adapter on, response alone (L(y)); Cherry LLM's L(y|x) and L(y)
LOSSES = ("init", "ref", "uncond", "ifd_cond", "ifd_alone")
INITIAL_MODEL_LOSSES = ("init", "uncond", "ifd_cond", "ifd_alone")  # the adapter disabled
HEAD_CHUNK = 64  # response positions per LM-head call on the CPU: bounds the (n, V) logits
# On CUDA the chunk follows the memory free once the model is loaded (head_chunk): a 64-row head
# matmul leaves a GPU's tensor cores mostly idle. Its logits (model dtype, float32 copy, float32
# log-softmax: dtype bytes + 8 per vocabulary entry) take at most 1/HEAD_MEMORY_SHARE of the free
# memory, beside the batch's activations that score.max_tokens_per_batch sizes; above
# HEAD_CHUNK_MAX rows the head matmul is compute-bound already (4096 x hidden x vocab).
HEAD_MEMORY_SHARE = 32
HEAD_CHUNK_MAX = 4096
# On CPU a forward over many more padded tokens than this is memory-bound, slower than the
# per-row loop (benchmarks/README.md, "Figures behind design choices"). Larger budgets are split
# on CPU; GPUs keep the configured budget.
CPU_MAX_TOKENS_PER_BATCH = 4096


def length_batches(lengths: Sequence[int], max_tokens_per_batch: int) -> list[list[int]]:
    """Group row indices into batches of similar length under a padded-token budget.

    Rows are sorted longest first, so each batch pads only up to its own longest row and the first
    batch shows at once whether the budget fits in memory. A row longer than the budget gets a
    batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = lengths[current[0]] if current else lengths[index]  # longest row in the batch
        if current and (len(current) + 1) * width > max_tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def head_chunk(device: str, free_bytes: int, vocab: int, dtype_bytes: int) -> int:
    """Response positions per LM-head call: ``HEAD_CHUNK`` on the CPU, from free memory on CUDA.

    A pure function of its numbers (tested on the CPU). On CUDA the largest power of two whose
    logits fit in ``free_bytes / HEAD_MEMORY_SHARE``, within ``[HEAD_CHUNK, HEAD_CHUNK_MAX]``:
    4096 for a 32k vocabulary in bf16 on a card with 70 GiB free (1.2 GiB of logits), 512 for
    Gemma's 262k. A power of two keeps the head matmul's shapes (and its kernels) few. Each
    position's loss is its own row of the matmul, so the chunk moves no loss beyond the rounding
    of the kernel cuBLAS picks; it is not in the losses key.

    Args:
        device: ``cuda`` or ``cpu`` (anything else: ``cpu``).
        free_bytes: device memory free now (``torch.cuda.mem_get_info``), model loaded.
        vocab: the LM head's output size.
        dtype_bytes: bytes per element of the model's dtype.

    """
    if device != "cuda":
        return HEAD_CHUNK  # what every CPU figure and pinned number was made with
    rows = free_bytes // HEAD_MEMORY_SHARE // (vocab * (dtype_bytes + 4 + 4))
    if rows < HEAD_CHUNK:
        return HEAD_CHUNK
    return min(HEAD_CHUNK_MAX, 1 << (int(rows).bit_length() - 1))


def model_head_chunk(model: torch.nn.Module) -> int:
    """:func:`head_chunk` for ``model`` on its device, with the memory free now."""
    head = base_model(model).get_output_embeddings().weight
    if head.device.type != "cuda":
        return HEAD_CHUNK
    free, _ = torch.cuda.mem_get_info(head.device)
    return head_chunk("cuda", free, head.shape[0], head.element_size())


def _pad(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)


def encode_prefix(model: torch.nn.Module, prefix_ids: Sequence[int]) -> PrefixCache | None:
    """Encode the shared prefix once; ``None`` when there is none to share."""
    if not prefix_ids:
        return None
    base = base_model(model)
    device = next(model.parameters()).device
    ids = torch.tensor([list(prefix_ids)], device=device)
    out = base.get_decoder()(input_ids=ids, use_cache=True)
    return PrefixCache.of(output_cache(out), len(prefix_ids))


def batch_response_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
    attention_mask: torch.Tensor, prefix: PrefixCache | None = None, chunk: int = HEAD_CHUNK,
) -> torch.Tensor:
    """Mean response-token loss per row of one right-padded batch.

    Args:
        model: causal LM, optionally wrapped by peft (its adapter state is used as it is).
        input_ids: ``(B, T)`` token ids, right-padded.
        labels: ``(B, T)`` ids with ``-100`` on prompt and padding positions.
        attention_mask: ``(B, T)`` 1 on real tokens.
        prefix: when given, the first ``prefix.length`` tokens of every row are that prefix, and
            its cached key/values replace encoding it again.
        chunk: response positions per LM-head call (:func:`head_chunk`).

    Returns:
        ``(B,)`` float32 losses; rows without response tokens get NaN (caught by the caller).

    """
    base = base_model(model)
    decoder = base.get_decoder()
    start = 0
    if prefix is None:
        # use_cache=False: nothing reads this batch's keys and values; a cache would hold every
        # layer's for the whole batch (the 7B shape: 0.5 MiB per token in bf16) until it ends.
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         use_cache=False)[0]  # (B, T, H)
    else:
        start, width = prefix.length, input_ids.shape[1]
        # Positions continue after the prefix; the mask covers prefix + suffix keys (B, T).
        positions = torch.arange(start, width, device=input_ids.device).expand(len(input_ids), -1)
        cache = {cache_keyword(decoder): prefix.for_batch(len(input_ids))}
        hidden = decoder(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                         position_ids=positions, use_cache=False, **cache)[0]  # (B, T-P, H)
    token_loss, keep = response_token_losses(hidden, labels, base.get_output_embeddings(),
                                             logit_softcap(model), start=start, chunk=chunk)
    row = keep.nonzero()[:, 0]  # (N,) batch row of each response token
    sums = torch.zeros(len(labels), device=labels.device).index_add_(0, row, token_loss)  # (B,)
    counts = keep.sum(dim=1).float()  # (B,)
    return sums / counts


def compute_response_losses(
    model: torch.nn.Module,
    features: Sequence[Features],
    *,
    max_tokens_per_batch: int,
    pad_token_id: int,
    prefix_length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean response-token loss of every example, in the order given.

    Args:
        model: causal LM (optionally a peft model; its adapter state is used as it is).
        features: tokenised examples with response-only labels.
        max_tokens_per_batch: padded tokens per forward pass; lower it if memory runs out.
        pad_token_id: id used for padding (masked out of attention and loss).
        prefix_length: tokens shared by every row to encode once; ``None`` finds the longest
            such prefix (:func:`shared_prefix_length`), ``0`` turns the reuse off.
        progress: called with the number of rows done after each batch.

    Returns:
        ``(N,)`` float64 array of losses (NaN where a row has no response token).

    """
    device = next(model.parameters()).device
    out = np.full(len(features), np.nan)
    if not features:
        return out
    if prefix_length is None:
        prefix_length = shared_prefix_length(features)
    if device.type == "cpu":
        max_tokens_per_batch = min(max_tokens_per_batch, CPU_MAX_TOKENS_PER_BATCH)
    batches = length_batches([len(f.input_ids) for f in features], max_tokens_per_batch)
    chunk = model_head_chunk(model)  # HEAD_CHUNK on the CPU; from free memory on CUDA
    with torch.inference_mode():
        prefix = encode_prefix(model, features[0].input_ids[:prefix_length])
        for batch in batches:
            rows = [features[i] for i in batch]
            input_ids = _pad([r.input_ids for r in rows], pad_token_id, device)
            labels = _pad([r.labels for r in rows], IGNORE_INDEX, device)
            mask = _pad([[1] * len(r.input_ids) for r in rows], 0, device)
            losses = batch_response_losses(model, input_ids, labels, mask, prefix, chunk)
            out[batch] = losses.double().cpu().numpy()
            if progress:
                progress(len(batch))
    return out


@contextlib.contextmanager
def adapter_state(model: torch.nn.Module, loss: str) -> Iterator[None]:
    """Context in which ``model`` computes the named loss: only ``ref`` keeps the LoRA adapter on.

    ``init``, ``uncond`` and Cherry's ``ifd_cond``/``ifd_alone`` are losses of the initial model,
    i.e. the same weights with the adapter disabled, so one model in memory serves every loss.
    """
    if loss == "ref":
        yield
    elif loss in INITIAL_MODEL_LOSSES:
        disable = getattr(model, "disable_adapter", None)
        with disable() if callable(disable) else contextlib.nullcontext():
            yield
    else:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
