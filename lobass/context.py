"""What every stage is given (:class:`Context`) and gives back (:class:`StageResult`).

Stages are plain functions ``stage(ctx, ...) -> StageResult``; they never import each other, and
the pipeline passes one stage's result to the next. Nothing here does any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lobass.pool import Pool
from lobass.tracking import RunLogger


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
