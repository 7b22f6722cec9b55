"""What a run leaves in ``summary.json``: stage timings, reuse and peak memory, paths, metrics.

The pipeline records every stage through :meth:`Summary.stage`; ``format_summary`` is the table
printed at the end of a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lobass.context import StageResult
from lobass.peak_memory import StagePeak
from lobass.provenance import provenance
from lobass.tracking import RunLogger, log_run_outputs

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What ``summary.json`` holds: stage timings and reuse, artifact paths, flat metrics."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    point: dict[str, Any] = field(default_factory=dict)  # what makes the run a point of a study
    # the git commit (and dirty flag) and package versions that made these numbers
    provenance: dict[str, Any] = field(default_factory=provenance)

    def stage(self, name: str, call: Callable[[], StageResult]) -> StageResult:
        """Run one stage, timing it and keeping its reuse flag, metrics and artifact paths."""
        with self._timed(name) as record:
            result = call()
            record["reused"] = result.reused
        self.metrics.update(result.metrics)
        self.artifacts.update(result.artifacts)
        return result

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"seconds": 0.0, "reused": False}
        start = time.perf_counter()
        try:
            with StagePeak() as peak:
                yield record
        finally:  # a failed stage keeps its time in the partial summary
            record["seconds"] = round(time.perf_counter() - start, 3)
            record["peak_rss_mb"] = peak.mb
            self.stages[name] = record
            log.info("stage %s: %.1f s%s", name, record["seconds"],
                     " (reused)" if record["reused"] else "")

    def as_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {"stages": self.stages, "artifacts": self.artifacts, "metrics": self.metrics,
                "point": self.point, "provenance": self.provenance}


def format_summary(summary: Summary) -> str:
    """A short plain-text table of stage timings and metrics for the end of a run."""
    lines = [f"{'stage':<12}{'seconds':>10}  reused"]
    lines += [f"{name:<12}{rec['seconds']:>10.1f}  {'yes' if rec['reused'] else 'no'}"
              for name, rec in summary.stages.items()]
    shown = [k for k in summary.metrics if k.startswith(("eval/", "train/", "select/", "score/"))
             and not k.endswith(("_stderr", "ci_low", "ci_high"))]
    lines.append(f"\n{'metric':<32}{'value':>12}")
    lines += [f"{k:<32}{summary.metrics[k]:>12.4f}" for k in shown]
    return "\n".join(lines)


def publish(summary: Summary, tracker: RunLogger) -> None:
    """Add the stage times to the metrics and send the point, metrics, stages and outputs."""
    tracker.log_table("summary/point", ["key", "value"],
                      [[k, json.dumps(v)] for k, v in summary.point.items()])
    summary.metrics.update({f"time/{k}_seconds": v["seconds"] for k, v in summary.stages.items()})
    tracker.log_metrics(summary.metrics)
    tracker.log_table("summary/stages", ["stage", "seconds", "reused"],
                      [[k, v["seconds"], v["reused"]] for k, v in summary.stages.items()])
    log_run_outputs(tracker, summary.artifacts)  # adapters, scores, answers
