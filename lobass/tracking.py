"""Experiment tracking: W&B (offline unless the user says otherwise) or nothing.

The pipeline talks to a :class:`RunLogger`; ``logger=none`` gives the no-op one. Secrets are kept
out by construction: only the resolved Hydra config (which holds no keys: keys come from the
environment) and computed numbers are sent.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import TrainerCallback

from lobass.jsonrows import read_jsonl

log = logging.getLogger(__name__)


class RunLogger(Protocol):
    """What the pipeline logs; every method is cheap to call when tracking is off."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log scalar metrics (keys ``<stage>/<name>``)."""

    def log_histogram(self, key: str, values: np.ndarray) -> None:
        """Log the distribution of ``values``."""

    def log_file(self, name: str, kind: str, path: Path) -> None:
        """Attach a file (e.g. the selected ids) as an artifact."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a small table."""

    def log_curve(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        """Log one point of a curve with its own step axis (``<prefix>/step``)."""

    def log_config(self, values: dict[str, Any]) -> None:
        """Add values to the run's config (under keys of their own)."""

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close the run; a nonzero ``exit_code`` marks it failed."""


class NullLogger:
    """``logger=none``: tracking off."""

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

    def log_curve(self, prefix: str, step: int, metrics: dict[str, float]) -> None:  # noqa: D102
        pass

    def log_config(self, values: dict[str, Any]) -> None:  # noqa: D102
        pass

    def finish(self, exit_code: int = 0) -> None:  # noqa: D102
        pass


class WandbLogger:
    """W&B run; ``mode`` defaults to offline so nothing leaves the machine unless asked."""

    def __init__(self, config: dict[str, Any], *, project: str, mode: str, run_dir: Path,
                 name: str | None, group: str | None, tags: Sequence[str]) -> None:
        import wandb

        self._wandb = wandb
        self._curves: set[str] = set()
        if name is None and group is None:  # a sweep point: named by its overrides, grouped
            name, group = sweep_point_name()
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
        if path.is_dir() and _size(path) > COPY_LIMIT:  # a 7B adapter: a reference, not a copy
            artifact.add_reference(path.resolve().as_uri())
        elif path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:  # noqa: D102
        self.run.log({key: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_curve(self, prefix: str, step: int, metrics: dict[str, float]) -> None:  # noqa: D102
        if prefix not in self._curves:  # each fine-tune's curve on its own x axis
            self.run.define_metric(f"{prefix}/step")
            self.run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self._curves.add(prefix)
        self.run.log({f"{prefix}/step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}})

    def log_config(self, values: dict[str, Any]) -> None:  # noqa: D102
        self.run.config.update(values, allow_val_change=True)

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


COPY_LIMIT = 64 * 1024 * 1024  # bytes: larger directories are logged as a reference to the files


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sweep_point_name() -> tuple[str | None, str | None]:
    """``(name, group)`` of a multirun point: its overrides, and its sweep's directory.

    ``(None, None)`` for a single run (W&B names it) or outside Hydra.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None, None
    return (hydra_cfg.job.override_dirname or str(hydra_cfg.job.num),
            Path(hydra_cfg.sweep.dir).name)


class TrainingCurves(TrainerCallback):
    """A fine-tune's Trainer logs, into the run under a prefix of their own.

    transformers' own W&B callback would log every fine-tune of a run as ``train/loss`` on one
    global step (the reference's curve, then the final model's restarting at 1), and merge the
    TrainingArguments and model config into the run's config over lobass's own keys. So the
    Trainer reports to nothing and this callback logs ``<prefix>/train/<name>`` against
    ``<prefix>/step``, and the arguments under ``<prefix>/training_args``.
    """

    def __init__(self, tracker: RunLogger, prefix: str) -> None:
        self.tracker, self.prefix = tracker, prefix

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the Trainer's arguments under this fine-tune's prefix."""
        sanitized = args.to_sanitized_dict()
        sanitized.pop("output_dir", None)  # a temporary folder, gone after the stage
        self.tracker.log_config({f"{self.prefix}/training_args": sanitized})

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        """Forward the numbers of one Trainer log call (``loss`` -> ``train/loss``).

        The closing call's ``train_loss`` (the mean over every step) becomes ``train/mean_loss``,
        so that ``train/loss`` stays one point per logged step.
        """
        renamed = {"train_loss": "mean_loss"}
        numbers = {f"train/{renamed.get(k, k.removeprefix('train_'))}": float(v)
                   for k, v in (logs or {}).items() if isinstance(v, int | float)}
        if numbers:
            self.tracker.log_curve(self.prefix, state.global_step, numbers)


def log_run_outputs(tracker: RunLogger, artifacts: dict[str, str], sample: int = 200) -> None:
    """The run's outputs as W&B objects: adapters as artifacts, scores and answers as tables.

    Args:
        tracker: the run's logger.
        artifacts: ``summary.json``'s artifact paths.
        sample: score rows logged as a table (a seeded sample; the histograms see every row).

    """
    for name in ("reference_adapter", "adapter"):
        if name in artifacts:
            tracker.log_file(name, "model", Path(artifacts[name]))
    if "scores" in artifacts:
        rows = read_jsonl(Path(artifacts["scores"]))
        for column in ("loss_init", "loss_ref", "score"):
            values = np.array([r[column] for r in rows if r.get(column) is not None], float)
            if len(values):
                tracker.log_histogram(f"score/{column}", values)
        shown = random.Random(0).sample(rows, min(sample, len(rows)))
        columns = sorted({k for r in shown for k in r})
        tracker.log_table("score/sample", columns, [[r.get(c) for c in columns] for r in shown])
    for name, path in artifacts.items():
        if name.startswith("generations/"):
            answers = read_jsonl(Path(path))
            columns = sorted({k for r in answers for k in r})
            tracker.log_table(name, columns, [[r.get(c) for c in columns] for r in answers])
