"""The training loss at response positions only: the LM head never sees a prompt token.

A causal LM's own loss (``model(labels=...)``) computes full-vocabulary logits at every position of
the padded batch, prompt and padding included, then throws away all but the response positions
(49k columns per position for SmolLM2, 262k for Gemma 3, whose LM head is ~62% of its weights).
Here the ``Trainer`` calls the model with ``logits_to_keep`` set to no position, the decoder's last
hidden state is captured by a forward hook, and :class:`ResponseLoss` gathers the states that
predict a response token and applies the LM head to those alone.

It is the same training: the LM head is not a LoRA target (checked), so applying it outside the
model's forward computes the same function, and the reduction is the model's own (sum over
response tokens divided by ``num_items_in_batch``, the accumulated batch's response tokens, or a
mean without it), so per-step losses agree with the model's own loss to float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from lobass.formatting import IGNORE_INDEX

log = logging.getLogger(__name__)


def base_model(model: torch.nn.Module) -> Any:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def logit_softcap(model: torch.nn.Module) -> float | None:
    """The final-logit soft-cap of the model's text config (Gemma style), or None."""
    return getattr(base_model(model).config.get_text_config(), "final_logit_softcapping", None)


def response_token_losses(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                          softcap: float | None, *, start: int = 0, chunk: int | None = None,
                          reduction: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each response token from the decoder state that predicts it.

    The one core of every response loss: scoring (per row), the training loss (summed) and the
    eval losses (through scoring). The LM head is applied at response positions only.

    Args:
        hidden: ``(B, T - start, H)`` the decoder's last hidden states for positions start..T-1.
        labels: ``(B, T)`` token ids with ``-100`` on prompt and padding positions.
        head: the LM head (output embeddings).
        softcap: ``final_logit_softcapping`` (:func:`logit_softcap`), applied as the model does.
        start: positions before it (a shared prefix) have no state here.
        chunk: response positions per LM-head call, bounding the ``(n, V)`` float32 logits
            (None: all at once).
        reduction: ``none`` (one loss per response token) or ``sum``.

    Returns:
        The losses (``(N,)`` float32, or a scalar sum) and ``keep``: ``(B, T - start - 1)`` True
        where a state predicts a response token.

    """
    # Position t predicts token t+1: shift so targets line up with the states that predict them.
    targets = labels[:, start + 1:]  # (B, T-P-1)
    keep = targets != IGNORE_INDEX  # (B, T-P-1)
    states = hidden[:, :-1][keep]  # (N, H), N = response tokens in the batch
    wanted = targets[keep]  # (N,)
    step = chunk or max(len(wanted), 1)
    parts = []
    for lo in range(0, len(wanted), step):
        logits = head(states[lo:lo + step]).float()  # (n, V); float32 for a stable softmax
        if softcap:  # Gemma-style soft-capping, as the model's own forward applies it
            logits = torch.tanh(logits / softcap) * softcap
        parts.append(F.cross_entropy(logits, wanted[lo:lo + step], reduction=reduction))
    if reduction == "sum":
        return (torch.stack(parts).sum() if len(parts) > 1 else parts[0]), keep
    return (torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)), keep


def head_is_adapted(model: torch.nn.Module) -> bool:
    """Whether the LM head carries trainable parameters (a LoRA target or unfrozen)."""
    head = base_model(model).get_output_embeddings()
    return head is None or any(p.requires_grad for p in head.parameters())


class ResponseLoss:
    """``Trainer(compute_loss_func=...)``: the mean response-token loss from the decoder's states.

    Built once per run on the peft model; its forward hook on the decoder keeps the last hidden
    state of the most recent forward, which :meth:`__call__` consumes. ``collate`` wraps the data
    collator so that every batch asks the model for no logits (``logits_to_keep`` empty).

    Args:
        model: the causal LM the ``Trainer`` trains (optionally a peft model).

    Raises:
        ValueError: the LM head is trainable (a LoRA target): its LoRA branch would be applied
            here too, but then the head is no longer frozen and the plain loss is the safe path.

    """

    def __init__(self, model: torch.nn.Module) -> None:
        if head_is_adapted(model):
            raise ValueError("the LM head is trainable (lm_head in model.lora_targets?): "
                             "the response-only loss needs a frozen head")
        base = base_model(model)
        self.head = base.get_output_embeddings()
        self.softcap = logit_softcap(model)
        self.hidden: torch.Tensor | None = None
        self.hook = base.get_decoder().register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0]  # last_hidden_state (B, T, H), after the final norm

    def collate(self, collator: Callable[[list[Any]], dict[str, Any]]
                ) -> Callable[[list[Any]], dict[str, Any]]:
        """``collator`` whose batches ask for no logits (``logits_to_keep``) and no KV cache."""

        def collate(rows: list[Any]) -> dict[str, Any]:
            batch = collator(rows)
            batch["logits_to_keep"] = torch.zeros(0, dtype=torch.long)  # (0,): no logits
            batch["use_cache"] = False  # nothing reads a training pass's keys and values
            return batch

        return collate

    def __call__(self, outputs: Any, labels: torch.Tensor,
                 num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Sum of response-token cross-entropies over ``num_items_in_batch`` (else their mean).

        Args:
            outputs: the model's output (its empty logits are not read).
            labels: ``(B, T)`` token ids with ``-100`` on prompt and padding positions.
            num_items_in_batch: response tokens in the whole accumulated batch (all ranks when
                ``average_tokens_across_devices``), as the ``Trainer`` counts them.

        Returns:
            The scalar loss the model's own ``ForCausalLMLoss`` would return.

        """
        hidden, self.hidden = self.hidden, None  # drop the reference: the graph keeps it alive
        if hidden is None:
            raise RuntimeError("ResponseLoss: no decoder output captured; was the model called?")
        total, keep = response_token_losses(hidden, labels, self.head, self.softcap,
                                            reduction="sum")
        if num_items_in_batch is None:
            return total / keep.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def remove(self) -> None:
        """Take the hook off the decoder (the model goes on to other stages unchanged)."""
        self.hook.remove()
        self.hidden = None

