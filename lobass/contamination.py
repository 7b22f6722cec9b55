"""Contamination audit: which pool rows overlap an evaluation set, checked before any scoring.

A pool row that holds an evaluation prompt (or its reference answer) trains on the test: its
held-out loss or benchmark score then measures memory, not learning. Two tests per pool row and
evaluation set, on normalised text (lowercased, punctuation replaced by spaces, whitespace
collapsed, so that quoting and spacing do not hide a copy):

- ``exact``: the row's instruction (its last user turn) equals an evaluation prompt.
- ``ngram13``: the row's text (every turn) shares a word 13-gram with an evaluation item (its
  prompt and, where the set has one, its reference answer). This is the test of GPT-3's
  contamination study (Brown et al., 2020, appendix C: word 13-grams after lowercasing and
  stripping punctuation), which later model reports such as LLaMA's reuse with variations;
  13 words are long enough that a shared span is a copy rather than a common phrase.

An instruction shorter than 13 words has no 13-gram: the exact test covers it.

The evaluation sets are whole files, whatever ``max_rows`` or ``limit`` a run evaluates, so the
pool (and with it the reference and the scores, whose keys hash the pool) does not change when
only the evaluation's size does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lobass.data import Example, read_examples
from lobass.evaluation.prompts import read_prompts, read_reference_set
from lobass.jsonrows import DataError, InvalidJSON, iter_json_rows

log = logging.getLogger(__name__)

NGRAM = 13  # words per n-gram (GPT-3's choice)
_PUNCTUATION = re.compile(r"[^\w\s]|_")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation item: the prompt a model answers, and the reference answer if any."""

    prompt: str
    answer: str = ""


def normalize(text: str) -> list[str]:
    """Lowercased words with punctuation replaced by spaces (``"Don't!"`` -> ``["don", "t"]``)."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def ngrams(words: Sequence[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    """The set of word ``n``-grams of ``words`` (empty when there are fewer than ``n`` words)."""
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _last_user(messages: Iterable[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


def _from_examples(examples: Iterable[Example]) -> list[EvalItem]:
    return [EvalItem(_last_user(e.messages), e.messages[-1]["content"]) for e in examples]


def _ifeval_items(path: str) -> list[EvalItem]:
    items = []
    for line, row in iter_json_rows(Path(path)):
        if isinstance(row, InvalidJSON) or not isinstance(row, dict) \
                or not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}:{line}: expected an IFEval row with a string 'prompt'")
        items.append(EvalItem(row["prompt"]))
    return items


def evaluation_sets(eval_cfg: DictConfig) -> dict[str, list[EvalItem]]:
    """Every enabled evaluation set of ``eval``, whole, by the name of its metric group.

    ``heldout``, each ``reference_loss`` set, each enabled ``generation.sets`` entry (prompts
    only), ``gsm8k`` (test questions and solutions) and ``ifeval`` (prompts).
    """
    sets: dict[str, list[EvalItem]] = {}
    held = eval_cfg.heldout
    if held.enabled:
        sets["heldout"] = _from_examples(read_examples(held.path, held.reader,
                                                       source="heldout")[0])
    for name, ref in eval_cfg.reference_loss.items():
        if ref.enabled:
            whole = OmegaConf.merge(ref, {"max_rows": None})
            sets[str(name)] = _from_examples(read_reference_set(str(name), whole))
    generation = eval_cfg.generation
    for name, spec in (generation.sets.items() if generation.enabled else []):
        if spec.enabled:
            sets[str(name)] = [EvalItem(_last_user(p.messages))
                               for p in read_prompts(spec.path, spec.reader)]
    if eval_cfg.gsm8k.enabled:
        sets["gsm8k"] = _from_examples(read_examples(eval_cfg.gsm8k.test_path, "gsm8k")[0])
    if eval_cfg.ifeval.enabled:
        sets["ifeval"] = _ifeval_items(eval_cfg.ifeval.path)
    return sets


def audit(examples: list[Example], eval_cfg: DictConfig, *,
          drop: bool) -> tuple[list[Example], dict[str, float]]:
    """Count pool rows that overlap each evaluation set; with ``drop``, remove them.

    The evaluation side is indexed once (normalised prompt -> sets, 13-gram -> sets), then each
    pool row is looked up: linear in the pool's words.

    Args:
        examples: the pool, as read.
        eval_cfg: the ``eval`` config; its enabled sets are audited (see
            :func:`evaluation_sets`).
        drop: ``data.decontaminate``: remove every row that overlaps any set.

    Returns:
        The pool (without the overlapping rows when ``drop``), and the metrics
        ``data/contamination/<set>/{exact,ngram13}`` (pool rows overlapping that set),
        ``data/contamination/rows`` (rows overlapping any set) and, when ``drop``,
        ``data/decontaminated`` (rows removed).

    """
    sets = evaluation_sets(eval_cfg)
    names = list(sets)
    exact_index: dict[str, int] = {}  # normalised prompt -> bitmask of the sets holding it
    gram_index: dict[tuple[str, ...], int] = {}  # 13-gram -> bitmask of the sets holding it
    for bit, name in enumerate(names):
        for item in sets[name]:
            prompt = normalize(item.prompt)
            key = " ".join(prompt)
            exact_index[key] = exact_index.get(key, 0) | 1 << bit
            for gram in ngrams(prompt) | ngrams(normalize(item.answer)):
                gram_index[gram] = gram_index.get(gram, 0) | 1 << bit
    exact_counts = [0] * len(names)
    gram_counts = [0] * len(names)
    kept: list[Example] = []
    overlapping = 0
    for example in examples:
        exact = exact_index.get(" ".join(normalize(_last_user(example.messages))), 0)
        grams = 0
        for message in example.messages:
            for gram in ngrams(normalize(message["content"])):
                grams |= gram_index.get(gram, 0)
        for bit in range(len(names)):
            exact_counts[bit] += bool(exact >> bit & 1)
            gram_counts[bit] += bool(grams >> bit & 1)
        if exact or grams:
            overlapping += 1
            hit = [n for b, n in enumerate(names) if (exact | grams) >> b & 1]
            log.debug("pool row %s (%s) overlaps %s", example.id, example.source, hit)
        if not (drop and (exact or grams)):
            kept.append(example)
    metrics: dict[str, float] = {}
    for bit, name in enumerate(names):
        metrics[f"data/contamination/{name}/exact"] = float(exact_counts[bit])
        metrics[f"data/contamination/{name}/ngram13"] = float(gram_counts[bit])
    metrics["data/contamination/rows"] = float(overlapping)
    if drop:
        metrics["data/decontaminated"] = float(overlapping)
        log.info("data.decontaminate=true: dropped %d of %d pool rows that overlap %s",
                 overlapping, len(examples), names)
    elif overlapping:
        log.warning("%d of %d pool rows overlap an evaluation set (data/contamination/* in "
                    "summary.json); data.decontaminate=true drops them", overlapping,
                    len(examples))
    return kept, metrics

