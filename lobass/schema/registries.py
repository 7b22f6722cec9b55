"""The registries a config value may name, read when checking (the stage modules import torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def registry(module: str, attr: str, extra: tuple[str, ...] = ()) -> Callable[[], list[str]]:
    """The names of a registry (read when checking: the stage modules import torch)."""

    def names() -> list[str]:
        found = getattr(importlib.import_module(module), attr)
        return sorted({*extra, *(getattr(n, "value", n) for n in found)})

    return names


scorers = registry("lobass.scoring", "SCORERS")
readers = registry("lobass.data", "CONVERTERS")
prompt_readers = registry("lobass.evaluation.prompts", "PROMPT_READERS")
dtypes = registry("lobass.modeling", "DTYPES", ("auto",))  # auto: lobass.devices.resolve_dtype
schedulers = registry("transformers", "SchedulerType")  # an Enum: its values
attention = registry("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS", ("eager",))
