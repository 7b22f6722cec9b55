"""Config helpers: the ``pkg_data`` resolver and checks that fail before any model is loaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

RESOURCES = Path(__file__).parent / "resources"
STAGES = ("reference", "score", "select", "train", "eval")
MIN_MAX_LENGTH = 8  # tokens: the shortest data.max_length that leaves every row a response


def package_data(relative: str) -> str:
    """Absolute path of a data file shipped in ``lobass/resources/data``."""
    return str(RESOURCES / "data" / relative)


# `${pkg_data:alpaca/alpaca_pool_1k.json}` in configs: shipped files work from any working dir.
OmegaConf.register_new_resolver("pkg_data", package_data, replace=True)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


def _choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of {list(allowed)}")


def validate(cfg: DictConfig) -> None:
    """Check the run-level choices that would otherwise fail late, after minutes of work.

    Runs first in ``run(cfg)``, before any file is read or model loaded. Checks that need the
    pool size or the model's architecture are :func:`validate_pool_size` and
    :func:`check_lora_targets`.

    Raises:
        ConfigError: naming the key, with the allowed values.

    """
    from lobass.data import CONVERTERS
    from lobass.modeling import DTYPES
    from lobass.scoring import SCORERS

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown} in stages=; choose from {list(STAGES)}")
    _choice("scorer.name", cfg.scorer.name, sorted(SCORERS))
    _choice("model.source", cfg.model.source, ["gguf", "hub", "random"])
    _choice("model.dtype", cfg.model.dtype, sorted(DTYPES))
    _choice("model.template", cfg.model.template, ["chat", "alpaca"])
    if not isinstance(cfg.model.trust_remote_code, bool):
        raise ConfigError("model.trust_remote_code must be true or false, got "
                          f"{cfg.model.trust_remote_code!r}")
    targets = cfg.model.lora_targets
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"model.lora_targets must be a non-empty list of module names such as "
                          f"[q_proj, v_proj], got {targets!r}")
    _choice("data.reader", cfg.data.reader, sorted(CONVERTERS))
    for name, source in (cfg.data.mix or {}).items():
        _choice(f"data.mix.{name}.reader", source.reader, sorted(CONVERTERS))
    _choice("data.on_bad_row", cfg.data.on_bad_row, ["error", "skip"])
    if not isinstance(cfg.data.max_length, int) or cfg.data.max_length < MIN_MAX_LENGTH:
        # Truncation keeps max_length // 4 response tokens; below this no row could be scored.
        raise ConfigError(f"data.max_length must be an integer >= {MIN_MAX_LENGTH} tokens, got "
                          f"{cfg.data.max_length!r}")
    _choice("logger.kind", cfg.logger.kind, ["wandb", "none"])
    ratio, count = cfg.selection.ratio, cfg.selection.count
    if (ratio is None) == (count is None):
        raise ConfigError("set exactly one of selection.ratio and selection.count (got "
                          f"ratio={ratio}, count={count})")
    if ratio is not None and not (isinstance(ratio, int | float) and 0 < ratio <= 1):
        raise ConfigError(f"selection.ratio must be in (0, 1], got {ratio}")
    if count is not None and not (isinstance(count, int) and count >= 1):
        raise ConfigError(f"selection.count must be an integer >= 1, got {count!r}")
    if not 0 < cfg.reference.fraction <= 1:
        raise ConfigError(f"reference.fraction must be in (0, 1], got {cfg.reference.fraction}")
    _choice("score.on_nonfinite", cfg.score.on_nonfinite, ["error", "drop"])


def validate_pool_size(cfg: DictConfig, n_pool: int) -> None:
    """Check ``selection.count`` against the pool, once the data is read and before any model.

    Raises:
        ConfigError: the count exceeds the pool, with the valid range.

    """
    count = cfg.selection.count
    if count is not None and count > n_pool:
        raise ConfigError(f"selection.count={count} is larger than the pool ({n_pool} rows read "
                          f"from data={cfg.data.name}); choose a count in [1, {n_pool}] or set "
                          "selection.ratio instead")


def check_lora_targets(model_cfg: DictConfig, model_path: str) -> list[str]:
    """Check that every ``model.lora_targets`` name matches a module LoRA can adapt.

    The model is built on the ``meta`` device from its config alone (no weights are read or
    allocated, well under a second even for 13B), and each target is matched the way peft
    matches a list of names: the module's full name equals it or ends with ``.<target>``. Peft
    itself silently ignores a target that matches nothing as long as another one matches.

    Args:
        model_cfg: the ``model`` config group.
        model_path: what ``resolve_model_path`` returned (a local directory or hub id).

    Returns:
        The names of the modules that would be adapted.

    Raises:
        ConfigError: a target that matches no adaptable module, with the names that would.

    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = AutoConfig.from_pretrained(model_path, revision=model_cfg.get("revision"),
                                        trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    names = [n for n, m in model.named_modules() if isinstance(m, adaptable)]
    targets = list(model_cfg.lora_targets)
    matched = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in matched)]
    if missing:
        choices = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"model.lora_targets {missing} match no linear, embedding or conv module "
                          f"of {type(model).__name__} (model={model_cfg.name}); choose from "
                          f"{choices}")
    return matched
