"""Training that encodes the rows' shared prefix once per optimiser step, not once per row.

Every row of an SFT pool opens with the same template tokens (``lobass.shared_prefix``): on the
shipped Alpaca rows 24 of ~110 tokens, so a step of 8 rows spends ~19% of its compute encoding
the same 24 tokens eight times. The LoRA weights change only at the optimiser step, so within a
step the prefix's hidden states are the same for every row and every forward pass. Here the
first pass of a step encodes the prefix once; every pass of the step attends to its keys and
values (detached copies that collect their gradient), and after the step's last backward that
gradient is passed once through the prefix's graph, before the ``Trainer`` clips and steps. The
gradients are those of encoding the prefix in every row (autograd sums over rows and passes
either way), so the training is the same to float rounding (tests/test_training_fast.py).

transformers has no such option: its packing (``DataCollatorWithFlattening``) removes padding but
still encodes the prefix in every row, and its prefix caching is for generation, without grad.

Exact only where every row sees the same prefix states: no LoRA dropout (a mask drawn per row
would differ from one drawn once), no gradient checkpointing (transformers drops a cache passed
to a checkpointed layer), and one process (DDP all-reduces gradients during the last backward,
before the prefix's gradient would arrive). ``lobass.training.shares_prefix`` checks the
recipe side.

Both ``Trainer`` subclasses live here, imported when training starts: transformers' ``Trainer``
module takes a while to import (and prints a line under ``WANDB_MODE=offline``), and nothing but
a fine-tune needs it. :class:`SampledTrainer` is the plain one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from lobass.formatting import IGNORE_INDEX
from lobass.response_loss import base_model
from lobass.shared_prefix import PrefixCache, cache_keyword, output_cache

log = logging.getLogger(__name__)


@dataclass
class _StepPrefix:
    """The prefix encoded for one optimiser step: its graph, and the leaves the passes use."""

    step: int
    encoded: PrefixCache  # keys and values of every layer, attached to the LoRA weights
    cache: PrefixCache  # the same tensors detached: they collect the passes' gradient

    def backward(self) -> None:
        """Send the gradient the step's passes put on the prefix through the prefix's graph."""
        pairs = [(state, leaf.grad)
                 for states, leaves in zip(self.encoded.layers, self.cache.layers, strict=True)
                 for state, leaf in zip(states, leaves, strict=True) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])


class SampledTrainer(Trainer):
    """``Trainer`` that draws its training rows in the order of the sampler it is given.

    transformers builds its own sampler in ``_get_train_sampler``; taking ours as an argument
    (:class:`EpochSeededLengthSampler`: length-grouped batches that a resume replays exactly)
    keeps that choice visible where the Trainer is built.
    """

    def __init__(self, *args: Any, sampler: torch.utils.data.Sampler[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler = sampler

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler[int]:
        return self.sampler


class SharedPrefixTrainer(SampledTrainer):
    """``Trainer`` whose passes skip the prefix that every row of the dataset shares.

    Args:
        prefix_ids: the shared prefix (``shared_prefix_length`` tokens of any row); it must stop
            before every row's first response token, which ``shared_prefix_length`` ensures.
        *args, **kwargs: ``SampledTrainer``'s. The loss must come from ``compute_loss_func``
            (``ResponseLoss``): the passes return hidden states of the suffix only.

    """

    def __init__(self, *args: Any, prefix_ids: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not prefix_ids:
            raise ValueError("SharedPrefixTrainer needs a non-empty shared prefix")
        self.prefix_ids = torch.tensor(prefix_ids)
        self._prefix: _StepPrefix | None = None

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The loss of the batch's rows from their own tokens, the prefix lent from its cache."""
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids = inputs["input_ids"]  # (B, T), right-padded, every row opening with the prefix
        start = len(self.prefix_ids)
        prefix = self.prefix_ids.to(ids.device)
        if ids.shape[1] <= start or not bool((ids[:, :start] == prefix).all()):
            raise RuntimeError("a training batch does not open with the dataset's shared prefix")
        if bool((inputs["labels"][:, :start + 1] != IGNORE_INDEX).any()):
            # The tokens the prefix's states predict would carry a loss no pass computes.
            raise RuntimeError("a training row labels a token inside its shared prefix")
        cache = self._step_prefix(model, prefix).cache
        suffix = dict(inputs)
        suffix["input_ids"] = ids[:, start:]  # (B, T-P)
        suffix["labels"] = inputs["labels"][:, start:]  # label P is a prompt token: ignored
        # Positions continue after the prefix; the attention mask still covers all T keys.
        suffix["position_ids"] = torch.arange(start, ids.shape[1],
                                              device=ids.device).expand(len(ids), -1)
        suffix[cache_keyword(base_model(model))] = cache.for_batch(len(ids))
        suffix["use_cache"] = False
        return super().compute_loss(model, suffix, return_outputs, num_items_in_batch)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """One pass; after the step's last, the prefix's gradient joins the LoRA weights'."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients and self._prefix is not None:
            self._prefix.backward()  # before the Trainer clips the gradient and steps
            self._prefix = None
        return loss

    def _step_prefix(self, model: torch.nn.Module, prefix: torch.Tensor) -> _StepPrefix:
        """The prefix of this optimiser step, encoded by its first pass."""
        if self._prefix is not None and self._prefix.step != self.state.global_step:
            raise RuntimeError("the optimiser stepped before the shared prefix's gradient "
                               "was added (was training_step bypassed?)")
        if self._prefix is None:
            # Through the model's own forward (peft, and accelerate's autocast on a GPU); no LM
            # head: logits_to_keep selects no position. Eager under train.compile: a pass that
            # fills an empty cache would compile a second graph for every layer (see
            # lobass.compilation), for a pass of a few tokens once per step.
            with torch.compiler.set_stance("force_eager"):
                out = model(input_ids=prefix[None], use_cache=True,
                            logits_to_keep=torch.zeros(0, dtype=torch.long))
            encoded = PrefixCache.of(output_cache(out), len(prefix))
            self._prefix = _StepPrefix(self.state.global_step, encoded, encoded.detached())
        return self._prefix
