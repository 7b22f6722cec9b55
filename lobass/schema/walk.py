"""Checking a resolved config against the schema dataclasses, with messages that name the fix."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

MISSING_VALUE = "???"  # OmegaConf's mark for a value the user must give
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # no '/', no leading '.', so no '..'
BATCH_AUTO = re.compile(r"auto(:[1-9][0-9]*)?")  # lm-eval's batch_size=auto or auto:N
BatchSize = int | str  # an int >= 1, or lm-eval's "auto" / "auto:N" (see check_value)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the allowed values."""


def knob(default: Any = dataclasses.MISSING, *, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None,
         choices: Callable[[], Sequence[str]] | None = None, plain: bool = False,
         unit: str = "") -> Any:
    """A schema field with its checks in ``metadata``; without a default the key is required.

    Args:
        default: the value when the key is absent from the config.
        ge: inclusive lower bound.
        gt: exclusive lower bound.
        le: inclusive upper bound.
        lt: exclusive upper bound.
        choices: returns the valid names (a registry read when checking, not at import).
        plain: the value is used as a file or directory name (see :func:`check_plain_name`).
        unit: appended to the range in messages (``" tokens"``).

    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "plain": plain,
            "unit": unit}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


def _range_text(meta: dict[str, Any]) -> str:
    low = f"({meta['gt']}" if meta["gt"] is not None else f"[{meta['ge']}"
    high = f"{meta['lt']})" if meta["lt"] is not None else f"{meta['le']}]"
    has_low = meta["gt"] is not None or meta["ge"] is not None
    has_high = meta["lt"] is not None or meta["le"] is not None
    if has_low and has_high:
        return f"in {low}, {high}"
    if has_low:
        return f"> {meta['gt']}" if meta["gt"] is not None else f">= {meta['ge']}"
    return f"< {meta['lt']}" if meta["lt"] is not None else f"<= {meta['le']}"


def _in_range(value: float, meta: dict[str, Any]) -> bool:
    return not ((meta["ge"] is not None and value < meta["ge"])
                or (meta["gt"] is not None and value <= meta["gt"])
                or (meta["le"] is not None and value > meta["le"])
                or (meta["lt"] is not None and value >= meta["lt"]))


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_scalar(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> bool:
    """Whether ``value`` is a ``tp``; raises when it is one but outside ``meta``'s range."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if tp is int else int | float):
            return False
        if not _in_range(value, meta):
            kind = "an integer " if tp is int else ""
            raise ConfigError(f"{key} must be {kind}{_range_text(meta)}{meta['unit']}, "
                              f"got {value!r}")
        return True
    return True  # Any


def _expected(tp: Any, meta: dict[str, Any]) -> str:
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    texts = []
    for option in options:
        text = _describe(get_origin(option) or option)
        if option in (int, float) and any(meta[k] is not None for k in ("ge", "gt", "le", "lt")):
            text += f" {_range_text(meta)}{meta['unit']}"
        texts.append(text)
    return " or ".join(texts)


def check_value(key: str, value: Any, tp: Any, meta: dict[str, Any]) -> None:
    """Check one value against its annotated type and metadata.

    Raises:
        ConfigError: naming ``key``, with the valid choices or range.

    """
    if value == MISSING_VALUE:
        raise ConfigError(f"{key} is required (??? in the config); set it, e.g. {key}=...")
    origin = get_origin(tp)
    if tp is BatchSize:
        if isinstance(value, str) and BATCH_AUTO.fullmatch(value):
            return
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{key} must be an integer >= 1 or auto (lm-eval picks the "
                              f"largest batch that fits), got {value!r}")
        return
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return
        for option in (o for o in options if o is not type(None)):
            try:
                check_value(key, value, option, meta)
                return
            except ConfigError as err:
                if len(options) - (type(None) in options) == 1:
                    raise  # one real option: its own message is the clearest
                last = err
        raise ConfigError(f"{key} must be {_expected(tp, meta)}, got {value!r}") from last
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}={value!r} is not supported; choose one of "
                              f"{sorted(get_args(tp))}")
        return
    if dataclasses.is_dataclass(tp):
        check_group(key, value, tp)  # type: ignore[arg-type]
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = get_args(tp)
        choices = meta["choices"]() if meta["choices"] else None
        if choices is not None:
            unknown = [v for v in value if v not in choices]
            if unknown:
                raise ConfigError(f"unknown value(s) {unknown} in {key}=; choose from {choices}")
        for i, v in enumerate(value):
            check_value(f"{key}[{i}]", v, item, {**meta, "choices": None})
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, item = get_args(tp)
        for name, v in value.items():
            if dataclasses.is_dataclass(item):
                check_plain_name(f"{key}.{name} (its name)", str(name))
            check_value(f"{key}.{name}", v, item, meta)
        return
    if not _check_scalar(key, value, tp, meta):
        raise ConfigError(f"{key} must be {_expected(tp, meta)}, got {value!r}")
    if meta["choices"] is not None and value not in (choices := meta["choices"]()):
        raise ConfigError(f"{key}={value!r} is not supported; choose one of {choices}")
    if meta["plain"]:
        check_plain_name(key, value)


