"""Secrets in configs: values that look like API keys are refused, and never echoed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from lobass.schema.walk import ConfigError

_KEY_PREFIXES = re.compile(  # the common API-key shapes; the lookbehind keeps words like "task-"
    r"(?<![A-Za-z0-9_])(?:sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{16,}|gh[opsur]_[A-Za-z0-9]{16,}"
    r"|github_pat_[A-Za-z0-9_]{16,}|xox[abeprs]-[A-Za-z0-9-]{8,}|(?:AKIA|ASIA)[0-9A-Z]{16})")
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]{32,}")
_HEX = re.compile(r"[0-9a-fA-F]{32,}")
_SECRET_KEY = re.compile(r"(?:^|_)(?:api_?key|token|secret|password|passwd)$", re.IGNORECASE)
SECRET_HELP = ("API keys come from environment variables only: export the key (e.g. export "
               "OPENAI_API_KEY=...) and name the variable, as in eval.judge.api_key_env="
               "OPENAI_API_KEY. The value is not shown here, and nothing was written or loaded")


def find_secret(key: str, value: Any) -> str | None:
    """What makes ``value`` (the config value at ``key``) look like a secret, or ``None``.

    Flagged: a common key prefix (``sk-``, ``hf_``, ``ghp_``, ``github_pat_``, ``xox?-``,
    ``AKIA``), a run of 32+ letters and digits that mixes upper case, lower case and digits (a
    random token), a bare value of 32+ hex digits outside a ``revision`` key (a W&B key; pinned
    commits are hex too), and any string under a key named like ``api_key``, ``token``, ``secret``
    or ``password``. The returned reason never contains the value.
    """
    if not isinstance(value, str) or not value:
        return None
    leaf = key.rsplit(".", 1)[-1]
    if _SECRET_KEY.search(leaf):
        return f"a key named {leaf!r} holds a string"
    if (found := _KEY_PREFIXES.search(value)) is not None:
        return f"it contains an API-key prefix ({found.group()[:3]!r}...)"
    for run in _ALNUM_RUN.findall(value):
        if re.search("[a-z]", run) and re.search("[A-Z]", run) and re.search("[0-9]", run):
            return "it contains a long random token (32+ mixed-case letters and digits)"
    if _HEX.fullmatch(value.strip()) and leaf != "revision":
        return "it is a bare run of 32+ hex digits (the shape of a W&B key)"
    return None


def _leaves(values: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(values, dict):
        for k, v in values.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(values, list):
        for i, v in enumerate(values):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, values


def refuse_secrets(values: Any, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Raise when any config value (or command-line override) looks like a secret.

    Args:
        values: the config as plain Python (``OmegaConf.to_container``).
        overrides: ``key=value`` strings from the command line (Hydra's ``overrides.task``).

    Raises:
        ConfigError: naming the key and why, never the value.

    """
    pairs = list(_leaves(values))
    for override in overrides:
        key, _, value = override.partition("=")
        pairs.append((key.lstrip("+~"), value))
    for key, value in pairs:
        if (reason := find_secret(key, value)) is not None:
            raise ConfigError(f"{key} looks like a secret ({reason}); refusing to run. "
                              + SECRET_HELP)
