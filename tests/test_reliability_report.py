"""Reliability round 3 (issue 27), the report's part: intervals that never cross their estimate,
a report written whole or not at all, points that name their pool and model, killed runs listed
as failed, W&B told of a failure, and judge baseline ids that cannot collide."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, compact_tables, wandb_records
from lobass.evaluation.gsm8k import gsm8k_metrics
from lobass.evaluation.judge import find_baseline_generations
from lobass.jsonrows import DataError
from lobass.pipeline import run
from lobass.pool import read_pool
from lobass.report import collect_runs, write_report
from lobass.report.points import short_key
from lobass.signals import Terminated, sigterm_raises
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
    raised "'yerr' must not contain negative values"; no report.md was written. A summary
    written before the fix (bound 6.9e-18 kept in it) is drawn too."""
    sweep = tmp_path / "sweep"
    for name, scorer, correct in (("lobass", "lobass", 0), ("random", "random", 50)):
        # the eval stage's own metrics function, as lm-eval's row would give it
        row = {"exact_match,strict-match": correct / 50, "exact_match,flexible-extract": 0.0}
        _write_run(sweep, name, scorer=scorer, metrics=gsm8k_metrics(row, 50))
    # and a run written before the fix: its summary holds the old closed form's 6.9e-18
    _write_run(sweep, "old", scorer="rho", metrics={
        "eval/gsm8k/strict_acc": 0.0, "eval/gsm8k/strict_acc_ci_low": 6.938893903907228e-18,
        "eval/gsm8k/strict_acc_ci_high": 0.0713475991333588})
    text = compact_tables(write_report(sweep).read_text())
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
    with pytest.raises(DataError, match=r"scores.jsonl:2: invalid JSON"):  # jsonrows.read_jsonl
        write_report(sweep)
    assert {p.name for p in sweep.iterdir()} == before  # no PNG, no report.md, no staging folder
    scores.write_text(json.dumps({"id": "a", "n_tokens": 3, "score": 0.5}) + "\n")  # repaired
    write_report(sweep)
    assert {p.name for p in sweep.iterdir()} - before == {
        "report.md", "report.csv", "eval_heldout_loss.png", "scores_lobass.png"}


# High 6: a point killed by SIGTERM is recorded, and listed as failed


# Long enough to be stopped in the middle: a checkpoint every 2 of 40 reference steps.
KILLABLE = ["model=tiny_random", "logger=none", "data.max_rows=16", "data.mix.gsm8k.max_rows=4",
            "data.max_length=96", "selection.ratio=0.5", "stages=[train]",
            "reference.max_steps=40", "reference.save_steps=2", "train.max_steps=4"]


def _checkpoint_steps(artifacts: Path) -> list[int]:
    pattern = "finetune/*.partial/checkpoints/checkpoint-*/trainer_state.json"
    return [int(p.parent.name.split("-")[1]) for p in artifacts.glob(pattern)]


def _stop_at_checkpoint(command: list[str], artifacts: Path, log: Path, sig: int) -> int:
    """Start ``command``; send ``sig`` once a checkpoint newer than any at the start exists (the
    run is then mid-training); return the exit status."""
    after = max(_checkpoint_steps(artifacts), default=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while max(_checkpoint_steps(artifacts), default=0) <= after:
            assert proc.poll() is None, "ended before a checkpoint:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.02)
        proc.send_signal(sig)
        return proc.wait(timeout=300)


def _killable_command(tmp: Path, models_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), *KILLABLE, f"artifacts_dir={tmp / 'artifacts'}",
            f"models_dir={models_dir}", f"output_dir={tmp / 'sweep' / 'point'}",
            f"hydra.run.dir={tmp / 'hydra'}"]


@pytest.mark.slow
def test_a_point_stopped_by_sigterm_writes_error_txt_and_the_report_lists_it_failed(
        tmp_path, models_dir):
    """SLURM's time limit sends SIGTERM: before, the point left neither summary.json nor
    error.txt, and the report said "0 failed" and dropped it."""
    code = _stop_at_checkpoint(_killable_command(tmp_path, models_dir), tmp_path / "artifacts",
                               tmp_path / "log.txt", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, (tmp_path / "log.txt").read_text()[-3000:]
    point = tmp_path / "sweep" / "point"
    assert "SIGTERM received: the run was stopped from outside" in \
        (point / "error.txt").read_text().strip().splitlines()[-1]
    assert json.loads((point / "summary.json").read_text())["stages"]["reference"]["seconds"] > 0
    runs = collect_runs(tmp_path / "sweep")
    assert list(runs["status"]) == ["failed"]
    text = compact_tables(write_report(tmp_path / "sweep").read_text())
    assert "1 runs, 1 failed, 0 points." in text
    assert "failed: lobass.signals.Terminated: SIGTERM received" in text


@pytest.mark.slow
def test_ctrl_c_then_sigterm_in_one_run_dir_is_not_reported_ok(tmp_path, models_dir):
    """Ctrl-C leaves error.txt and a partial summary; the rerun removed error.txt and, killed by
    SIGTERM, left the first attempt's summary to be read as "ok"."""
    command = _killable_command(tmp_path, models_dir)
    assert _stop_at_checkpoint(command, tmp_path / "artifacts", tmp_path / "log1.txt",
                               signal.SIGINT) != 0
    point = tmp_path / "sweep" / "point"
    assert "KeyboardInterrupt" in (point / "error.txt").read_text()
    _stop_at_checkpoint(command, tmp_path / "artifacts", tmp_path / "log2.txt", signal.SIGTERM)
    (run,) = collect_runs(tmp_path / "sweep").itertuples()
    assert run.status == "failed" and "SIGTERM received" in run.error


def test_a_started_run_without_summary_is_listed_failed_never_dropped(tmp_path):
    """Only config.yaml (written first by every run): killed, or still running."""
    sweep = tmp_path / "sweep"
    _write_run(sweep, "done", metrics={"eval/heldout/loss": 1.5})
    started = sweep / "started"
    started.mkdir()
    (started / "config.yaml").write_text(yaml.safe_dump(
        {"stages": ["train", "eval"], "scorer": {"name": "lobass"}, "selection": {"ratio": 0.5},
         "seed": 1}))
    # W&B's own copy of the config, inside the finished run: not a run directory
    wandb_files = sweep / "done" / "wandb" / "offline-run-x" / "files"
    wandb_files.mkdir(parents=True)
    (wandb_files / "config.yaml").write_text(yaml.safe_dump(
        {"_wandb": {"value": {}}, "stages": {"value": ["eval"]}}))
    partial = _write_run(sweep, "partial", metrics={"eval/heldout/loss": 9.9}, point={})
    runs = collect_runs(sweep).set_index("run")
    assert dict(runs["status"]) == {"done": "ok", "partial": "failed", "started": "failed"}
    assert runs.loc["started", "error"] == "killed or still running: no summary.json"
    assert runs.loc["partial", "error"] == \
        "killed or still running: summary.json is partial (no point)"
    (partial / "summary.json").write_text('{"stages": {}, "metr')  # cut mid-write
    text = compact_tables(write_report(sweep).read_text())
    assert "3 runs, 2 failed, 1 points." in text
    assert "| started | lobass ratio 0.5 | 1 | failed: killed or still running: no summary.json |" \
        in text


def test_run_restores_the_previous_sigterm_handler_and_sigterm_raises_within(make_cfg):
    def ours(signum: int, frame: Any) -> None:
        raise AssertionError("not during the run")

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(ValueError, match="selection.ratio"):
            run(make_cfg("model=tiny_random", "logger=none", "selection.ratio=7"))
        assert signal.getsignal(signal.SIGTERM) is ours
        with pytest.raises(Terminated, match="SIGTERM received"), sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)


