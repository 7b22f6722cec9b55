import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from conftest import ROOT, TINY
from lobass.report import collect_runs, paired_difference, pool_over_seeds, write_report
from lobass.stats import bootstrap_interval, rank_correlation

# A fixed sweep: lobass and random at two ratios, random over three seeds, one full-data run and
# one failed point. Held-out losses chosen so the pooled means are easy to check by hand.
RUNS = [
    ("lobass", 0.06, 0, 1.50), ("lobass", 0.5, 0, 1.40),
    ("random", 0.06, 0, 1.70), ("random", 0.06, 1, 1.80), ("random", 0.06, 2, 1.90),
    ("random", 0.5, 0, 1.45), ("lobass", 1.0, 0, 1.42),
]


def _write_runs(root: Path, scores_file: Path) -> None:
    for i, (scorer, ratio, seed, loss) in enumerate(RUNS):
        run = root / str(i)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"scorer": {"name": scorer}, "selection": {"ratio": ratio}, "seed": seed}))
        summary = {"stages": {}, "artifacts": {"scores": str(scores_file)},
                   "metrics": {"eval/heldout/loss": loss, "select/count": ratio * 100,
                               "eval/heldout/loss_ci_low": loss - 0.1,
                               "eval/heldout/loss_ci_high": loss + 0.1,
                               "eval/heldout/n": 100.0, "eval/vicuna/win_rate": 2.0 - loss}}
        (run / "summary.json").write_text(json.dumps(summary))
    failed = root / "7"
    failed.mkdir()
    (failed / "config.yaml").write_text(yaml.safe_dump(
        {"scorer": {"name": "rho"}, "selection": {"ratio": 0.06}, "seed": 0}))
    (failed / "error.txt").write_text("Traceback...\nValueError: out of memory in train\n")


