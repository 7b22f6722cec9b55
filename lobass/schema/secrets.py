"""Secrets in configs: values that look like credentials are refused, and never echoed.

Key shapes come from the regex plugins of ``detect-secrets`` (Yelp's maintained detector: AWS
key ids, basic-auth URLs, GitHub, GitLab, Slack tokens and webhooks, JWTs, Stripe, Twilio, npm,
PyPI, private keys, ...), used offline (their ``verify`` calls are never made). A short list here
adds only what it lacks. URLs are parsed: any user, password or credential-named query parameter
in one is refused. A remote judge's ``api_key_env`` must name a key's variable, so that the value
of any other variable is never sent as a bearer token.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString
from detect_secrets.plugins.ip_public import IPPublicDetector

from lobass.schema.walk import ConfigError

# What detect-secrets 1.5 has no plugin for: OpenAI/Anthropic keys of today (its OpenAI plugin
# knows only the legacy "T3BlbkFJ" shape), Hugging Face tokens, fine-grained GitHub tokens and
# Google API keys. The lookbehind keeps words like "task-sk-ready".
_KEY_PREFIXES = re.compile(
    r"(?<![A-Za-z0-9_])(?:sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}"
    r"|AIza[0-9A-Za-z_-]{35})")
# An AWS secret access key: 40 base64 characters. Its detect-secrets plugin wants an
# `aws_secret = "..."` line around it; here it is a bare value, so its entropy decides instead.
_BASE64_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_HEX_40 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{40}(?![0-9a-fA-F])")  # a W&B key's shape
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]{32,}")
_HEX = re.compile(r"[0-9a-fA-F]{32,}")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_SECRET_KEY = re.compile(r"(?:^|_)(?:api_?key|token|secret|password|passwd)$", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"(?:^|[_-])(?:api_?key|key|token|secret|password|passwd|pwd|sig"
                           r"|signature|auth|credentials?)$", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KEY_ENV_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET")
SECRET_HELP = ("API keys come from environment variables only: export the key (e.g. export "
               "OPENAI_API_KEY=...) and name the variable, as in eval.judge.api_key_env="
               "OPENAI_API_KEY. The value is not shown here, and nothing was written or loaded")


@functools.cache
def _detectors() -> tuple[RegexBasedDetector, ...]:
    """detect-secrets' regex plugins, less the public-IP one (an IP in a URL is no secret)."""
    classes: list[type] = list(get_mapping_from_secret_type_to_class().values())
    return tuple(c() for c in classes
                 if issubclass(c, RegexBasedDetector) and c is not IPPublicDetector)


def _url_credentials(value: str) -> str | None:
    """Why a URL inside ``value`` carries a credential (``user:pass@``, ``?key=``), or None."""
    for url in _URL.findall(value):
        parts = urlsplit(url)
        if parts.username or parts.password:
            return "a URL holds credentials (user:password@ before its host)"
        named = [k for k, v in parse_qsl(parts.query, keep_blank_values=True)
                 if v and _SECRET_PARAM.search(k)]
        if named:
            return f"a URL's query holds a credential parameter ({named[0]}=...)"
    return None


def _wandb_key_inside(value: str) -> bool:
    """Whether ``value`` holds a 40-hex run (a W&B key) that is not a whole path segment.

    A whole segment is a commit, as in Hugging Face's ``snapshots/<sha>/`` cache directories.
    """
    for found in _HEX_40.finditer(value):
        start, end = found.span()
        segment = (start == 0 or value[start - 1] == "/") and (
            end == len(value) or value[end] == "/")
        if not (segment and "/" in value) and re.search("[0-9]", found.group()) \
                and re.search("[a-fA-F]", found.group()):
            return True
    return False


def find_secret(key: str, value: Any) -> str | None:
    """What makes ``value`` (the config value at ``key``) look like a secret, or ``None``.

    Flagged: any string under a key named like ``api_key``, ``token``, ``secret`` or
    ``password``; a URL with a user, password or credential parameter; a match of a
    detect-secrets regex plugin; an OpenAI, Anthropic, Hugging Face, fine-grained GitHub or
    Google key prefix; 40 base64 characters of an AWS secret key's entropy; a run of 32+ letters
    and digits mixing upper case, lower case and digits (a random token); 40 hex digits inside a
    value (a W&B key), or a bare value of 32+ hex digits, outside a ``revision`` key (pinned
    commits are hex too). The returned reason never contains the value.
    """
    if not isinstance(value, str) or not value:
        return None
    leaf = key.rsplit(".", 1)[-1]
    if _SECRET_KEY.search(leaf):
        return f"a key named {leaf!r} holds a string"
    if (reason := _url_credentials(value)) is not None:
        return reason
    for detector in _detectors():
        if next(iter(detector.analyze_string(value)), None) is not None:
            return f"it matches detect-secrets' {detector.secret_type} pattern"
    if (found := _KEY_PREFIXES.search(value)) is not None:
        return f"it contains an API-key prefix ({found.group()[:3]!r}...)"
    entropy = Base64HighEntropyString()
    for run in _BASE64_40.findall(value):
        if (re.search("[a-z]", run) and re.search("[A-Z]", run) and re.search("[0-9]", run)
                and entropy.calculate_shannon_entropy(run) > entropy.entropy_limit):
            return "it contains 40 random base64 characters (the shape of an AWS secret key)"
    for run in _ALNUM_RUN.findall(value):
        if re.search("[a-z]", run) and re.search("[A-Z]", run) and re.search("[0-9]", run):
            return "it contains a long random token (32+ mixed-case letters and digits)"
    if leaf != "revision":
        if _HEX.fullmatch(value.strip()):
            return "it is a bare run of 32+ hex digits (the shape of a W&B key)"
        if _wandb_key_inside(value):
            return "it contains 40 hex digits (the shape of a W&B key)"
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


def check_key_env(key: str, judge: Mapping[str, Any]) -> None:
    """Check that a remote judge's ``api_key_env`` names a key's variable.

    Its value is sent as a bearer token, so it must end in ``_KEY``, ``_TOKEN`` or ``_SECRET``:
    no other variable's value (``HOME``, a database password) is sent by a typo or a copied
    config. ``allow_any_env=true`` lifts the suffix rule.

    Args:
        key: the judge group's dotted key (``eval.judge``), for messages.
        judge: its values (``api_key_env``, ``allow_any_env``).

    Raises:
        ConfigError: not a variable name, or a name without a key's suffix.

    """
    env = judge.get("api_key_env")
    if env is None:
        return
    if not _ENV_NAME.fullmatch(str(env)):
        raise ConfigError(f"{key}.api_key_env={env!r} is not an environment variable name "
                          "(letters, digits, '_'); name the variable that holds the key")
    if not judge.get("allow_any_env") and not str(env).upper().endswith(KEY_ENV_SUFFIXES):
        raise ConfigError(f"{key}.api_key_env={env}: its value would be sent as a bearer token, "
                          f"so it must name a key's variable (ending in "
                          f"{', '.join(KEY_ENV_SUFFIXES)}); rename it, or set "
                          f"{key}.allow_any_env=true if {env} really holds the key")


def plain_http_host(url: str) -> str | None:
    """The host of a plain ``http://`` URL that is not this machine (loopback), else ``None``.

    Such a URL carries prompts, answers and the bearer key unencrypted across a network.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme.lower() != "http" or not host:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return None
    try:
        return None if ipaddress.ip_address(host).is_loopback else host
    except ValueError:  # a name, not an address
        return host
