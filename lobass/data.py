"""SFT data: readers, validation and normalised examples.

Every reader turns one file into :class:`Example` objects: ``messages`` in chat form (the last
one is the assistant response being scored or trained on), ``source`` naming where it came from,
a stable content ``id`` and the ``raw`` row, so that a selection can be exported in the pool's own
format. A malformed row raises :class:`DataError` naming the file and line, unless the config says
to skip bad rows, in which case it is counted in :class:`ReadStats`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lobass.artifacts import fingerprint
from lobass.jsonrows import DataError, InvalidJSON, iter_json_rows
from lobass.registry import Registry

log = logging.getLogger(__name__)

Message = dict[str, str]
ROLES = ("system", "user", "assistant")

# Stanford Alpaca's prompt without the input section: the input, when present, is already part of
# the user turn (instruction, blank line, input), so one template serves every row.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{user}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One normalised SFT sample."""

    id: str
    messages: tuple[Message, ...]
    source: str
    raw: dict[str, Any] = field(compare=False, hash=False)


@dataclass
class ReadStats:
    """What a read skipped or dropped, by reason, so nothing disappears silently."""

    rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Flat ``<prefix>/<name>`` counts for ``summary.json``."""
        out = {f"{prefix}/rows": float(self.rows)}
        out.update({f"{prefix}/skipped_{k}": float(v) for k, v in sorted(self.skipped.items())})
        return out


# ---------------------------------------------------------------------------------------------
# Row -> messages converters, one per supported format.


def _require_str(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r} (fields present: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value  # surrogates and control characters: refused for every field by jsonrows


def _user_turn(instruction: str, extra: str) -> str:
    """Alpaca-style rows become one user turn: instruction, blank line, input (when present)."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def alpaca_messages(row: dict[str, Any]) -> list[Message]:
    """``instruction``/``input``/``output`` (Alpaca, Code Alpaca, AlpaGasus, Cherry) rows."""
    instruction = _require_str(row, "instruction")
    extra = _require_str(row, "input", allow_empty=True) if "input" in row else ""
    output = _require_str(row, "output")
    messages: list[Message] = []
    for turn in row.get("history") or []:  # LIMA as converted by LLaMA-Factory: [[user, bot], ...]
        if not (isinstance(turn, list) and len(turn) == 2
                and all(isinstance(t, str) for t in turn)):
            raise ValueError("field 'history' must be a list of [user, assistant] string pairs")
        messages += [{"role": "user", "content": turn[0]},
                     {"role": "assistant", "content": turn[1]}]
    return [*messages, {"role": "user", "content": _user_turn(instruction, extra)},
            {"role": "assistant", "content": output}]


def dolly_messages(row: dict[str, Any]) -> list[Message]:
    """Dolly rows: ``instruction``, ``context`` (or ``input``), ``response`` (or ``output``)."""
    instruction = _require_str(row, "instruction")
    context_key = "context" if "context" in row else "input"
    extra = _require_str(row, context_key, allow_empty=True) if context_key in row else ""
    response = _require_str(row, "response" if "response" in row else "output")
    return [{"role": "user", "content": _user_turn(instruction, extra)},
            {"role": "assistant", "content": response}]


# GSM8K's calculator annotations: "48/2 = <<48/2=24>>24" (the expression and its result, then
# the result again). They were written for a calculator-calling model; in SFT targets they make
# the answer copy-predictable and reward learning the format (issue 13), so they are removed.
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def gsm8k_messages(row: dict[str, Any], *, keep_calculator: bool = False) -> list[Message]:
    """GSM8K rows: ``question`` and ``answer`` (worked solution ending in ``#### <number>``).

    Args:
        row: one row of GSM8K's ``train.jsonl`` / ``test.jsonl``.
        keep_calculator: keep the ``<<48/2=24>>`` calculator annotations in the answer
            (``data.gsm8k.keep_calculator``; default false strips them, leaving ``48/2 = 24``).

    Returns:
        The user question and the assistant's worked solution.

    """
    answer = _require_str(row, "answer")
    if not keep_calculator:
        answer = CALCULATOR_ANNOTATION.sub("", answer)
    return [{"role": "user", "content": _require_str(row, "question")},
            {"role": "assistant", "content": answer}]