# Low: W&B recorded exit code 0 for a failed run


def test_a_failed_run_is_failed_in_wandb(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": \n')
    with pytest.raises(Exception, match="rows.jsonl:2"):
        run(make_cfg("model=tiny_random", "logger=wandb", "data=jsonl", f"data.path={rows}"))
    import wandb

    wandb.teardown()  # the service writes the run's file after finish() returns: wait for it
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit.exit_code for r in wandb_records(log) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]  # W&B's "failed" state; 0 reads "finished"


# High 5: runs on two pools, or two initial models, are never seeds of one point


@pytest.mark.slow
def test_runs_on_two_jsonl_pools_or_two_initial_models_are_not_pooled_as_seeds(make_cfg, tmp_path):
    """Two data=jsonl files (one data.name, "jsonl") and two tiny models (one model.name) were
    averaged as two seeds of one point: the point named neither its pool nor its model."""
    examples, _ = read_pool(make_cfg("data.max_rows=24").data)
    shipped = [json.dumps(e.raw) for e in examples if e.source == "alpaca"]  # 24 Alpaca rows
    files = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    files["a"].write_text("\n".join(shipped[:12]) + "\n")
    files["b"].write_text("\n".join(shipped[12:]) + "\n")
    select_only = ["model=tiny_random", "logger=none", "scorer=random", "stages=[select]",
                   "data=jsonl", "selection.ratio=0.5"]
    for name, file, seed, model_seed in (("pool_a", "a", 0, 0), ("pool_b", "b", 1, 0),
                                         ("model_1", "a", 1, 1)):
        run(make_cfg(*select_only, f"data.path={files[file]}", f"seed={seed}",
                     f"model.random_init.seed={model_seed}",
                     f"output_dir={tmp_path / 'sweep' / name}"))
    runs = collect_runs(tmp_path / "sweep").set_index("run")
    assert runs["point_key"].nunique() == 3  # three experiments, one seed each
    pool, model = runs["pool"], runs["model"]
    assert model["pool_a"] == model["pool_b"] != model["model_1"]
    assert pool["pool_a"] == pool["model_1"] != pool["pool_b"]
    text = compact_tables(write_report(tmp_path / "sweep").read_text())
    assert "3 runs, 0 failed, 3 points." in text
    assert "Points differ in `pool` (the pool: every row as read" in text
    assert "Points differ in `model` (the initial model: its files' content" in text
    points = text.split("## Points")[1].split("\n## ")[0]
    pooled = [line.split(" | ") for line in points.splitlines()
              if line.startswith("| random ratio 0.5 · ")]
    assert sorted(cells[0].split(" · ", 1)[1] for cells in pooled) == sorted(
        f"model {short_key(model)} · pool {short_key(pool)}"
        for pool, model in zip(runs["pool"], runs["model"], strict=True))
    assert [cells[2] for cells in pooled] == ["1", "1", "1"]  # seeds


# Low: judge baseline ids 1 and "1" collapsed into one answer


def test_baseline_ids_1_and_text_1_are_refused_not_collapsed(tmp_path):
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text(json.dumps({"id": 1, "output": "first"}) + "\n"
                        + json.dumps({"id": 2, "output": "second"}) + "\n"
                        + json.dumps({"id": "1", "output": "another first"}) + "\n")
    with pytest.raises(ValueError, match=r"baseline\.jsonl:3: id '1' is the id of line 1 \(1\) "
                                         "as text; ids must be distinct"):
        find_baseline_generations(baseline, "vicuna")
    baseline.write_text(json.dumps({"id": 1, "output": "first"}) + "\n")  # numbers alone: fine
    assert find_baseline_generations(baseline, "vicuna") == {"1": {"id": 1, "output": "first"}}
