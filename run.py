"""lobass entry point: ``python run.py [overrides]``; the work happens in lobass.pipeline."""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Nothing is ever fetched from a hub at run time unless the user asks for it explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lobass.config  # noqa: E402,F401  (registers the ${pkg_data:...} resolver)
from lobass.devices import DeviceUnavailableError  # noqa: E402
from lobass.distributed import leave_group  # noqa: E402
from lobass.jsonrows import DataError  # noqa: E402
from lobass.memory import InsufficientMemoryError  # noqa: E402
from lobass.pipeline import run  # noqa: E402
from lobass.schema.walk import ConfigError  # noqa: E402

# Errors in what the user gave (a config value, a data row, a device or memory too small): their
# message says what to change, so a single run prints that one line, not a traceback, as Hydra
# users expect (HYDRA_FULL_ERROR=1 shows it). A multirun re-raises, so the point fails alone and
# the sweep goes on; the run's error.txt keeps the traceback either way.
USER_ERRORS = (ConfigError, DataError, DeviceUnavailableError, InsufficientMemoryError)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Compose the config and run the requested stages."""
    try:
        run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"lobass: error: {err}", file=sys.stderr)  # noqa: T201
        sys.exit(2)


if __name__ == "__main__":
    main()  # a failed run exits inside (Hydra's sys.exit), never reaching the line below
    leave_group()  # under torchrun, once every run of a sweep is done