def chat_messages(row: dict[str, Any]) -> list[Message]:
    """``{"messages": [{"role", "content"}, ...]}`` rows; falls back to Alpaca fields."""
    if "messages" not in row:
        return alpaca_messages(row)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        try:
            role = _require_str(message, "role")
            content = _require_str(message, "content")
        except ValueError as err:
            raise ValueError(f"messages[{i}]: {err}") from err
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant response")
    if not any(m["role"] == "user" for m in out):
        raise ValueError("messages need at least one user turn")
    return out


# Each converter takes the row, plus keyword options from ``data.<reader>`` (data.gsm8k).
CONVERTERS: Registry[Callable[..., list[Message]]] = Registry("data reader", DataError)
CONVERTERS.add("alpaca", alpaca_messages)
CONVERTERS.add("dolly", dolly_messages)
CONVERTERS.add("gsm8k", gsm8k_messages)
CONVERTERS.add("jsonl", chat_messages)


def example_id(messages: list[Message]) -> str:
    """Stable id: a hash of the canonical message content (independent of file, order, source)."""
    return fingerprint([[m["role"], m["content"]] for m in messages])


def read_examples(
    path: str | Path,
    reader: str,
    *,
    source: str | None = None,
    max_rows: int | None = None,
    on_bad_row: str = "error",
    options: Mapping[str, Any] | None = None,
) -> tuple[list[Example], ReadStats]:
    """Read one data file into examples.

    Args:
        path: JSON array or JSON Lines file.
        reader: one of ``CONVERTERS`` (``alpaca``, ``dolly``, ``gsm8k``, ``jsonl``).
        source: label stored on each example; defaults to the reader name.
        max_rows: keep the first ``max_rows`` valid rows (``None``: all).
        on_bad_row: ``error`` stops at the first bad row; ``skip`` skips and counts it.
        options: keyword options of the reader's converter, from ``data.<reader>`` (only
            ``gsm8k`` has any: ``keep_calculator``); ``None``: the converter's defaults.

    Returns:
        The examples in file order, and what was skipped.

    Raises:
        DataError: a bad row (with ``on_bad_row=error``), an unreadable or empty file.

    """
    converter = CONVERTERS.lookup(reader)
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    convert = functools.partial(converter, **dict(options or {}))
    stats = ReadStats()
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line, row in iter_json_rows(path):
        if max_rows is not None and len(examples) >= max_rows:
            break
        try:
            if isinstance(row, InvalidJSON):
                raise ValueError(str(row))
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            messages = convert(row)
        except ValueError as err:
            if on_bad_row == "error":
                raise DataError(
                    f"{path}:{line}: {err} (set data.on_bad_row=skip to skip such rows)"
                ) from err
            log.warning("data.on_bad_row=skip: skipping %s:%d: %s", path, line, err)
            stats.skipped["bad_row"] += 1
            continue
        row_id = example_id(messages)
        if row_id in seen:  # an exact duplicate adds no information and would double its weight
            log.warning("dropping %s:%d, a duplicate of line %d", path, line, seen[row_id])
            stats.skipped["duplicate"] += 1
            continue
        seen[row_id] = line
        examples.append(Example(row_id, tuple(messages), source or reader, row))
    stats.rows = len(examples)
    if not examples:  # an empty pool would fail much later, in selection or in the trainer
        skipped = ", ".join(f"{v} {k}" for k, v in sorted(stats.skipped.items())) or "none"
        raise DataError(f"{path}: no usable rows (skipped: {skipped})")
    return examples, stats