def test_report_on_fixed_summaries(tmp_path):
    scores = tmp_path / "scores.jsonl"
    rng = np.random.default_rng(0)
    scores.write_text("".join(json.dumps({"id": str(i), "n_tokens": 10 + i, "n_response_tokens": i,
                                          "score": float(i + 15 * rng.normal())}) + "\n"
                              for i in range(50)))
    _write_runs(tmp_path / "sweep", scores)
    report = write_report(tmp_path / "sweep")
    text = report.read_text()
    rows = list(csv.DictReader((tmp_path / "sweep" / "report.csv").open()))
    assert len(rows) == 8 and sum(r["status"] == "failed" for r in rows) == 1
    assert "failed: ValueError: out of memory in train" in text
    # random at 6%: three seeds pooled to their mean, 1.8
    line = next(x for x in text.splitlines() if x.startswith("| random | 0.06 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "3" and float(cells[4]) == pytest.approx(1.8)
    low, high = (float(v) for v in cells[5].strip("[]").split(","))
    assert 1.7 <= low < 1.8 < high <= 1.9
    for png in ("eval_heldout_loss.png", "scores.png"):
        assert (tmp_path / "sweep" / png).stat().st_size > 1000
    # columns: the eval metrics (losses first, then win rates), never their counts or intervals
    header = next(x for x in text.splitlines() if x.startswith("| scorer | ratio | rows |"))
    assert "eval/heldout/loss ↓" in header and "eval/vicuna/win_rate ↑" in header
    assert header.index("heldout/loss") < header.index("win_rate") and "heldout/n" not in header
    # verdicts against random at the same ratio and against full data (lobass at 1.0: 1.42)
    compared = [c for c in ([c.strip() for c in x.strip("|").split("|")]
                            for x in text.splitlines() if x.startswith("| lobass | 0."))
                if c[2].startswith("eval/")]
    verdicts = {(c[0], c[1], c[2], c[4]): c[7] for c in compared}
    assert len(compared) == 8 and all(c[6] == "" for c in compared)  # no per-row losses kept
    assert verdicts[("lobass", "0.06", "eval/heldout/loss", "random (3 seeds)")] == \
        "better, separated"  # 1.50 [1.4, 1.6] against 1.8 within [1.7, 1.9]
    assert verdicts[("lobass", "0.06", "eval/heldout/loss", "full data")] == "worse, overlap"
    assert verdicts[("lobass", "0.5", "eval/vicuna/win_rate", "random (1 seed)")] == \
        "better, no interval"  # 0.60 against 0.55, one run each without an interval
    records = [json.loads(x) for x in scores.read_text().splitlines()]
    expected = spearmanr([r["score"] for r in records], [r["n_response_tokens"] for r in records])
    assert f"Spearman correlation of score with response length: lobass {expected[0]:.2f}" in text




def _eval_dir_with_row_losses(root: Path, name: str, losses: dict[str, float]) -> Path:
    eval_dir = root / "artifacts" / name
    (eval_dir / "losses").mkdir(parents=True)
    (eval_dir / "losses" / "heldout.jsonl").write_text("".join(
        json.dumps({"id": i, "loss": v}) + "\n" for i, v in losses.items()))
    return eval_dir


def test_paired_difference_over_rows_against_a_hand_computation(tmp_path):
    # Three rows scored by every run (a fourth only by ours); ours is lower on every row by a
    # little, while the rows themselves differ a lot: independent intervals overlap, paired not.
    rows = [("lobass", 0.06, 0, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 9.0}),
            ("random", 0.06, 0, {"a": 1.1, "b": 2.1, "c": 3.2}),
            ("random", 0.06, 1, {"a": 1.1, "b": 2.3, "c": 3.2})]
    sweep = tmp_path / "sweep"
    for i, (scorer, ratio, seed, losses) in enumerate(rows):
        run = sweep / str(i)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"scorer": {"name": scorer}, "selection": {"ratio": ratio}, "seed": seed}))
        eval_dir = _eval_dir_with_row_losses(tmp_path, str(i), losses)
        shared = [losses[k] for k in "abc"]
        mean = float(np.mean(list(losses.values())))
        (run / "summary.json").write_text(json.dumps({
            "stages": {}, "artifacts": {"eval": str(eval_dir)},
            "metrics": {"eval/heldout/loss": mean, "eval/heldout/loss_ci_low": min(shared),
                        "eval/heldout/loss_ci_high": max(shared) + 5}}))
    runs = collect_runs(sweep)
    ours = runs[runs["scorer"] == "lobass"]
    base = runs[runs["scorer"] == "random"]
    mean, low, high, n = paired_difference(ours, base, "eval/heldout/loss")
    # random per row: a 1.1, b 2.2, c 3.2 (mean over seeds); differences -0.1, -0.2, -0.2
    assert n == 3 and mean == pytest.approx(-0.5 / 3)
    assert -0.2 - 1e-9 <= low <= mean <= high <= -0.1 + 1e-9
    assert paired_difference(ours, base, "eval/gsm8k/strict_acc") is None  # not a loss
    text = write_report(sweep).read_text()
    line = next(x for x in text.splitlines() if x.startswith("| lobass | 0.06 | eval/heldout"))
    assert "(n 3)" in line and line.rstrip().endswith("| better, separated (paired) |")


def test_report_goes_to_wandb_offline_with_the_pooled_table_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": str(i), "n_tokens": 10 + i,
                                          "n_response_tokens": i, "score": float(i % 7)}) + "\n"
                              for i in range(20)))
    _write_runs(tmp_path / "sweep", scores)
    write_report(tmp_path / "sweep", out=tmp_path / "out", wandb_project="lobass-test")
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    (pooled_file,) = (media / "table" / "report").glob("by_scorer_ratio_*.table.json")
    pooled = json.loads(pooled_file.read_text())
    column = pooled["columns"].index("eval/heldout/loss")
    by_key = {(r[0], r[1]): r for r in pooled["data"]}
    assert by_key[("random", 0.06)][3] == 3  # seeds
    assert by_key[("random", 0.06)][column] == pytest.approx(1.8)
    (runs_file,) = (media / "table" / "report").glob("runs_*.table.json")
    assert len(json.loads(runs_file.read_text())["data"]) == 8  # seven runs and the failed one
    assert len(list((media / "images" / "report").glob("eval_heldout_loss.png*"))) == 1


