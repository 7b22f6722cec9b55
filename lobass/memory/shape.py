"""The sizes of a model's architecture, read without downloading or allocating any weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that the estimate needs."""

    n_params: int  # all parameters, tied embeddings counted once
    n_lora: int  # adapter parameters for the configured rank and target modules
    lora_inputs: int  # sum of in_features over the adapted linears of one layer
    layers: int
    hidden: int
    kv: int  # key/value width: kv heads x head dim
    intermediate: int
    vocab: int
    layer_params: int = 0  # parameters of one decoder layer (the unit FSDP/ZeRO-3 gathers)


def architecture_config(model_cfg: DictConfig, model_path: str | None = None,
                        **overrides: Any) -> Any:
    """The transformers config of the model's architecture, without downloading anything.

    Args:
        model_cfg: the ``model`` group; its ``arch`` block (the hub ``config.json`` fields that
            matter, with ``model_type``) is used when present.
        model_path: a local checkpoint directory to read ``config.json`` from otherwise.
        **overrides: fields to replace, e.g. ``num_hidden_layers=2`` for a small test model.

    Returns:
        A ``PretrainedConfig``, or None when neither source is available offline.

    """
    from transformers import AutoConfig

    arch = model_cfg.arch
    if arch is not None:
        fields: dict[str, Any] = OmegaConf.to_container(arch, resolve=True)  # type: ignore[assignment]
        model_type = fields.pop("model_type")
        return AutoConfig.for_model(model_type, **{**fields, **overrides})
    if model_path is None:
        return None
    try:
        config = AutoConfig.from_pretrained(model_path, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except OSError:  # a hub id that is not in the local cache (offline)
        return None
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def model_shape(config: Any, lora_targets: list[str], rank: int) -> Shape:
    """Count parameters and adapter sizes exactly on an empty (meta-device) copy of the model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    targets = set(lora_targets)
    adapted = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    n_lora = sum(rank * (m.in_features + m.out_features) for _, m in adapted)
    layer_zero = [m for name, m in adapted if ".layers.0." in f".{name}."]
    layer_params = sum(p.numel() for name, p in model.named_parameters()
                       if ".layers.0." in f".{name}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(
        n_params=n_params,
        n_lora=n_lora,
        lora_inputs=sum(m.in_features for m in layer_zero),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=text.intermediate_size,
        vocab=text.vocab_size,
        layer_params=layer_params,
    )


