"""``train.compile``: the decoder layers through ``torch.compile`` while the training loop runs.

Regional compilation (PyTorch's recipe against cold-start time): each decoder layer is compiled
in place with ``nn.Module.compile``, so one compiled graph of the layer's code serves every
layer, and the state-dict keys (checkpoints, the saved adapter) stay those of the eager model.
``TrainingArguments(torch_compile=True)`` compiles the whole model instead, through the peft
wrapper and the response-only loss's forward hook, and leaves it compiled for the stages that
follow (scoring, generation with a KV cache) whose shapes and modes would recompile it; so the
layers are compiled here for the loop and handed back eager.

What it buys is measured in benchmarks/README.md: inductor fuses the element-wise work around
each layer's matmuls (RMSNorm, rotary embeddings, SwiGLU, residual adds, LoRA's scaling), which
is a large share of a small model's CPU step; the compile time is paid once per process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lobass.response_loss import base_model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a (peft-wrapped) causal LM, in order."""
    return list(base_model(model).get_decoder().layers)


@contextlib.contextmanager
def compiled_layers(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Compile ``model``'s decoder layers inside the block; eager again on leaving.

    Shapes are dynamic from the start (every batch has its own length). The loop must not grow a
    KV cache, whose update is a graph break that recompiles the layer at every new length: the
    ``Trainer`` sets ``config.use_cache`` from ``TrainingArguments.use_cache`` (False).

    With ``share_prefix`` every pass hands the layers a cache that holds the prefix, and the
    cache is read at the layer's own index, an integer that dynamo treats as a constant: each
    layer compiles its own graph, a one-time cost per process (figures per model:
    benchmarks/README.md, "Figures behind design choices").
    Under dynamo's default limit of 8 graphs per code object, the 9th layer on would silently run
    eager, so the limit is raised to one graph per layer, plus a few for its other variants.
    """
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    config = torch._dynamo.config
    # torch 2.6 names the limit cache_size_limit; 2.7 renamed it recompile_limit.
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = max(getattr(config, name), len(layers) + 4)
    try:
        with config.patch(**{name: limit}):
            yield
    finally:
        for layer in layers:
            # nn.Module.compile has no public inverse: it sets this attribute, which __call__
            # prefers over the eager forward while it is not None.
            layer._compiled_call_impl = None
