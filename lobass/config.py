"""Config helpers: the ``pkg_data`` resolver and checks that fail before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RESOURCES = Path(__file__).parent / "resources"
STAGES = ("reference", "score", "select", "train", "eval")


def package_data(relative: str) -> str:
    """Absolute path of a data file shipped in ``lobass/resources/data``."""
    return str(RESOURCES / "data" / relative)


# `${pkg_data:alpaca/alpaca_pool_1k.json}` in configs: shipped files work from any working dir.
OmegaConf.register_new_resolver("pkg_data", package_data, replace=True)


def validate(cfg: DictConfig) -> None:
    """Check the run-level choices that would otherwise fail late, after minutes of work.

    Raises:
        ValueError: with the allowed values.

    """
    from lobass.scoring import get_scorer

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in stages=; choose from {list(STAGES)}")
    get_scorer(cfg.scorer.name)
    ratio, count = cfg.selection.ratio, cfg.selection.count
    if (ratio is None) == (count is None):
        raise ValueError("set exactly one of selection.ratio and selection.count")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"selection.ratio must be in (0, 1], got {ratio}")
    if not 0 < cfg.reference.fraction <= 1:
        raise ValueError(f"reference.fraction must be in (0, 1], got {cfg.reference.fraction}")
    if cfg.score.on_nonfinite not in ("error", "drop"):
        raise ValueError(f"score.on_nonfinite must be 'error' or 'drop', got "
                         f"{cfg.score.on_nonfinite!r}")
