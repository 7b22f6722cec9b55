"""Experiment tracking: W&B (offline unless the user says otherwise) or nothing.

The pipeline talks to a :class:`RunLogger`; ``logger=none`` gives the no-op one. Secrets are kept
out by construction: only the resolved Hydra config (which holds no keys: keys come from the
environment) and computed numbers are sent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


class RunLogger(Protocol):
    """What the pipeline logs; every method is cheap to call when tracking is off."""

    report_to: str  # value for transformers' TrainingArguments.report_to

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log scalar metrics (keys ``<stage>/<name>``)."""

    def log_histogram(self, key: str, values: np.ndarray) -> None:
        """Log the distribution of ``values``."""

    def log_file(self, name: str, kind: str, path: Path) -> None:
        """Attach a file (e.g. the selected ids) as an artifact."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a small table."""

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close the run; a nonzero ``exit_code`` marks it failed."""


class NullLogger:
    """``logger=none``: tracking off."""

    report_to = "none"

    def __init__(self, config: dict[str, Any] | None = None, run_dir: Path | None = None) -> None:
        """Take what :func:`make_logger` gives every logger, and keep none of it."""

    def log_metrics(self, metrics: dict[str, float]) -> None:  # noqa: D102
        pass

    def log_histogram(self, key: str, values: np.ndarray) -> None:  # noqa: D102
        pass

    def log_file(self, name: str, kind: str, path: Path) -> None:  # noqa: D102
        pass

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:  # noqa: D102
        pass

    def finish(self, exit_code: int = 0) -> None:  # noqa: D102
        pass


class WandbLogger:
    """W&B run; ``mode`` defaults to offline so nothing leaves the machine unless asked."""

    report_to = "wandb"

    def __init__(self, config: dict[str, Any], *, project: str, mode: str, run_dir: Path,
                 name: str | None, group: str | None, tags: Sequence[str]) -> None:
        import wandb

        self._wandb = wandb
        # An explicit WANDB_MODE in the environment wins over the config's default.
        self.run = wandb.init(project=project, mode=os.environ.get("WANDB_MODE", mode),  # type: ignore[arg-type]
                              dir=str(run_dir), config=config, name=name, group=group,
                              tags=list(tags), reinit="finish_previous")

    def log_metrics(self, metrics: dict[str, float]) -> None:  # noqa: D102
        self.run.log(dict(metrics))

    def log_histogram(self, key: str, values: np.ndarray) -> None:  # noqa: D102
        finite = values[np.isfinite(values)]
        if len(finite):
            self.run.log({key: self._wandb.Histogram(finite.tolist())})

    def log_file(self, name: str, kind: str, path: Path) -> None:  # noqa: D102
        artifact = self._wandb.Artifact(name=name, type=kind)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:  # noqa: D102
        self.run.log({key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self, exit_code: int = 0) -> None:  # noqa: D102
        # the run's state in W&B: "failed" for a nonzero code, "finished" otherwise
        self.run.finish(exit_code=exit_code)


def make_logger(logger_cfg: Any, config: dict[str, Any], run_dir: Path) -> RunLogger:
    """The logger the ``logger`` group names, built from its ``_target_`` by Hydra.

    Args:
        logger_cfg: the ``logger`` config (``_target_``, ``kind`` and the target's arguments).
        config: the resolved run config, recorded by loggers that keep one.
        run_dir: the run directory (W&B writes its offline files under it).

    Returns:
        The logger; ``kind`` only names the option and is not passed on.

    """
    spec = OmegaConf.to_container(logger_cfg, resolve=True) if OmegaConf.is_config(logger_cfg) \
        else dict(logger_cfg)
    assert isinstance(spec, dict)
    spec.pop("kind", None)
    # _partial_: the run's config and directory are objects, passed as they are, not merged
    # into a DictConfig first.
    build = instantiate(spec, _partial_=True, _convert_="all")
    logger: RunLogger = build(config=config, run_dir=run_dir)
    return logger
