"""What every stage is given (:class:`Context`) and gives back (:class:`StageResult`).

Stages are plain functions ``stage(ctx, ...) -> StageResult``; they never import each other, and
the pipeline passes one stage's result to the next. Nothing here does any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lobass.artifacts import fingerprint
from lobass.data import Example
from lobass.formatting import Features
from lobass.tracking import RunLogger


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


@dataclass(frozen=True)
class Context:
    """What every stage needs: the config, the tokenised pool, the initial model and the cache."""

    cfg: DictConfig
    pool: Pool
    model_path: str  # what modeling.resolve_model_path gave: a local directory or a hub id
    tokenizer: Any
    artifacts_dir: Path
    tracker: RunLogger


@dataclass
class StageResult:
    """A stage's artifact and what ``summary.json`` keeps of it."""

    directory: Path
    reused: bool
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # summary name -> path
    ids: list[str] = field(default_factory=list)  # rows a selection chose, in rank order
    scores: np.ndarray | None = None  # (N,) the score stage's scores in pool order, NaN if flagged
    identity: dict[str, Any] | None = None  # a selection's rule as resolved (point identity)
