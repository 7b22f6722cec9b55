"""Where things are defined: one home per noun, and imports that only go down (issue 32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lobass.pool import Pool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pool_lives_in_pool_py_and_every_module_imports_first_without_a_cycle():
    # the class the pool stage builds is defined beside it (lobass.context only imports it)
    assert Pool.__module__ == "lobass.pool"
    # a cycle shows only when a module of it is imported first: a fresh interpreter for each
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for module in ("lobass.pool", "lobass.context"):  # the two a cycle would join
        done = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__file__)"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert done.returncode == 0, f"import {module}: {done.stderr[-2000:]}"
        # the last line: transformers' Trainer module prints a line of its own under WANDB_MODE
        printed = done.stdout.strip().splitlines()[-1]
        assert printed.startswith(str(ROOT / "lobass")), done.stdout
