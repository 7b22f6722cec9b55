"""A mistake in what the user gave is one line on the terminal, the traceback only when asked."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _run(tmp_path, *overrides, **env):
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "debug=tiny", f"hydra.run.dir={tmp_path}/run",
         f"artifacts_dir={tmp_path}/artifacts", *overrides],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_a_config_error_is_one_line_with_the_fix_and_the_traceback_stays_in_error_txt(tmp_path):
    done = _run(tmp_path, "selection.count=8")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "lobass: error: selection.count=8 is set beside selection.ratio=0.25 (the ratio group's "
        "default): use selection=count selection.count=8")
    assert "Traceback" in (tmp_path / "run" / "error.txt").read_text()


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    done = _run(tmp_path, "selection.count=8", HYDRA_FULL_ERROR="1")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "use selection=count selection.count=8" in done.stderr
