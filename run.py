"""lobass entry point: ``python run.py [overrides]``; the work happens in lobass.pipeline."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

# Nothing is ever fetched from a hub at run time unless the user asks for it explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lobass.config  # noqa: E402,F401  (registers the ${pkg_data:...} resolver)
from lobass.pipeline import run  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Compose the config and run the requested stages."""
    run(cfg)


if __name__ == "__main__":
    main()
