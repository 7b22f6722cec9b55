"""The pool stage: read every source of ``data``, de-duplicate, tokenise, and say what it holds.

Runs before any model loads (only the tokenizer is needed), so a bad row or an oversized
``selection.count`` fails in seconds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from omegaconf import DictConfig

from lobass.artifacts import fingerprint
from lobass.data import Example, ReadStats, read_examples
from lobass.formatting import Features, tokenize_example
from lobass.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pool:
    """The pool, read and tokenised, and what identifies its tokens."""

    examples: list[Example]
    features: list[Features]
    # model, template, max_length: what turns a row's content into the same tokens
    tokens_key: dict[str, Any]

    @cached_property
    def ids(self) -> list[str]:
        """Content ids in pool order (built once: stages index it row by row)."""
        return [e.id for e in self.examples]

    def content_key(self) -> dict[str, Any]:
        """What a model's per-row outputs depend on: every row's tokens, in pool order."""
        return {**self.tokens_key, "rows": fingerprint(self.ids)}

    def rows_fingerprint(self) -> str:
        """Every row as stored: content, ``source`` label and the raw record an export carries.

        Its ``id``, ``category`` or source name changes no loss, but it changes what the scores
        and the export show, so the artifacts that show them are keyed on this.
        """
        return fingerprint([[e.id, e.source, e.raw] for e in self.examples])


def pool_sources(data_cfg: DictConfig) -> dict[str, DictConfig]:
    """Each file of the pool (``data.path`` then every ``data.mix`` entry) by its source label.

    A mix entry is labelled ``data.mix.<name>.source``, or its name when that is unset.

    Raises:
        ConfigError: two files share a label. Why: the label names each row's source (per-source
            quotas, reports, ``data/<source>/*`` counts), and a mapping by label would keep only
            one of the two files, silently dropping the other's rows.

    """
    entries = [("data.source", str(data_cfg.source), data_cfg)]
    for name, mix in (data_cfg.mix or {}).items():
        label = mix.source or name
        key = f"data.mix.{name}.source" if mix.source else f"data.mix.{name}"
        entries.append((key, str(label), mix))
    sources: dict[str, DictConfig] = {}
    keys: dict[str, str] = {}
    for key, label, entry in entries:
        if label in sources:
            raise ConfigError(
                f"{keys[label]} and {key} both label their rows {label!r}: one file would "
                f"replace the other in the pool; give one another label (e.g. "
                f"data.source={label}_main, or data.mix.<name>.source=...)")
        sources[label], keys[label] = entry, key
    return sources


def read_pool(data_cfg: DictConfig) -> tuple[list[Example], dict[str, float]]:
    """Every source of ``data`` (``data.path`` then ``data.mix``) read and de-duplicated.

    Returns:
        The examples in source then file order, and ``data/<source>/{rows,skipped_*}`` counts.

    Raises:
        ConfigError: two files with one source label (:func:`pool_sources`).

    """
    sources = pool_sources(data_cfg)
    examples: list[Example] = []
    metrics: dict[str, float] = {}
    seen: set[str] = set()
    for name, source in sources.items():
        # a reader's options live at data.<reader>; only gsm8k has any (keep_calculator)
        reader_options = data_cfg.gsm8k if source.reader == "gsm8k" else None
        rows, stats = read_examples(source.path, source.reader, source=str(name),
                                    max_rows=source.max_rows, on_bad_row=data_cfg.on_bad_row,
                                    options=reader_options)
        unique = [e for e in rows if e.id not in seen]  # a row in two mixed files counts once
        stats.skipped["duplicate"] += len(rows) - len(unique)
        seen.update(e.id for e in unique)
        examples += unique
        metrics.update(ReadStats(len(unique), stats.skipped).as_metrics(f"data/{name}"))
    return examples, metrics


def tokenize_pool(cfg: DictConfig, examples: list[Example], tokenizer: Any,
                  model_id: str) -> tuple[Pool, dict[str, float]]:
    """The pool with response-only labels, and ``data/{pool_rows,truncated,tokens}``.

    ``data/special_token_text`` counts the rows whose text holds special-token strings
    (tokenised as plain text unless ``data.allow_special_tokens``).

    Args:
        cfg: the run's config.
        examples: the pool's rows (:func:`read_pool`).
        tokenizer: the initial model's tokenizer.
        model_id: :func:`lobass.modeling.model_key` of the initial model (its files' content).

    """
    data = cfg.data
    allow = bool(data.allow_special_tokens)
    features = [tokenize_example(e, tokenizer, cfg.model.template, data.max_length,
                                 allow_special_tokens=allow) for e in examples]
    metrics = {"data/pool_rows": float(len(examples)),
               "data/truncated": float(sum(f.truncated for f in features)),
               "data/tokens": float(sum(len(f.input_ids) for f in features)),
               "data/special_token_text": float(sum(f.special_text > 0 for f in features))}
    log.info("data=%s: %d rows, %d truncated to data.max_length=%d", data.name, len(examples),
             metrics["data/truncated"], data.max_length)
    if metrics["data/special_token_text"]:
        log.warning("data=%s: %d rows hold special-token strings (e.g. the chat template's "
                    "end-of-turn) in their text; data.allow_special_tokens=%s: they are %s",
                    data.name, metrics["data/special_token_text"], str(allow).lower(),
                    "control tokens" if allow else "tokenised as plain text")
    # "text": how row text meets special tokens (plain unless allowed). Keys made before it
    # existed tokenised such strings as control tokens, so their artifacts are not reused.
    tokens_key = {"model": model_id, "template": cfg.model.template,
                  "max_length": data.max_length,
                  "text": "special-tokens-allowed" if allow else "plain-v1"}
    return Pool(examples, features, tokens_key), metrics
