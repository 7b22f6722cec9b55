"""Evaluation prompt sets and reference answers, read from shipped files.

Two formats: FastChat's question files (Vicuna-80, MT-Bench: ``question_id``, ``category``,
``turns``; we use the first turn, as single-turn pairwise judging does) and any SFT file that
:func:`lobass.data.read_examples` reads (a held-out slice of the pool, or AlpacaEval's
``model_outputs.json``, whose ``instruction``/``output`` rows the ``alpaca`` reader takes as they
are: its instructions are the prompts and its responses the references for the reference-free
loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lobass.data import (
    CONVERTERS,
    DataError,
    Example,
    InvalidJSON,
    example_id,
    iter_json_rows,
    read_examples,
)
from lobass.registry import Registry


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: a stable id, the conversation so far and where it came from."""

    id: str
    messages: tuple[dict[str, str], ...]  # ends with the user turn to answer
    category: str = ""


def _fastchat_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of a FastChat question file, checked for ``question_id`` and ``turns``."""
    rows = []
    for line, row in iter_json_rows(path):
        problem = ""
        if isinstance(row, InvalidJSON):
            problem = str(row)
        elif not isinstance(row, dict) or "question_id" not in row:
            problem = "expected an object with 'question_id' and 'turns'"
        elif not (isinstance(row.get("turns"), list) and row["turns"]
                  and all(isinstance(t, str) and t.strip() for t in row["turns"])):
            problem = "field 'turns' must be a non-empty list of non-empty strings"
        if problem:
            raise DataError(f"{path}:{line}: {problem}")
        rows.append((line, row))
    return rows


def _fastchat_prompts(path: Path, max_rows: int | None) -> list[Prompt]:
    """A FastChat question file's first turns (``max_rows`` is applied by the caller)."""
    return [Prompt(str(row["question_id"]), ({"role": "user", "content": row["turns"][0]},),
                   str(row.get("category", "")))
            for _, row in _fastchat_rows(path)]


def _sft_prompts(reader: str) -> Callable[[Path, int | None], list[Prompt]]:
    """Prompts from an SFT file read by data reader ``reader``: each row without its answer."""

    def read(path: Path, max_rows: int | None) -> list[Prompt]:
        examples, _ = read_examples(path, reader, source="prompts", max_rows=max_rows)
        return [Prompt(e.id, e.messages[:-1]) for e in examples]

    return read


PROMPT_READERS: Registry[Callable[[Path, int | None], list[Prompt]]] = Registry(
    "prompt reader", DataError)
PROMPT_READERS.add("fastchat", _fastchat_prompts)
for _reader in CONVERTERS:  # every SFT data reader also reads prompts
    PROMPT_READERS.add(_reader, _sft_prompts(_reader))


def read_prompts(path: str | Path, reader: str, max_rows: int | None = None) -> list[Prompt]:
    """The first ``max_rows`` prompts of a prompt file.

    Args:
        path: FastChat question JSONL (``reader=fastchat``) or an SFT data file.
        reader: a :data:`PROMPT_READERS` name: ``fastchat`` or a data reader's.
        max_rows: keep the first N prompts (``None``: all).

    Raises:
        DataError: unknown reader, or a malformed row (file and line in the message).

    """
    path = Path(path)
    prompts = PROMPT_READERS.lookup(reader)(path, max_rows)
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate prompt ids")
    return prompts[:max_rows] if max_rows is not None else prompts


def read_reference_examples(questions: str | Path, answers: str | Path,
                            max_rows: int | None = None) -> list[Example]:
    """FastChat questions joined with their reference answers (first turn) as SFT examples.

    MT-Bench ships GPT-4 reference answers for 30 of its 80 questions (math, reasoning, coding):
    the mean response loss of the evaluated model on them needs no judge.

    Raises:
        DataError: a malformed row, or an answer whose ``question_id`` has no question.

    """
    questions, answers = Path(questions), Path(answers)
    by_id = {row["question_id"]: row for _, row in _fastchat_rows(questions)}
    examples: list[Example] = []
    for line, row in iter_json_rows(answers):
        if isinstance(row, InvalidJSON):  # unreadable, too deep, a surrogate or control character
            raise DataError(f"{answers}:{line}: {row}")
        try:
            turn = row["choices"][0]["turns"][0]
            if not isinstance(turn, str) or not turn.strip():
                raise TypeError
        except (KeyError, IndexError, TypeError) as err:
            raise DataError(f"{answers}:{line}: expected choices[0].turns[0] to be the "
                            "reference answer text") from err
        question = by_id.get(row.get("question_id"))
        if question is None:
            raise DataError(f"{answers}:{line}: question_id {row.get('question_id')!r} is not "
                            f"in {questions}")
        messages = [{"role": "user", "content": question["turns"][0]},
                    {"role": "assistant", "content": turn}]
        examples.append(Example(example_id(messages), tuple(messages), "reference", row))
        if max_rows is not None and len(examples) >= max_rows:
            break
    return examples


def read_reference_set(name: str, spec: Any) -> list[Example]:
    """The examples of ``eval.reference_loss.<name>``, in the format its ``reader`` names.

    ``reader=fastchat`` joins ``questions`` with ``answers`` (:func:`read_reference_examples`);
    any data reader reads ``answers`` as an SFT file holding both the prompts and the reference
    answers (``alpaca`` reads AlpacaEval's ``model_outputs.json`` rows).

    Args:
        name: the set's name, for messages.
        spec: the ``eval.reference_loss.<name>`` config (``reader``, ``questions``, ``answers``,
            ``max_rows``); ``reader`` absent means ``fastchat``.

    Returns:
        The first ``max_rows`` examples, in file order.

    Raises:
        DataError: an unknown reader, ``questions`` missing for ``fastchat`` or given for a data
            reader (it would be ignored), or a malformed row.

    """
    reader = spec.reader
    key = f"eval.reference_loss.{name}"
    if reader not in PROMPT_READERS:
        raise DataError(f"{key}.reader={reader!r} is not supported; choose one of "
                        f"{sorted(PROMPT_READERS)}")
    questions = spec.questions
    if reader == "fastchat":
        if questions is None:
            raise DataError(f"{key}.questions is required with reader=fastchat (the question "
                            "file the answers' question_id refer to)")
        return read_reference_examples(questions, spec.answers, spec.max_rows)
    if questions is not None:
        raise DataError(f"{key}.questions={questions} is only read with reader=fastchat; the "
                        f"{reader} reader takes prompts and answers from {key}.answers: set "
                        f"{key}.questions=null")
    examples, _ = read_examples(spec.answers, reader, source="reference", max_rows=spec.max_rows)
    return examples
