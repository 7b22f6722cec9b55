"""Evaluation: intervals, GSM8K answer extraction on real rows, prompt sets, batched generation
(against one-at-a-time), resume, the local judge (fast path against slow), the pairwise protocol."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, TINY
from lobass.config import package_data, with_defaults
from lobass.data import DataError
from lobass.evaluation.generation import (
    enabled_prompt_sets,
    generate_batch,
    generate_responses,
    judged_sets,
    read_generations,
)
from lobass.evaluation.gsm8k import gsm8k_metrics, gsm8k_task_config
from lobass.evaluation.harness import build_lm, build_task_manager
from lobass.evaluation.heldout import heldout_loss_metrics
from lobass.evaluation.ifeval import METRICS as IFEVAL_METRICS
from lobass.evaluation.ifeval import evaluate_ifeval, ifeval_missing, ifeval_task_dir
from lobass.evaluation.judge import (
    combine_orders,
    find_baseline_generations,
    judge_pairwise,
    judge_prompt,
    parse_verdict,
    render_prompt,
)
from lobass.evaluation.judges import LocalHFJudge
from lobass.evaluation.prompts import read_prompts, read_reference_examples, read_reference_set
from lobass.evaluation.suite import reference_sets
from lobass.formatting import format_prompt, prompt_token_ids
from lobass.stats import bootstrap_interval, wilson_interval

# --------------------------------------------------------------------------------------------
# intervals


def test_wilson_interval_matches_the_closed_form_and_stays_in_unit_range():
    low, high = wilson_interval(0, 50)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(3.8415 / (50 + 3.8415), rel=1e-4)  # z^2 / (n + z^2) at 0 of n
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value for 5/10
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [1.0] * 6 + [0.5] * 2 + [0.0] * 4
    low, high = bootstrap_interval(values, seed=3)
    assert (low, high) == bootstrap_interval(values, seed=3)
    assert 0 <= low < np.mean(values) < high <= 1
    assert bootstrap_interval([1.0] * 5) == (1.0, 1.0)


def test_heldout_loss_metrics_skip_nonfinite_rows():
    m = heldout_loss_metrics(np.array([1.0, 2.0, 3.0, np.nan]), "heldout")
    assert m["eval/heldout/n"] == 3 and m["eval/heldout/loss"] == 2.0
    half = 1.959963984540054 * 1.0 / math.sqrt(3)
    assert m["eval/heldout/loss_ci_low"] == pytest.approx(2 - half)
    assert m["eval/heldout/loss_ci_high"] == pytest.approx(2 + half)


# --------------------------------------------------------------------------------------------
# GSM8K: the shipped task's filters on real test rows


def test_gsm8k_task_extracts_strict_and_flexible_answers_on_real_rows():
    cfg = OmegaConf.create({"test_path": package_data("gsm8k/gsm8k_test.jsonl"),
                            "fewshot_path": package_data("gsm8k/gsm8k_train_300.jsonl"),
                            "num_fewshot": 0, "max_gen_toks": 8})
    from lm_eval.tasks import get_task_dict  # in every lm-eval >= 0.4.10 (TaskManager.load is not)

    task = get_task_dict([gsm8k_task_config(cfg)], build_task_manager())["lobass_gsm8k"]
    task.build_all_requests(limit=4, rank=0, world_size=1)
    rows = [json.loads(x) for x in
            Path(package_data("gsm8k/gsm8k_test.jsonl")).read_text().splitlines()[:4]]
    assert [i.doc["question"] for i in task.instances] == [r["question"] for r in rows]
    # Gold answers of the first four test questions: 18, 3, 70000, 540.
    generations = ["16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18",  # both right
                   "It takes 2 + 1 = 3 bolts in total.",                  # flexible only
                   "The profit is $70,000 in the end",                    # flexible ($, comma)
                   "#### 541"]                                            # both wrong
    for instance, text in zip(task.instances, generations, strict=True):
        instance.resps = [text]
    task.apply_filters()
    got = {key: [task.process_results(i.doc, [i.filtered_resps[key]])["exact_match"]
                 for i in task.instances] for key in ("strict-match", "flexible-extract")}
    assert got == {"strict-match": [1, 0, 0, 0], "flexible-extract": [1, 1, 1, 0]}
    assert task.instances[2].filtered_resps["strict-match"] == "[invalid]"


def test_gsm8k_metrics_carry_n_and_wilson_intervals():
    m = gsm8k_metrics({"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.3}, 10)
    assert m["eval/gsm8k/n"] == 10 and m["eval/gsm8k/strict_acc"] == 0
    assert m["eval/gsm8k/strict_acc_ci_low"] < 1e-12 and m["eval/gsm8k/strict_acc_ci_high"] > 0.2
    assert (m["eval/gsm8k/flexible_acc_ci_low"], m["eval/gsm8k/flexible_acc_ci_high"]) == \
        pytest.approx(wilson_interval(3, 10))


def test_gsm8k_missing_file_names_the_key(tmp_path):
    cfg = OmegaConf.create({"test_path": str(tmp_path / "nope.jsonl"), "fewshot_path": "x",
                            "num_fewshot": 0, "max_gen_toks": 8})
    with pytest.raises(FileNotFoundError, match="eval.gsm8k.test_path"):
        gsm8k_task_config(cfg)


# --------------------------------------------------------------------------------------------
# prompt sets and references


def test_shipped_prompt_sets_and_references():
    vicuna = read_prompts(package_data("vicuna_eval/question.jsonl"), "fastchat")
    assert len(vicuna) == 80 and vicuna[0].id == "1"
    assert vicuna[0].messages == ({"role": "user",
                                   "content": "How can I improve my time management skills?"},)
    mt = read_prompts(package_data("mt_bench/question.jsonl"), "fastchat", max_rows=5)
    assert [p.id for p in mt] == ["81", "82", "83", "84", "85"]
    assert mt[0].messages[0]["content"].startswith("Compose an engaging travel blog post")
    held = read_prompts(package_data("alpaca/alpaca_heldout_200.json"), "alpaca", max_rows=3)
    assert len(held) == 3 and held[0].messages[-1]["role"] == "user"
    refs = read_reference_examples(package_data("mt_bench/question.jsonl"),
                                   package_data("mt_bench/reference_answer/gpt-4.jsonl"))
    assert len(refs) == 30 and refs[0].messages[1]["content"].startswith(
        "If you have just overtaken the second person")
    assert refs[0].messages[0]["content"].startswith("Imagine you are participating in a race")


def _eval_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return with_defaults(compose(config_name="config", overrides=list(overrides))).eval


def test_reference_sets_are_named_for_what_they_hold():
    """MT-Bench's and Vicuna's GPT-4 reference answers are math/reasoning/coding, not chat."""
    sets = reference_sets(_eval_cfg())
    assert list(sets) == ["heldout", "alpaca_eval_gpt4_turbo",
                          "mt_bench_math_reasoning_coding_ref", "vicuna_coding_math_ref"]
    for name, folder, expected in (
            ("mt_bench_math_reasoning_coding_ref", "mt_bench",
             {"math": 10, "reasoning": 10, "coding": 10}),
            ("vicuna_coding_math_ref", "vicuna_eval", {"coding": 7, "math": 3})):
        category = {json.loads(x)["question_id"]: json.loads(x)["category"] for x in
                    Path(package_data(f"{folder}/question.jsonl")).read_text().splitlines()}
        found = [category[e.raw["question_id"]] for e in sets[name]]
        assert {c: found.count(c) for c in set(found)} == expected


def test_alpaca_eval_gpt4_turbo_set_reads_the_shipped_rows_in_order():
    rows = json.loads(Path(package_data("alpaca_eval/alpaca_eval_gpt4_turbo_200.json"))
                      .read_text())
    assert len(rows) == 200 and {r["generator"] for r in rows} == {"gpt4_1106_preview"}
    assert {r["dataset"] for r in rows} == {"helpful_base", "koala", "oasst", "selfinstruct",
                                            "vicuna"}
    cpu = reference_sets(_eval_cfg())["alpaca_eval_gpt4_turbo"]
    assert len(cpu) == 100  # eval=cpu: the first 100, itself a uniform sample
    for example, row in zip(cpu, rows, strict=False):
        assert example.messages == ({"role": "user", "content": row["instruction"]},
                                    {"role": "assistant", "content": row["output"]})
    assert len(reference_sets(_eval_cfg("eval=gpu"))["alpaca_eval_gpt4_turbo"]) == 200


def test_reference_set_reader_and_questions_must_agree():
    ev = _eval_cfg().reference_loss
    with pytest.raises(DataError, match=r"eval.reference_loss.a.questions=.* is only read with "
                                        r"reader=fastchat.*questions=null"):
        read_reference_set("a", OmegaConf.merge(ev.alpaca_eval_gpt4_turbo,
                                                {"questions": ev.vicuna_coding_math_ref.questions}))
    with pytest.raises(DataError, match=r"eval.reference_loss.b.questions is required"):
        read_reference_set("b", OmegaConf.merge(ev.vicuna_coding_math_ref, {"questions": None}))
    with pytest.raises(DataError, match=r"reader='csv' is not supported; choose one of "
                                        r"\['alpaca', 'dolly', 'fastchat', 'gsm8k', 'jsonl'\]"):
        read_reference_set("c", OmegaConf.merge(ev.vicuna_coding_math_ref, {"reader": "csv"}))


def test_bad_prompt_row_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "turns": ["hi"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: field 'turns'"):
        read_prompts(path, "fastchat")


# --------------------------------------------------------------------------------------------
# generation


def _prompt_ids(tokenizer, prompts):
    return [prompt_token_ids(format_prompt(p.messages, tokenizer, "chat"), tokenizer)
            for p in prompts]


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = read_prompts(package_data("vicuna_eval/question.jsonl"), "fastchat", max_rows=5)
    ids = _prompt_ids(tokenizer, prompts)
    assert len({len(x) for x in ids}) > 1  # different lengths: padding is exercised
    batched = generate_batch(model, tokenizer, ids, max_new_tokens=12)
    single = [generate_batch(model, tokenizer, [x], max_new_tokens=12)[0] for x in ids]
    assert batched == single
    # The slowest path: token by token with full forward passes and argmax.
    import torch

    seq = list(ids[0])
    for _ in range(12):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    expected = seq[len(ids[0]):]
    tokens, finished = batched[0]
    assert tokens == expected[:len(tokens)] and (finished or len(tokens) == 12)


def test_generation_jsonl_resumes_after_a_kill(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = read_prompts(package_data("vicuna_eval/question.jsonl"), "fastchat", max_rows=4)
    path = tmp_path / "vicuna.jsonl"
    full = generate_responses(model, tokenizer, prompts, path, template="chat",
                              max_new_tokens=6, batch_size=2, set_name="vicuna")
    assert [r["id"] for r in full] == ["1", "2", "3", "4"]
    assert all(r["set"] == "vicuna" and r["n_tokens"] <= 6 for r in full)
    assert full[0]["prompt"] == "How can I improve my time management skills?"
    # A run killed after one batch and in the middle of writing the next line:
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:10])
    resumed = generate_responses(model, tokenizer, prompts, path, template="chat",
                                 max_new_tokens=6, batch_size=2, set_name="vicuna")
    assert resumed == full
    assert path.read_text() == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in full)


def test_torn_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"id": "1", "output": "a"}\n{"id": \n{"id": "3", "output": "c"}\n')
    with pytest.raises(ValueError, match=r"g.jsonl:2: invalid JSON"):
        read_generations(path)


# --------------------------------------------------------------------------------------------
# judging


def test_parse_and_render():
    assert parse_verdict("A is wordier but B is right. [[B]]") == "B"
    assert parse_verdict("[[A]] ... on reflection [[C]]") == "tie"
    assert parse_verdict("Assistant A") == "unparsed"
    template = judge_prompt(OmegaConf.create({"prompt": "pairwise_v1.txt"}))[0]
    text = render_prompt(template, "Q {answer_b}?", "first {x}", "second")
    assert "Q {answer_b}?" in text and "first {x}" in text
    assert text.index("first {x}") < text.index("second")


def test_combine_orders_cancels_position_bias():
    def lp(a, b, tie=-9.0):
        return {"logprobs": {"A": a, "B": b, "tie": tie}}

    # A judge that always prefers position A by 2 nats, and ours by 0.5 nats on top:
    assert combine_orders(lp(-1.0, -3.5), lp(-1.5, -3.0)) == "win"
    assert combine_orders(lp(-1.5, -3.0), lp(-1.0, -3.5)) == "lose"
    assert combine_orders(lp(-1.0, -3.0), lp(-1.0, -3.0)) == "tie"  # pure position bias
    assert combine_orders(lp(-1.0, -3.5), lp(-1.5, -3.0), tie_margin=1.0) == "tie"
    assert combine_orders({"verdict": "A"}, {"verdict": "B"}) == "win"
    assert combine_orders({"verdict": "B"}, {"verdict": "A"}) == "lose"
    assert combine_orders({"verdict": "A"}, {"verdict": "A"}) == "tie"  # inconsistent
    assert combine_orders({"verdict": "unparsed"}, {"verdict": "B"}) == "tie"


def test_local_hf_judge_fast_path_equals_slow_path_and_runs_both_orders(tiny):
    model, tokenizer = tiny
    template = judge_prompt(OmegaConf.create({"prompt": "pairwise_v1.txt"}))[0]
    fast = LocalHFJudge(model, tokenizer)
    slow = LocalHFJudge(model, tokenizer, fast=False)
    prompt = render_prompt(template, "Name a colour.", "Blue.", "I like trains.")
    scores = fast.score(prompt)
    assert set(scores) == {"A", "B", "tie"} and all(v < 0 for v in scores.values())
    for key, value in slow.score(prompt).items():
        assert value == pytest.approx(scores[key], abs=1e-4)

    ours = [{"id": "1", "prompt": "Name a colour.", "output": "Blue."},
            {"id": "2", "prompt": "2+2?", "output": "4"}]
    baseline = {"1": {"id": "1", "output": "I like trains."}, "2": {"id": "2", "output": "5"},
                "3": {"id": "3", "output": "extra rows are ignored"}}
    records, m = judge_pairwise(fast, template, ours, baseline, bootstrap_iters=200)
    assert m["n"] == 2 and m["win"] + m["tie"] + m["lose"] == 2 and m["unparsed"] == 0
    assert m["win_rate"] == (m["win"] + 0.5 * m["tie"]) / 2
    assert m["win_rate_ci_low"] <= m["win_rate"] <= m["win_rate_ci_high"]
    first = records[0]
    # Raw verdicts of both orders are kept, and they are the judge's real scores.
    assert first["ours_first"]["logprobs"] == fast.score(
        render_prompt(template, "Name a colour.", "Blue.", "I like trains."))
    assert first["baseline_first"]["logprobs"] == fast.score(
        render_prompt(template, "Name a colour.", "I like trains.", "Blue."))
    assert first["outcome"] == combine_orders(first["ours_first"], first["baseline_first"])
    with pytest.raises(ValueError, match="no answer for 1 of our 3"):
        judge_pairwise(fast, template, [*ours, {"id": "9", "prompt": "?", "output": "!"}],
                       baseline)


def test_find_baseline_generations_from_file_eval_dir_and_run_dir(tmp_path):
    gen = tmp_path / "gen" / "vicuna.jsonl"
    gen.parent.mkdir()
    gen.write_text('{"set": "vicuna", "id": "1", "output": "x"}\n'
                   '{"set": "mt_bench", "id": "81", "output": "y"}\n')
    assert list(find_baseline_generations(gen, "vicuna")) == ["1"]
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "generations.json").write_text(json.dumps({"vicuna": str(gen)}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"artifacts": {"eval": str(eval_dir)}}))
    assert find_baseline_generations(run_dir, "vicuna")["1"]["output"] == "x"
    with pytest.raises(FileNotFoundError, match="no answers for prompt set 'mt_bench'"):
        find_baseline_generations(run_dir, "mt_bench")


# --------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("judge", ["local_hf", "openai_compatible"])
@pytest.mark.parametrize("eval_option", ["cpu", "gpu"])
def test_eval_and_judge_configs_compose_and_shipped_files_exist(judge, eval_option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config",
                                    overrides=[f"judge={judge}", f"eval={eval_option}"]))
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    assert ev["judge"]["name"] == judge and ev["judge"]["baseline"] is None
    judge_prompt(cfg.eval.judge)
    paths = [ev["ifeval"]["path"], ev["heldout"]["path"]]
    paths += [s["path"] for s in ev["generation"]["sets"].values()]
    paths += [r[k] for r in ev["reference_loss"].values() for k in ("questions", "answers")
              if r[k] is not None]  # questions: null for a one-file (data reader) set
    for path in paths:
        assert Path(path).stat().st_size > 0, path
    assert set(enabled_prompt_sets(cfg.eval)) <= {"vicuna", "mt_bench", "heldout_prompts",
                                                  "alpaca_eval"}
    assert "alpaca_eval" not in judged_sets(cfg.eval)  # answered for its length, not judged


def test_unknown_or_missing_backend_fails_with_the_fix(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="eval.backend must be one of"):
        build_lm(model, tokenizer, "tgi", batch_size=1, max_length=64)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match="pip install vllm"):
            build_lm(model, tokenizer, "vllm", batch_size=1, max_length=64, model_path="x")


def test_ifeval_runs_offline_on_two_prompts_with_the_shipped_nltk_data(tiny, make_cfg):
    # Nothing is missing on a plain install: langdetect and immutabledict are dependencies, the
    # English punkt_tab ships in lobass/resources (before: "NLTK data 'punkt_tab'" was missing).
    assert ifeval_missing() == []
    from lm_eval.tasks.ifeval import instructions_util  # imports offline: punkt_tab is found

    # the checkers' own sentence and word counts, on the shipped English Punkt model
    assert instructions_util.count_sentences("Dr. Smith arrived at 5 p.m. today. He left.") == 2
    assert instructions_util.nltk.word_tokenize("Don't stop.") == ["Do", "n't", "stop", "."]
    cfg = make_cfg(*TINY)
    model, tokenizer = tiny
    metrics = evaluate_ifeval(model, tokenizer, cfg.eval.ifeval, chat=False, seed=0,
                              task_manager=build_task_manager([ifeval_task_dir()]))
    assert cfg.eval.ifeval.limit == 2 and metrics["eval/ifeval/n"] == 2
    for name in IFEVAL_METRICS:
        value = metrics[f"eval/ifeval/{name}"]
        assert 0 <= value <= 1
        assert metrics[f"eval/ifeval/{name}_ci_low"] <= value <= metrics[
            f"eval/ifeval/{name}_ci_high"]
    # prompt-level: a whole number of the 2 prompts passed
    assert metrics["eval/ifeval/prompt_level_strict_acc"] in (0.0, 0.5, 1.0)