def check_plain_name(key: str, value: str) -> None:
    """A value used as a file or directory name: letters, digits, ``.``, ``_``, ``-`` only.

    Raises:
        ConfigError: a path separator, a leading dot (``..``) or another character.

    """
    if not PLAIN_NAME.fullmatch(value):
        raise ConfigError(f"{key}={value!r} must be a plain name (letters, digits, '.', '_', "
                          "'-'; not starting with '.'; no '/'): it names a file or directory")


def check_group(key: str, values: Any, spec: type) -> None:
    """Check a mapping against a schema dataclass, field by field.

    Args:
        key: the mapping's dotted key (``""`` at the root), for messages.
        values: the resolved mapping (plain Python, as ``OmegaConf.to_container`` gives).
        spec: the dataclass describing it.

    Raises:
        ConfigError: the first missing or invalid value.

    """
    prefix = f"{key}." if key else ""
    if not isinstance(values, dict):
        raise ConfigError(f"{key} must be a mapping of {spec.__name__} fields, got {values!r}")
    check_known_keys(key, values, [f.name for f in dataclasses.fields(spec)])
    hints = get_type_hints(spec)
    for f in dataclasses.fields(spec):
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{f.name} is missing; add it to the config group")
            continue
        check_value(prefix + f.name, values[f.name], hints[f.name], dict(f.metadata))


def field_default(spec: type, name: str) -> Any:
    """The schema default of ``spec``'s field ``name`` (a fresh copy of a dict or list)."""
    f = next(f for f in dataclasses.fields(spec) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return copy.deepcopy(f.default)


def without_defaults(values: dict[str, Any], spec: type, names: Sequence[str]) -> dict[str, Any]:
    """``values`` less each field of ``names`` that holds its schema default.

    Why: an artifact key hashes a whole group. A field added to the schema after keys were
    first made changes nothing at its default, so leaving it out there keeps every earlier
    artifact's key, whether its config wrote the default or the schema filled it.
    """
    return {k: v for k, v in values.items()
            if not (k in names and v == field_default(spec, k))}


def _entry_spec(tp: Any) -> tuple[type | None, type | None]:
    """``(group, entry)``: the dataclass of a sub-group field, or of a named-entries field."""
    options = [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    for option in options:
        if dataclasses.is_dataclass(option):
            return option, None  # type: ignore[return-value]
        if get_origin(option) is dict and dataclasses.is_dataclass(get_args(option)[1]):
            return None, get_args(option)[1]
    return None, None


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def missing_defaults(values: dict[str, Any], spec: type) -> dict[str, Any]:
    """The fields ``values`` lacks that have a schema default, with it; nested like ``values``.

    Why: the schema is the one place a default is written, so stage code reads ``cfg.a.b``
    and never ``cfg.a.get("b", default)``. Sub-groups (``train.lora``) and named entries
    (``data.mix.<name>``) are filled too; a field without a default is :func:`check_group`'s.
    """
    hints = get_type_hints(spec)
    patch: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name not in values:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                patch[f.name] = field_default(spec, f.name)
            continue
        value = values[f.name]
        group, entry = _entry_spec(hints[f.name])
        if group is not None and isinstance(value, dict):
            inner = missing_defaults(value, group)
        elif entry is not None and isinstance(value, dict):
            inner = {name: sub for name, item in value.items() if isinstance(item, dict)
                     and (sub := missing_defaults(item, entry))}
        else:
            continue
        if inner:
            patch[f.name] = inner
    return patch


def check_known_keys(key: str, values: dict[str, Any], known: Sequence[str]) -> None:
    """Refuse a key that ``known`` lacks, suggesting the closest known one.

    A misspelt key (``train.learnig_rate`` in an experiment file, ``+train.lora.rank``) would
    otherwise be composed, saved with the run and silently ignored, so the run trains with the
    default it meant to change. Runs before the values are checked, so the typo is what is named.

    Raises:
        ConfigError: the first unknown key (sorted), with a did-you-mean or the known keys.

    """
    prefix = f"{key}." if key else ""
    for name in sorted(set(values) - set(known), key=str):
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = (f"did you mean {prefix}{close[0]}?" if close
                else f"known keys: {', '.join(sorted(known))}")
        raise ConfigError(f"{prefix}{name} is not a config key (it would be ignored); {hint}")