def test_rank_correlation_and_bootstrap_against_hand_values():
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == \
        pytest.approx(1)
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == \
        pytest.approx(-1)
    # ties get average ranks: x ranks [0.5, 0.5, 2, 3] against y ranks [0, 1, 2, 3]
    assert rank_correlation(np.array([1, 1, 2, 3.0]), np.array([1, 2, 3, 4.0])) == pytest.approx(
        np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1])
    # pairs with a NaN on either side are left out; under three pairs there is no rho
    assert rank_correlation(np.array([1, np.nan, 2, 3, 4.0]),
                            np.array([1, 5, 2, 3, np.nan])) == pytest.approx(1)
    assert math.isnan(rank_correlation(np.array([1, 2, np.nan]), np.array([1, 2, 3.0])))
    low, high = bootstrap_interval([1.0, 2.0, 3.0, 4.0])
    assert 1.0 <= low < 2.5 < high <= 4.0
    assert (low, high) == bootstrap_interval([1.0, 2.0, 3.0, 4.0])  # seeded: reproducible


def test_pooling_uses_a_bootstrap_over_seeds_and_one_runs_own_interval(tmp_path):
    _write_runs(tmp_path / "sweep", tmp_path / "no_scores.jsonl")
    runs = collect_runs(tmp_path / "sweep")
    assert list(runs["run"]) == [str(i) for i in range(8)]
    assert list(runs["status"]) == ["ok"] * 7 + ["failed"]
    assert math.isnan(runs.loc[7, "eval/heldout/loss"])  # the failed point has no metrics
    table = pool_over_seeds(runs, ["eval/heldout/loss", "eval/vicuna/win_rate"])
    assert list(zip(table["scorer"], table["ratio"], table["seeds"], strict=True)) == [
        ("lobass", 0.06, 1), ("random", 0.06, 3), ("lobass", 0.5, 1), ("random", 0.5, 1),
        ("lobass", 1.0, 1)]  # the failed rho point is not pooled
    by_point = table.set_index(["scorer", "ratio"])
    random = by_point.loc[("random", 0.06)]
    assert random["eval/heldout/loss"] == pytest.approx(1.8)
    assert (random["eval/heldout/loss_ci_low"], random["eval/heldout/loss_ci_high"]) == \
        bootstrap_interval([1.7, 1.8, 1.9])
    lobass = by_point.loc[("lobass", 0.06)]  # one run: its own interval from summary.json
    assert (lobass["eval/heldout/loss_ci_low"], lobass["eval/heldout/loss_ci_high"]) == \
        pytest.approx((1.4, 1.6))
    assert math.isnan(lobass["eval/vicuna/win_rate_ci_low"])  # the run kept no interval
    assert lobass["rows"] == pytest.approx(6)


@pytest.mark.slow
def test_two_by_two_sweep_on_tiny_model_builds_one_reference_and_one_scoring_pass(tmp_path,
                                                                                   models_dir):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, f"models_dir={models_dir}",
           f"artifacts_dir={tmp_path / 'artifacts'}", "selection.ratio=0.25,0.5",
           "scorer=lobass,rho", "stages=[select]", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    artifacts = tmp_path / "artifacts"

    def built(stage):
        return [p for p in (artifacts / stage).iterdir() if p.is_dir()]

    assert len(built("finetune")) == 1  # the reference: stages=[select] trains nothing else
    assert len(built("losses")) == 2  # L_init and L_ref, each once for all four points
    assert len(built("scores")) == 2  # one per scorer
    assert len(built("selection")) == 4
    runs = collect_runs(sweep)
    assert sorted(zip(runs["scorer"], runs["ratio"], strict=True)) == [
        ("lobass", 0.25), ("lobass", 0.5), ("rho", 0.25), ("rho", 0.5)]
    reused = [json.loads((path / "summary.json").read_text())["stages"] for path in runs["path"]]
    assert sum(not s["reference"]["reused"] for s in reused) == 1
    assert sum(s["score"]["reused"] for s in reused) == 2  # the second point of each scorer
    write_report(sweep)
    assert (sweep / "report.md").is_file()


