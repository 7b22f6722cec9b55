"""What code a run ran: the git commit (and whether the tree was dirty) and the package versions.

A number in ``summary.json`` is only reproducible with the code and libraries that made it: a
transformers release can move a loss in the sixth digit, a peft release the adapter's layout.
Both are recorded once per run, in ``summary.json`` and the W&B run's config.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# The distributions whose versions change what lobass computes or how it is run.
PACKAGES = ("lobass", "torch", "transformers", "peft", "accelerate", "lm_eval", "hydra-core",
            "omegaconf", "datasets", "wandb")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Each installed distribution's version (``None``: not installed)."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(where: Path | None = None) -> dict[str, Any]:
    """The commit of the checkout that holds lobass, and whether it had uncommitted changes.

    ``{"commit": None, "dirty": None}`` where lobass is not in a git checkout (a wheel install) or
    git is missing: the package version then identifies the code.
    """
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        # tracked files only: run outputs the user keeps beside the code do not make it dirty
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=where, capture_output=True, text=True, timeout=10,
                                check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance() -> dict[str, Any]:
    """``{"git": {"commit", "dirty"}, "versions": {package: version}}`` for this process."""
    return {"git": git_state(), "versions": package_versions()}
