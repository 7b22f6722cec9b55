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
        self.softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        self.hidden: torch.Tensor | None = None
        self.hook = base.get_decoder().register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0]  # last_hidden_state (B, T, H), after the final norm

    def collate(self, collator: Callable[[list[Any]], dict[str, Any]]
                ) -> Callable[[list[Any]], dict[str, Any]]:
        """``collator`` whose batches also carry ``logits_to_keep``: no position (no LM head)."""

        def collate(rows: list[Any]) -> dict[str, Any]:
            batch = collator(rows)
            batch["logits_to_keep"] = torch.zeros(0, dtype=torch.long)  # (0,): no logits
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
        # Position t predicts token t+1: shift so targets line up with the states predicting them.
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX  # (B, T-1)
        states = hidden[:, :-1][keep]  # (N, H), N = response tokens of this micro-batch
        logits = self.head(states).float()  # (N, V); float32 for the softmax, as the model does
        if self.softcap:  # Gemma-style soft-capping, as the model's own forward applies it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        total = F.cross_entropy(logits, targets[keep], reduction="sum")
        if num_items_in_batch is None:
            return total / keep.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch

    def remove(self) -> None:
        """Take the hook off the decoder (the model goes on to other stages unchanged)."""
        self.hook.remove()
        self.hidden = None

