"""Per-example response losses, batched by length, and the scorers that turn them into scores.

A loss here is ``L(y|x)``: the mean token cross-entropy over the response tokens of one example.
Scorers declare which losses they need (``init``: the initial model; ``ref``: the reference model,
i.e. the same weights with the reference LoRA adapter enabled), so a run computes each loss once
whatever scorers it asks for.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from lobass.formatting import IGNORE_INDEX, Features

log = logging.getLogger(__name__)

LOSSES = ("init", "ref")


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


def _pad(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def batch_response_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Mean response-token loss per row of one right-padded batch.

    The LM head is applied only at positions that predict a response token: full-vocabulary logits
    for prompt and padding positions would cost ``T x V`` floats per row for nothing (262k-wide
    for Gemma 3).

    Returns:
        ``(B,)`` float32 losses; rows without response tokens get NaN (caught by the caller).

    """
    base: Any = _unwrap(model)  # transformers' PreTrainedModel API, untyped for mypy
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
    # Position t predicts token t+1: shift so targets line up with the states that predict them.
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX  # (B, T-1)
    states = hidden[:, :-1][keep]  # (N, H), N = response tokens in the batch
    logits = base.get_output_embeddings()(states).float()  # (N, V); float32 for a stable softmax
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / cap) * cap
    token_loss = F.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
    row = keep.nonzero()[:, 0]  # (N,) batch row of each response token
    sums = torch.zeros(len(labels), device=labels.device).index_add_(0, row, token_loss)
    counts = keep.sum(dim=1).float()  # (B,)
    return sums / counts


def compute_response_losses(
    model: torch.nn.Module,
    features: Sequence[Features],
    *,
    max_tokens_per_batch: int,
    pad_token_id: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Mean response-token loss of every example, in the order given.

    Args:
        model: causal LM (optionally a peft model; its adapter state is used as it is).
        features: tokenised examples with response-only labels.
        max_tokens_per_batch: padded tokens per forward pass; lower it if memory runs out.
        pad_token_id: id used for padding (masked out of attention and loss).
        progress: called with the number of rows done after each batch.

    Returns:
        ``(N,)`` float64 array of losses (NaN where a row has no response token).

    """
    device = next(model.parameters()).device
    out = np.full(len(features), np.nan)
    batches = length_batches([len(f.input_ids) for f in features], max_tokens_per_batch)
    with torch.inference_mode():
        for batch in batches:
            rows = [features[i] for i in batch]
            input_ids = _pad([r.input_ids for r in rows], pad_token_id, device)
            labels = _pad([r.labels for r in rows], IGNORE_INDEX, device)
            mask = _pad([[1] * len(r.input_ids) for r in rows], 0, device)
            losses = batch_response_losses(model, input_ids, labels, mask)
            out[batch] = losses.double().cpu().numpy()
            if progress:
                progress(len(batch))
    return out


@contextlib.contextmanager
def adapter_state(model: torch.nn.Module, loss: str) -> Iterator[None]:
    """Context in which ``model`` computes the named loss: ``init`` disables the LoRA adapter."""
    if loss == "ref":
        yield
    elif loss == "init":
        disable = getattr(model, "disable_adapter", None)
        with disable() if callable(disable) else contextlib.nullcontext():
            yield
    else:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")


# ---------------------------------------------------------------------------------------------
# Scorers: higher score = more worth selecting.


@dataclass(frozen=True)
class Scorer:
    """A named score over per-example losses and lengths."""

    name: str
    needs: tuple[str, ...]
    compute: Callable[[dict[str, np.ndarray], np.ndarray, int], np.ndarray]
    description: str


def _lobass(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    # Relative loss reduction: dividing by L_init removes the scale (and length) effect of the
    # plain difference, so easy-and-learned rows and hard-and-unlearned rows both score low.
    with np.errstate(divide="ignore", invalid="ignore"):
        return (losses["init"] - losses["ref"]) / losses["init"]


def _random(losses: dict[str, np.ndarray], n_tokens: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(len(n_tokens))


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        Scorer("lobass", ("init", "ref"), _lobass, "(L_init - L_ref) / L_init"),
        Scorer("rho", ("init", "ref"), lambda ls, n, s: ls["init"] - ls["ref"], "L_init - L_ref"),
        Scorer("loss", ("init",), lambda ls, n, s: ls["init"].copy(), "L_init (hardest first)"),
        Scorer("length", (), lambda ls, n, s: n.astype(np.float64), "response tokens"),
        Scorer("random", (), _random, "uniform, seeded by `seed`"),
    )
}


def get_scorer(name: str) -> Scorer:
    """Look up a scorer by name, listing the valid names when it is unknown."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}")
    return SCORERS[name]


def is_finite(values: np.ndarray) -> np.ndarray:
    """Boolean mask of finite values (NaN and inf losses must never be selected silently)."""
    return np.isfinite(values)


def mean_finite(values: np.ndarray) -> float:
    """Mean over finite values (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan
