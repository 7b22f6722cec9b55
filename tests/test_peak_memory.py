"""Per-stage peak memory: each stage's own peak, and the run's peak what outside tools see."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from lobass.context import StageResult
from lobass.peak_memory import max_rss_mb
from lobass.summary import Summary

BLOCK_MB = 400


def _allocate(mb: int) -> StageResult:
    block = bytearray(mb * 1024 * 1024)  # zero-filled by the allocator: every page is touched
    block[::4096] = b"\x01" * len(block[::4096])
    del block  # a block this large is its own mapping: freed, it leaves the resident set
    return StageResult(Path("."), reused=False)


def test_a_stage_that_allocates_a_known_block_shows_it_in_its_own_peak():
    summary = Summary()
    summary.stage("quiet_before", lambda: StageResult(Path("."), reused=False))
    summary.stage("big", lambda: _allocate(BLOCK_MB))
    summary.stage("quiet_after", lambda: StageResult(Path("."), reused=False))
    before, big, after = (summary.stages[name]["peak_rss_mb"]
                          for name in ("quiet_before", "big", "quiet_after"))
    assert big - before == pytest.approx(BLOCK_MB, abs=40)
    # the stage after it reports its own peak, not the process's lifetime high-water mark ...
    assert after < big - BLOCK_MB / 2
    # ... which is left alone for outside tools: it still holds the big stage's peak
    assert max_rss_mb() == pytest.approx(big, abs=5)


def test_usr_bin_time_agrees_with_the_largest_stage_peak():
    if not Path("/usr/bin/time").exists():
        pytest.skip("/usr/bin/time is not installed")
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from test_peak_memory import _allocate
from lobass.summary import Summary
from lobass.context import StageResult
from pathlib import Path
s = Summary()
s.stage("big", lambda: _allocate({BLOCK_MB}))
s.stage("small", lambda: _allocate(50))
print(json.dumps(s.stages))
"""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    outside_mb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                               done.stderr).group(1)) / 1024
    stages = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    largest = max(stage["peak_rss_mb"] for stage in stages.values())
    assert largest == pytest.approx(outside_mb, rel=0.10)
    assert stages["small"]["peak_rss_mb"] < largest - BLOCK_MB / 2
