"""Reliability round 3 (issue 27), the report's part: intervals that never cross their estimate,
a report written whole or not at all, points that name their pool and model, killed runs listed
as failed, W&B told of a failure, and judge baseline ids that cannot collide."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lobass.evaluation.gsm8k import gsm8k_metrics
from lobass.report import write_report
from lobass.stats import wilson_interval


def _write_run(root: Path, name: str, *, scorer: str = "random", ratio: float = 0.25,
               seed: int = 0, metrics: dict[str, float], point: dict[str, Any] | None = None,
               artifacts: dict[str, str] | None = None) -> Path:
    """A finished run directory as the pipeline leaves it: config.yaml and summary.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"scorer": {"name": scorer}, "selection": {"ratio": ratio}, "seed": seed}))
    summary: dict[str, Any] = {"stages": {}, "artifacts": artifacts or {},
                               "metrics": {"select/count": 100 * ratio, **metrics}}
    if point is not None:
        summary["point"] = point
    (run / "summary.json").write_text(json.dumps(summary))
    return run


# High 7: Wilson bounds at 0 of n and n of n


def test_wilson_bounds_never_cross_the_proportion_at_0_and_n_of_n():
    """The closed form left 6.9e-18 at 0 of 50 (and 1 - 1e-16 at some n of n)."""
    for n in range(1, 301):
        low, high = wilson_interval(0, n)
        assert low == 0.0 and 0.0 < high < 1.0, n
        low, high = wilson_interval(n, n)
        assert 0.0 < low < 1.0 and high == 1.0, n
        for k in (1, n // 3, n - 1, 0.5):  # and fractional counts (means over repeats)
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n)
    # textbook values: z^2 / (n + z^2) at 0 of 50; 5 of 10 is [0.2366, 0.7634]
    assert wilson_interval(0, 50)[1] == pytest.approx(3.8415 / (50 + 3.8415), rel=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_report_of_a_run_with_gsm8k_0_of_50_is_written(tmp_path):
    """The default run's GSM8K: 0 of 50. The plot's error bar went negative and matplotlib
    raised "'yerr' must not contain negative values"; no report.md was written."""
    sweep = tmp_path / "sweep"
    for name, scorer, correct in (("lobass", "lobass", 0), ("random", "random", 50)):
        # the eval stage's own metrics function, as lm-eval's row would give it
        row = {"exact_match,strict-match": correct / 50, "exact_match,flexible-extract": 0.0}
        _write_run(sweep, name, scorer=scorer, metrics=gsm8k_metrics(row, 50))
    text = write_report(sweep).read_text()
    assert "![eval_gsm8k_strict_acc.png](eval_gsm8k_strict_acc.png)" in text
    assert (sweep / "eval_gsm8k_strict_acc.png").stat().st_size > 1000
    line = next(x for x in text.splitlines() if x.startswith("| lobass ratio 0.25 |"))
    assert "| 0 | [0, 0.07135] |" in line  # 0 of 50: [0, z^2 / (50 + z^2)]


# Finding 4: the report is written whole or not at all


def test_a_failing_plot_leaves_no_report_files(tmp_path):
    """A torn scores file fails the score plots after the metric plots were drawn: before, the
    metric PNGs stayed behind without a report.md."""
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps({"id": "a", "n_tokens": 3, "score": 0.5}) + "\n"
                      + '{"id": "b", "n_tok')  # killed mid-write
    sweep = tmp_path / "sweep"
    for name, scorer, loss in (("lobass", "lobass", 1.5), ("random", "random", 1.7)):
        _write_run(sweep, name, scorer=scorer, metrics={"eval/heldout/loss": loss},
                   artifacts={"scores": str(scores)})
    before = {p.name for p in sweep.iterdir()}
    with pytest.raises(json.JSONDecodeError):
        write_report(sweep)
    assert {p.name for p in sweep.iterdir()} == before  # no PNG, no report.md, no staging folder
    scores.write_text(json.dumps({"id": "a", "n_tokens": 3, "score": 0.5}) + "\n")  # repaired
    write_report(sweep)
    assert {p.name for p in sweep.iterdir()} - before == {
        "report.md", "report.csv", "eval_heldout_loss.png", "scores_lobass.png"}