@pytest.mark.slow
def test_a_failed_sweep_point_is_recorded_and_the_other_points_still_run(tmp_path, models_dir):
    # scorer=length needs no model forward: the first point fails (ratio 1.5 is out of range),
    # the second must still run, and the report must show one failure and one finished point
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *TINY, f"models_dir={models_dir}",
           f"artifacts_dir={tmp_path / 'artifacts'}", "scorer=length", "stages=[select]",
           "selection.ratio=1.5,0.5", f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=r${selection.ratio}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0  # Hydra reports the failure once every point has run
    error = (sweep / "r1.5" / "error.txt").read_text()
    assert "selection.ratio must be in (0, 1], got 1.5" in error
    finished = json.loads((sweep / "r0.5" / "summary.json").read_text())
    assert finished["metrics"]["select/count"] == 16  # half of the 24 + 8 pool rows
    assert not (sweep / "r0.5" / "error.txt").exists()
    write_report(sweep)
    rows = {r["run"]: (r["ratio"], r["status"])
            for r in csv.DictReader((sweep / "report.csv").open())}
    assert rows == {"r1.5": ("1.5", "failed"), "r0.5": ("0.5", "ok")}


# A fixed sweep shaped like a real one (summary.json + config.yaml + eval per-row losses +
# error.txt), written by code so the golden report can be rebuilt from it. report.md and report.csv
# under tests/data/report_golden/ were rendered from these inputs by the single-file report.py
# (before the split into lobass/report/): the same inputs must keep giving the same report.
GOLDEN = Path(__file__).parent / "data" / "report_golden"
HELDOUT_IDS = [f"h{i:02d}" for i in range(24)]
MT_IDS = [f"m{i}" for i in range(10)]
# (run dir, scorer, selection, seed, loss offset, win rate, gsm8k correct of 20, per-row losses?)
SWEEP = [
    ("lobass_r0.06_s0", "lobass", {"ratio": 0.06}, 0, -0.05, 0.55, 2, True),
    ("random_r0.06_s0", "random", {"ratio": 0.06}, 0, 0.00, 0.50, 1, True),
    ("random_r0.06_s1", "random", {"ratio": 0.06}, 1, 0.02, 0.4375, 0, True),
    ("random_r0.06_s2", "random", {"ratio": 0.06}, 2, -0.01, 0.5, 1, True),
    ("rho_r0.06_s0", "rho", {"ratio": 0.06}, 0, -0.02, 0.625, 0, False),
    ("lobass_r0.5_s0", "lobass", {"ratio": 0.5}, 0, -0.20, 0.5625, 3, True),
    ("random_r0.5_s0", "random", {"ratio": 0.5}, 0, -0.18, 0.5, 2, True),
    ("random_r0.5_s1", "random", {"ratio": 0.5}, 1, -0.17, 0.375, 2, False),
    ("lobass_r1.0_s0", "lobass", {"ratio": 1.0}, 0, -0.30, None, 4, True),
    ("rho_r1.0_s0", "rho", {"ratio": 1.0}, 0, -0.30, None, 4, True),
    ("lobass_c800_s0", "lobass", {"ratio": None, "count": 800}, 0, -0.25, 0.6, 3, False),
]


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_fixed_sweep(root: Path) -> Path:
    """Write the fixed sweep under ``root / "sweep"`` (eval artifacts beside it); return it."""
    sweep = root / "sweep"
    rng = np.random.default_rng(12)
    base_heldout = rng.uniform(1.5, 3.0, len(HELDOUT_IDS))
    base_mt = rng.uniform(0.6, 1.4, len(MT_IDS))
    for i, (name, scorer, selection, seed, offset, win, correct, keep_rows) in enumerate(SWEEP):
        run = sweep / name
        run.mkdir(parents=True)
        config = {"scorer": {"name": scorer}, "selection": selection, "seed": seed}
        if name == "random_r0.5_s1":  # Hydra's own copy is read when config.yaml is absent
            (run / ".hydra").mkdir()
            (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        else:
            (run / "config.yaml").write_text(yaml.safe_dump(config))
        run_rng = np.random.default_rng(100 + i)
        heldout = base_heldout + offset + run_rng.normal(0, 0.03, len(HELDOUT_IDS))
        mt = base_mt + offset / 2 + run_rng.normal(0, 0.02, len(MT_IDS))
        mt_ids = MT_IDS if scorer != "rho" else MT_IDS[:8]  # the full-data twin scored fewer
        mt = mt[: len(mt_ids)]
        metrics: dict[str, float] = {
            "select/count": 800.0 if selection["ratio"] is None else 1000 * selection["ratio"],
            "train/loss": 1.2 + offset}
        for set_name, values in (("heldout", heldout), ("mt_bench_ref", mt)):
            half = 1.959963984540054 * values.std(ddof=1) / math.sqrt(len(values))
            metrics |= {f"eval/{set_name}/loss": float(values.mean()),
                        f"eval/{set_name}/loss_ci_low": float(values.mean() - half),
                        f"eval/{set_name}/loss_ci_high": float(values.mean() + half),
                        f"eval/{set_name}/n": float(len(values))}
        if win is not None:
            metrics |= {"eval/vicuna/win_rate": win, "eval/vicuna/win_rate_ci_low": win - 0.3,
                        "eval/vicuna/win_rate_ci_high": min(1.0, win + 0.3)}
        low, high = _wilson(correct, 20)
        metrics |= {"eval/gsm8k/strict_acc": correct / 20, "eval/gsm8k/strict_acc_ci_low": low,
                    "eval/gsm8k/strict_acc_ci_high": high}
        artifacts = {"scores": str(root / f"scores_{scorer}.jsonl")}
        if keep_rows:
            eval_dir = root / "artifacts" / "eval" / name
            (eval_dir / "losses").mkdir(parents=True)
            for set_name, ids, values in (("heldout", HELDOUT_IDS, heldout),
                                          ("mt_bench_ref", mt_ids, mt)):
                (eval_dir / "losses" / f"{set_name}.jsonl").write_text("".join(
                    json.dumps({"id": k, "loss": float(v)}) + "\n"
                    for k, v in zip(ids, values, strict=True)))
            artifacts["eval"] = str(eval_dir)
        (run / "summary.json").write_text(json.dumps(
            {"stages": {}, "artifacts": artifacts, "metrics": metrics}))
    failed = sweep / "rho_r0.5_s0"
    failed.mkdir()
    (failed / "config.yaml").write_text(yaml.safe_dump(
        {"scorer": {"name": "rho"}, "selection": {"ratio": 0.5}, "seed": 0}))
    (failed / "error.txt").write_text("Traceback (most recent call last):\n  ...\n"
                                      "RuntimeError: CUDA out of memory while training\n")
    for scorer in ("lobass", "rho", "random"):  # ties in length; a few rows without a score
        score_rng = np.random.default_rng(len(scorer))
        (root / f"scores_{scorer}.jsonl").write_text("".join(json.dumps({
            "id": str(k), "n_tokens": 20 + k % 13, "n_response_tokens": k % 13,
            "score": None if k % 17 == 5 else float(-0.1 * (k % 13) + score_rng.normal())})
            + "\n" for k in range(60)))
    return sweep


def test_report_of_a_fixed_sweep_matches_the_golden_files(tmp_path):
    # Through the command line, as a user runs it: `python -m lobass.report DIR --out OUT`.
    sweep = write_fixed_sweep(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "lobass.report", str(sweep), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    if os.environ.get("LOBASS_WRITE_GOLDEN") == "1":  # only to record an intended change
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.csv"):
            (GOLDEN / name).write_text((out / name).read_text())
    for name in ("report.md", "report.csv"):
        assert (out / name).read_text() == (GOLDEN / name).read_text(), name
    csv_lines = (out / "report.csv").read_bytes().splitlines(keepends=True)
    assert len(csv_lines) == 13 and all(x.endswith(b"\r\n") for x in csv_lines)  # csv module's
    for png in ("eval_heldout_loss.png", "eval_vicuna_win_rate.png", "scores.png"):
        assert (out / png).stat().st_size > 1000
    assert not (sweep / "report.md").exists()  # --out is honoured
