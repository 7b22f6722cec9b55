"""Each stage's peak resident memory, without resetting the process's high-water mark.

Resetting the kernel's mark (``/proc/self/clear_refs``) would make every stage's figure its own,
but it also makes outside tools lie: ``/usr/bin/time -v`` and a cluster's accounting then report
the last stage's peak instead of the run's. So the mark is left alone and each stage's peak is
measured two ways, keeping the better:

* ``getrusage``'s ``ru_maxrss`` is exact, but only for the process's whole life: when it grew
  during the stage, the stage made the new peak and that figure is its peak, exactly.
* otherwise a thread samples ``psutil``'s RSS every ``interval`` seconds during the stage: a
  lower bound that can miss a spike shorter than the interval. That stage was not the run's
  largest, so the run's peak (the figure people size machines by) is still exact.
"""

from __future__ import annotations

import resource
import sys
import threading
from types import TracebackType

import psutil

_MIB = 1024 * 1024


def max_rss_mb() -> float:
    """The process's lifetime peak resident memory in MiB (what ``/usr/bin/time`` reports)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB


class StagePeak:
    """``with StagePeak() as peak: ...`` then ``peak.mb``: the block's peak resident MiB."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.mb: float | None = None
        self._process = psutil.Process()
        self._sampled = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="lobass-peak-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            self._sampled = max(self._sampled, self._process.memory_info().rss)
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> StagePeak:
        self._lifetime_before = max_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()
        lifetime = max_rss_mb()
        sampled = self._sampled / _MIB
        # a new lifetime peak was set inside the block: that figure is exact
        self.mb = round(lifetime if lifetime > self._lifetime_before else sampled, 1)
