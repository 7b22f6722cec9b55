"""The eval stage through ``run(cfg)``: a full-data baseline run, then a 25% run judged against it
with ``judge=local_hf`` (the run's initial model as judge), on the tiny random model."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY
from lobass.evaluation.judge import combine_orders
from lobass.pipeline import run

SMALL_EVAL = ["eval.generation.max_new_tokens=6", "eval.generation.sets.vicuna.max_rows=3",
              "eval.reference_loss.mt_bench_math_reasoning_coding_ref.max_rows=4",
              "eval.reference_loss.alpaca_eval_gpt4_turbo.max_rows=5", "eval.ifeval.limit=2"]


@pytest.mark.slow  # ~60-80 s here: three tiny runs
def test_eval_stage_generates_then_judges_against_a_baseline_run(make_cfg, tmp_path):
    base = run(make_cfg(*TINY, *SMALL_EVAL, "selection.ratio=1.0"))
    m = base["metrics"]
    assert m["eval/vicuna/generated"] == 3 and 0 <= m["eval/vicuna/truncated_share"] <= 1
    assert m["eval/mt_bench_math_reasoning_coding_ref/n"] == 4
    assert m["eval/vicuna_coding_math_ref/n"] == 10 and m["eval/alpaca_eval_gpt4_turbo/n"] == 5
    assert (m["eval/mt_bench_math_reasoning_coding_ref/loss_ci_low"]
            <= m["eval/mt_bench_math_reasoning_coding_ref/loss"])
    assert m["eval/gsm8k/n"] == 2 and m["eval/gsm8k/strict_acc_ci_high"] > 0
    assert "eval/vicuna/win_rate" not in m  # no baseline: answers saved, nothing judged
    eval_dir = Path(base["artifacts"]["eval"])
    # per-row losses kept for paired comparisons: their mean is the reported loss
    for name, n in (("heldout", m["eval/heldout/n"]), ("mt_bench_math_reasoning_coding_ref", 4),
                    ("vicuna_coding_math_ref", 10), ("alpaca_eval_gpt4_turbo", 5)):
        per_row = [json.loads(x) for x in (eval_dir / "losses" / f"{name}.jsonl").read_text()
                   .splitlines()]
        finite = [r["loss"] for r in per_row if r["loss"] is not None]
        assert len(finite) == n and len({r["id"] for r in per_row}) == len(per_row)
        assert sum(finite) / n == pytest.approx(m[f"eval/{name}/loss"], rel=1e-6)
    skipped = json.loads((eval_dir / "skipped.json").read_text())
    # IFEval runs offline on a plain install (its NLTK data ships): no skip, its metrics present
    assert "ifeval" not in skipped and "eval/ifeval/skipped" not in m
    assert m["eval/ifeval/n"] == 2 and 0 <= m["eval/ifeval/prompt_level_strict_acc"] <= 1
    generations = json.loads((eval_dir / "generations.json").read_text())
    rows = {r["id"]: r for r in map(json.loads,
                                    Path(generations["vicuna"]).read_text().splitlines())}
    assert list(rows) == ["1", "2", "3"]
    baseline_run = tmp_path / "baseline_run"
    baseline_run.mkdir()
    shutil.copy(tmp_path / "run" / "summary.json", baseline_run / "summary.json")

    judged = run(make_cfg(*TINY, *SMALL_EVAL, f"eval.judge.baseline={baseline_run}"))
    m = judged["metrics"]
    assert m["eval/vicuna/n"] == 3 and m["eval/vicuna/win"] + m["eval/vicuna/tie"] + \
        m["eval/vicuna/lose"] == 3
    assert m["eval/vicuna/win_rate_ci_low"] <= m["eval/vicuna/win_rate"] <= \
        m["eval/vicuna/win_rate_ci_high"]
    records = [json.loads(x) for x in
               (Path(judged["artifacts"]["eval"]) / "judge" / "vicuna.jsonl").read_text()
               .splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3"]
    assert all(r["baseline"] == rows[r["id"]]["output"] for r in records)
    # the answer-length set (judge: false) is answered, never judged
    assert m["eval/alpaca_eval/generated"] == 2 and "eval/alpaca_eval/win_rate" not in m
    assert not (Path(judged["artifacts"]["eval"]) / "judge" / "alpaca_eval.jsonl").exists()
    for record in records:  # raw log-probabilities of both orders are kept
        assert set(record["ours_first"]["logprobs"]) == {"A", "B", "tie"}
        assert record["outcome"] == combine_orders(record["ours_first"], record["baseline_first"])
        assert record["judge"] == "local_hf" and record["prompt_file"] == "pairwise_v2.txt"

    # Only the judge changes: the answers are reused, the verdicts recomputed.
    again = run(make_cfg(*TINY, *SMALL_EVAL, f"eval.judge.baseline={baseline_run}",
                         "eval.judge.tie_margin=1000"))
    assert not again["stages"]["eval"]["reused"]
    assert again["metrics"]["eval/vicuna/tie"] == 3
    answers = [p for p in (tmp_path / "artifacts" / "generations").iterdir()
               if p.is_dir() and not p.name.endswith(".partial")]
    assert len(answers) == 4  # vicuna and alpaca_eval, the baseline's and ours, each once


@pytest.mark.slow  # ~60 s here
def test_full_data_baseline_is_trained_and_evaluated_once_and_judges_the_sweep(make_cfg,
                                                                                tmp_path):
    args = [*TINY, *SMALL_EVAL, "eval.gsm8k.enabled=false", "eval.judge.baseline=full_data"]
    small = run(make_cfg(*args, "selection.ratio=0.25"))
    assert not small["stages"]["baseline"]["reused"]
    assert small["metrics"]["eval/vicuna/n"] == 3  # judged against the full-data model's answers
    baseline_eval = Path(small["artifacts"]["baseline_eval"])
    baseline_generations = json.loads((baseline_eval / "generations.json").read_text())
    records = [json.loads(x) for x in
               (Path(small["artifacts"]["eval"]) / "judge" / "vicuna.jsonl").read_text()
               .splitlines()]
    full_answers = {r["id"]: r["output"] for r in map(
        json.loads, Path(baseline_generations["vicuna"]).read_text().splitlines())}
    assert all(r["baseline"] == full_answers[r["id"]] for r in records)
    trained = [p for p in (tmp_path / "artifacts" / "finetune").iterdir() if p.is_dir()]
    assert len(trained) == 3  # the reference (its own recipe), the 25% selection, the full pool

    # The full-data point of the sweep *is* the baseline: no judge, and its evaluation is the
    # very artifact the other points were judged against.
    full = run(make_cfg(*args, "selection.ratio=1.0"))
    assert full["stages"]["train"]["reused"] and full["stages"]["eval"]["reused"]
    assert full["artifacts"]["eval"] == str(baseline_eval)
    assert "eval/vicuna/win_rate" not in full["metrics"]
    assert len([p for p in (tmp_path / "artifacts" / "finetune").iterdir() if p.is_dir()]) == 3
