"""The inputs of Cherry LLM's instruction-following difficulty (IFD), as its own code builds them.

Cherry LLM (Li et al., "From Quantity to Quality", NAACL 2024; github.com/MingLiiii/Cherry_LLM,
``cherry_seletion/data_analysis.py --mod cherry --prompt alpaca`` then ``data_by_IFD.py``) scores
a row with two passes of the same model, each a mean token loss over the answer's tokens:

- ``ifd_cond``, ``L(y|x)``: Stanford Alpaca's prompt (with its ``### Input:`` section when the row
  has an input) followed directly by the answer, with no end-of-sequence token, truncated to
  ``max_length`` tokens;
- ``ifd_alone``, ``L(y)``: ``"### Response:"`` followed directly by the answer, truncated to
  ``max_length - prompt_tokens + 4`` tokens.

In both, the text is tokenised whole (with the tokenizer's own special tokens) and the answer's
tokens are those after the first ``len(tokenize(text before the answer))``: a token that merges
the prompt's last characters with the answer's first (``:"`` in a byte-level BPE) stays out of
the answer, exactly as there. ``data_by_IFD.py`` then skips rows whose prompt fills ``max_length``,
rows with no answer token, rows whose answer-alone pass kept more answer tokens than fit after
the prompt (``prompt_tokens + answer_alone_tokens > max_length``), and rows with IFD above 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lobass.data import Example
from lobass.formatting import IGNORE_INDEX, Features

# Stanford Alpaca's prompts as Cherry's data_analysis.py writes them (PROMPT_DICT): note the
# "### Response:" with no newline, the answer following it directly.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ANSWER_ALONE_PREFIX = "### Response:"
ALONE_EXTRA_TOKENS = 4  # data_analysis.py: the answer-alone pass may use max_length - prompt + 4


@dataclass(frozen=True)
class CherryPasses:
    """Both passes of every row, and which rows ``data_by_IFD.py`` would keep on length."""

    cond: list[Features]  # prompt + answer: the input of L(y|x)
    alone: list[Features]  # "### Response:" + answer: the input of L(y)
    fits: np.ndarray  # (N,) bool: prompt < max_length, answers non-empty, alone answer fits


def cherry_fields(example: Example) -> tuple[str, str, str]:
    """``(instruction, input, output)`` of a row, as Cherry reads an Alpaca record.

    Alpaca-style rows (``instruction``/``input``/``output`` in the raw record; Dolly's ``context``
    counts as the input) use their own fields, like Cherry, which reads nothing else (an earlier
    ``history`` is left out there too). Other single-turn rows (GSM8K, chat) become an
    instruction with no input.

    Raises:
        ValueError: a multi-turn or system-prompted row that has no Alpaca fields.

    """
    output = example.messages[-1]["content"]
    raw = example.raw
    if isinstance(raw.get("instruction"), str):
        extra = raw.get("input", raw.get("context", ""))
        return raw["instruction"], extra if isinstance(extra, str) else "", output
    roles = [m["role"] for m in example.messages]
    if roles != ["user", "assistant"]:
        raise ValueError(f"scorer=ifd (Cherry's IFD) scores single-turn instruction rows; row "
                         f"{example.id} (source {example.source}) has turns {roles}. Use "
                         "scorer=ifd_chat, which scores the last turn in the model's template")
    return example.messages[0]["content"], "", output


def cherry_prompt(instruction: str, extra: str) -> str:
    """Cherry's Alpaca prompt (``--prompt alpaca``): with the input section only when non-empty."""
    if extra == "":  # Cherry tests for the empty string, not for whitespace
        return PROMPT_NO_INPUT.format_map({"instruction": instruction})
    return PROMPT_INPUT.format_map({"instruction": instruction, "input": extra})


def _ids(tokenizer: Any, text: str, max_length: int | None = None) -> list[int]:
    # tokenizer.encode's defaults, as Cherry calls it: special tokens added, right truncation
    # (the tokenizer's own side) when a max_length is given.
    if max_length is None:
        return list(tokenizer(text)["input_ids"])
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def _answer_pass(tokenizer: Any, text: str, answer_start: int, max_length: int,
                 ) -> tuple[Features, int]:
    """Features of one of Cherry's passes, and its answer length (``end - start``, may be <= 0).

    ``get_perplexity_and_embedding_part_text``: the labels are the text's own tokens from
    ``len(encode(text[:answer_start]))`` on; everything before is ``-100``.
    """
    ids = _ids(tokenizer, text)
    truncated = len(ids) > max_length
    if truncated:
        ids = _ids(tokenizer, text, max_length)
    start = len(_ids(tokenizer, text[:answer_start]))
    kept = min(start, len(ids))  # a prompt that fills max_length leaves no answer token
    labels = [IGNORE_INDEX] * kept + ids[kept:]
    return Features(ids, labels, kept, truncated), len(ids) - start


def cherry_passes(examples: Sequence[Example], tokenizer: Any, max_length: int) -> CherryPasses:
    """Cherry's two passes for every row, built as ``data_analysis.py --mod cherry`` builds them.

    Args:
        examples: the pool's rows.
        tokenizer: the scored model's tokenizer.
        max_length: Cherry's ``--max_length`` (lobass passes ``data.max_length``; Cherry's
            scripts use 512).

    Returns:
        Both passes' features and the rows ``data_by_IFD.py`` keeps on length grounds.

    """
    cond, alone, fits = [], [], []
    for example in examples:
        instruction, extra, output = cherry_fields(example)
        prompt = cherry_prompt(instruction, extra)
        prompt_len = min(len(_ids(tokenizer, prompt)), max_length)  # encode(..., truncation=True)
        # rfind(output) in Cherry: the answer is the text's tail, so it starts after the prefix.
        features, len_2 = _answer_pass(tokenizer, prompt + output, len(prompt), max_length)
        cond.append(features)
        features, len_1 = _answer_pass(tokenizer, ANSWER_ALONE_PREFIX + output,
                                       len(ANSWER_ALONE_PREFIX),
                                       max_length - prompt_len + ALONE_EXTRA_TOKENS)
        alone.append(features)
        fits.append(max_length - prompt_len > 0 and len_1 > 0 and len_2 > 0
                    and prompt_len + len_1 <= max_length)
    return CherryPasses(cond, alone, np.array(fits, dtype=bool))
