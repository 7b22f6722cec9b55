"""Endpoints that can see a benefit (issue 28): the answer loss without its first and last tokens,
the mean length of greedy answers to AlpacaEval prompts, and the per-prompt losses of every run
as a CSV beside summary.json; all in the report and in W&B. One tiny run of the initial model
(train=none), checked against independent slow-path computations on the same tiny model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from conftest import TINY
from lobass.pipeline import run

SET = "alpaca_eval_gpt4_turbo"
EVAL = [*TINY, "train=none", "logger=wandb", "eval.gsm8k.enabled=false",
        "eval.ifeval.enabled=false", "eval.generation.sets.vicuna.enabled=false",
        "eval.heldout.max_rows=4", f"eval.reference_loss.{SET}.max_rows=6",
        "eval.reference_loss.mt_bench_math_reasoning_coding_ref.max_rows=3",
        "eval.generation.sets.alpaca_eval.enabled=true",
        "eval.generation.sets.alpaca_eval.max_rows=3",
        "eval.generation.sets.alpaca_eval.max_new_tokens=12"]


def _slow_trimmed_loss(model, features) -> float:
    """Mean token cross-entropy over response tokens 2..n-1, from one plain forward pass."""
    ids = torch.tensor([features.input_ids])  # (1, T)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
    response = [t for t, label in enumerate(features.labels) if label != -100]
    kept = response[1:-1]  # drop the first and the last response token
    if not kept:
        return float("nan")
    # the logits at t-1 predict the token at t
    losses = [F.cross_entropy(logits[t - 1][None], ids[0, t][None]).item() for t in kept]
    return sum(losses) / len(losses)


@pytest.mark.slow  # ~40 s here: one tiny run plus the slow paths
def test_trimmed_loss_answer_length_and_per_prompt_csv_of_a_tiny_run(make_cfg, tiny, tmp_path):
    from lobass.evaluation.generation import stop_token_ids
    from lobass.evaluation.prompts import read_prompts, read_reference_set
    from lobass.formatting import format_prompt, prompt_token_ids, tokenize_example

    cfg = make_cfg(*EVAL)
    summary = run(cfg)
    m = summary["metrics"]
    model, tokenizer = tiny
    model.eval()

    # the per-prompt CSV: in the run dir, listed in summary.json, a copy of the artifact's
    table_path = Path(summary["artifacts"]["per_prompt_losses"])
    assert table_path == tmp_path / "run" / "per_prompt_losses.csv"
    eval_dir = Path(summary["artifacts"]["eval"])
    assert table_path.read_text() == (eval_dir / "per_prompt_losses.csv").read_text()
    table = pd.read_csv(table_path)
    assert list(table.columns) == ["set", "id", "response_tokens", "loss", "loss_trimmed"]
    sets = {"heldout": 4, SET: 6, "mt_bench_math_reasoning_coding_ref": 3,
            "vicuna_coding_math_ref": 10}
    assert table.groupby("set").size().to_dict() == sets
    for name in sets:  # its means are the reported metrics
        rows = table[table["set"] == name]
        assert rows["loss"].mean() == pytest.approx(m[f"eval/{name}/loss"], rel=1e-9)
    assert table.loc[table["set"] != SET, "loss_trimmed"].isna().all()  # only where asked

    # the trimmed loss, row by row, against a plain forward pass of the same model
    rows = table[table["set"] == SET].set_index("id")
    examples = read_reference_set(SET, cfg.eval.reference_loss[SET])
    for example in examples:
        features = tokenize_example(example, tokenizer, cfg.model.template, cfg.data.max_length)
        assert rows.loc[example.id, "response_tokens"] == features.n_response
        expected = _slow_trimmed_loss(model, features)
        assert rows.loc[example.id, "loss_trimmed"] == pytest.approx(expected, rel=1e-4)
    assert m[f"eval/{SET}/loss_trimmed"] == pytest.approx(rows["loss_trimmed"].mean(), rel=1e-9)
    assert m[f"eval/{SET}/loss_trimmed_n"] == 6
    assert m[f"eval/{SET}/loss_trimmed"] != m[f"eval/{SET}/loss"]  # other tokens

    # answer length: the mean token count of the saved answers, each the length of a greedy
    # generation of that prompt alone, cut at the first end-of-turn token, capped at 12
    generations = json.loads((eval_dir / "generations.json").read_text())
    saved = [json.loads(x) for x in Path(generations["alpaca_eval"]).read_text().splitlines()]
    assert len(saved) == 3 and m["eval/alpaca_eval/generated"] == 3
    assert m["eval/alpaca_eval/gen_len_tokens"] == sum(r["n_tokens"] for r in saved) / 3
    prompts = read_prompts(cfg.eval.generation.sets.alpaca_eval.path, "alpaca", 3)
    stops = stop_token_ids(model, tokenizer)
    for prompt, row in zip(prompts, saved, strict=True):
        ids = prompt_token_ids(format_prompt(prompt.messages, tokenizer, cfg.model.template),
                               tokenizer)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12,
                                 eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):]
        new = out.tolist()
        length = next((i for i, t in enumerate(new) if t in stops), len(new))
        assert row["id"] == prompt.id and row["n_tokens"] == length

    # W&B: the tracker logged the summary metrics into the offline run's record file (wandb
    # 0.31 writes no wandb-summary.json offline and reads its records only in its Go core; the
    # record format stores keys as plain bytes, so a byte search finds them)
    record = next((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    for key in (f"eval/{SET}/loss_trimmed", "eval/alpaca_eval/gen_len_tokens"):
        assert key.encode() in record

    # the report tabulates them
    from lobass.report.runs import collect_runs, headline_metrics, higher_is_better

    runs = collect_runs(tmp_path / "run")
    shown = headline_metrics(set(runs.columns))
    assert f"eval/{SET}/loss_trimmed" in shown and "eval/alpaca_eval/gen_len_tokens" in shown
    assert not higher_is_better(f"eval/{SET}/loss_trimmed")
    assert higher_is_better("eval/alpaca_eval/gen_len_tokens")


def test_trimming_drops_the_first_and_last_response_token_and_empties_short_answers():
    from lobass.evaluation.heldout import heldout_loss_metrics, without_first_and_last
    from lobass.formatting import Features

    row = Features([5, 6, 7, 8, 9, 10], [-100, -100, 7, 8, 9, 10], n_prompt=2, truncated=False)
    assert without_first_and_last(row).labels == [-100, -100, -100, 8, 9, -100]
    short = Features([5, 6, 7, 8], [-100, -100, 7, 8], n_prompt=2, truncated=False)
    assert without_first_and_last(short).labels == [-100] * 4  # nothing left: NaN, not counted
    assert heldout_loss_metrics(np.array([1.0, np.nan, 3.0]), "s", "loss_trimmed") == {
        "eval/s/loss_trimmed": 2.0, "eval/s/loss_trimmed_ci_low": pytest.approx(2 - 1.96, rel=1e-3),
        "eval/s/loss_trimmed_ci_high": pytest.approx(2 + 1.96, rel=1e-3),
        "eval/s/loss_trimmed_n": 2.0}  # sd/sqrt(n) = 1
