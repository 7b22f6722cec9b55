"""The token prefix every row shares, and its key/value states lent to attention.

Chat and instruction templates open every row with the same tokens: SmolLM2's default system
prompt, Alpaca's "Below is an instruction..." header (24 of the ~110 tokens of a shipped Alpaca
row for both CPU models). Scoring (``lobass.scoring.engine``) encodes that prefix once for the
whole pool and training (``lobass.prefix_trainer``) once per optimiser step; every batch then
runs only its rows' own tokens, attending to the prefix's cached keys and values.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lobass.formatting import Features


def shared_prefix_length(features: Sequence[Features]) -> int:
    """Length of the token prefix common to every row that can be encoded once for all.

    It stops one token short of the shortest prompt: the state of the last prompt token predicts
    the first response token, so it must come out of the per-batch pass.
    """
    if not features:
        return 0
    first = features[0].input_ids
    limit = min(f.n_prompt for f in features) - 1
    length = 0
    while length < limit and all(f.input_ids[length] == first[length] for f in features):
        length += 1
    return max(length, 0)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes a key/value cache by: ``cache`` or ``past_key_values``.

    transformers 5.20 renamed ``past_key_values`` to ``cache`` (in the outputs too); the GPU
    image holds 5.17. Read from the forward's signature, so both releases work. ``model`` is the
    transformers model itself (``response_loss.base_model``), not a peft wrapper, whose forward
    takes ``**kwargs``.
    """
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The key/value cache of a forward's output under either release's field name."""
    return out["cache"] if "cache" in out else out["past_key_values"]


@dataclass
class PrefixCache:
    """Key/value states of the shared prefix, computed once, broadcast to every batch."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, P, head_dim)

    @classmethod
    def of(cls, cache: Any, length: int) -> PrefixCache:
        """The keys and values a forward over the prefix alone left in ``cache``."""
        return cls(length, [(layer.keys, layer.values) for layer in cache.layers])

    def detached(self) -> PrefixCache:
        """The same states cut from their graph, as leaves that collect their own gradient."""
        return PrefixCache(self.length, [(k.detach().requires_grad_(), v.detach().requires_grad_())
                                         for k, v in self.layers])

    def for_batch(self, rows: int) -> Any:
        """A fresh ``DynamicCache`` holding the prefix for ``rows`` rows (views, no copy).

        The views are ``expand``-ed: in training, the gradient of the prefix states is summed over
        the rows by autograd, as if each row had encoded the prefix itself.
        """
        from transformers import DynamicCache

        cache = DynamicCache()
        for index, (keys, values) in enumerate(self.layers):
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
            cache.layers[index].__class__ = _prefix_layer_class()
        return cache


@functools.cache
def _prefix_layer_class() -> type:
    """A cache layer that lends its prefix to attention but keeps none of the batch's own keys.

    A plain ``DynamicLayer`` would store the key/value states of every token run, which no one
    reads again: a large share of the model's own memory per batch (benchmarks/README.md,
    "Figures behind design choices").
    """
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            assert self.keys is not None and self.values is not None  # set by for_batch
            return (torch.cat([self.keys, key_states], dim=-2),
                    torch.cat([self.values, value_states], dim=-2))

    return PrefixLayer
