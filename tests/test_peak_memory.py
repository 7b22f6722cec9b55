"""Per-stage peak memory: each stage's own peak, and the run's peak what outside tools see.

Each scenario runs in a fresh interpreter, started through a small launcher process: Linux
carries a process's resident size at fork over into the exec'd child's ``ru_maxrss``, so a child
forked straight from a pytest that has grown to gigabytes would start with that as its lifetime
peak (CI saw 3630 MiB). The launcher is a fresh, small process: its child inherits only its size.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BLOCK_MB = 400

STAGES = """
import json, sys, time
from pathlib import Path
from lobass.context import StageResult
from lobass.peak_memory import max_rss_mb
from lobass.summary import Summary

def allocate(mb, hold=0.3):
    block = bytearray(mb * 1024 * 1024)
    block[::4096] = b"\\x01" * len(block[::4096])  # touch every page
    time.sleep(hold)  # a stage holds its memory a while (and releases the GIL meanwhile)
    del block  # a block this large is its own mapping: freed, it leaves the resident set
    return StageResult(Path("."), reused=False)

s = Summary()
for name, mb in json.loads(sys.argv[1]):
    s.stage(name, lambda mb=mb: allocate(mb) if mb else StageResult(Path("."), reused=False))
print(json.dumps({"stages": {k: v["peak_rss_mb"] for k, v in s.stages.items()},
                  "lifetime": max_rss_mb()}))
"""


LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _stages(*stages: tuple[str, int], timer: bool = False) -> tuple[dict, str]:
    command = [sys.executable, "-c", LAUNCHER, sys.executable, "-c", STAGES, json.dumps(stages)]
    done = subprocess.run(["/usr/bin/time", "-v", *command] if timer else command,
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_a_stage_that_allocates_a_known_block_shows_it_in_its_own_peak():
    out, _ = _stages(("quiet_before", 0), ("big", BLOCK_MB), ("quiet_after", 0))
    before, big, after = (out["stages"][k] for k in ("quiet_before", "big", "quiet_after"))
    assert big - before == pytest.approx(BLOCK_MB, abs=40)
    # the stage after it reports its own peak, not the process's lifetime high-water mark ...
    assert after < big - BLOCK_MB / 2
    # ... which is left alone for outside tools: it still holds the big stage's peak
    assert out["lifetime"] == pytest.approx(big, abs=5)


@pytest.mark.slow
def test_a_stage_below_the_lifetime_peak_still_shows_its_own_block():
    # getrusage cannot see this stage (an earlier one set the lifetime peak): the sampler does
    out, _ = _stages(("bigger_first", BLOCK_MB + 200), ("quiet", 0), ("big", BLOCK_MB))
    quiet, big = out["stages"]["quiet"], out["stages"]["big"]
    assert big - quiet == pytest.approx(BLOCK_MB, abs=40)
    assert out["lifetime"] == pytest.approx(out["stages"]["bigger_first"], abs=5)


@pytest.mark.slow
def test_usr_bin_time_agrees_with_the_largest_stage_peak():
    if not Path("/usr/bin/time").exists():
        pytest.skip("/usr/bin/time is not installed")
    out, stderr = _stages(("big", BLOCK_MB), ("small", 50), timer=True)
    outside_mb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                               stderr).group(1)) / 1024
    largest = max(out["stages"].values())
    assert largest == pytest.approx(outside_mb, rel=0.10)
    assert out["stages"]["small"] < largest - BLOCK_MB / 2
