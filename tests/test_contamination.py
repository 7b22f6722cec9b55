"""Contamination audit on real rows: a held-out Alpaca row and a GSM8K test question hidden in a
pool of real Alpaca rows are found (exact and 13-gram), counted per set, and dropped on request."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF
from lobass.config import package_data, with_defaults
from lobass.contamination import audit, evaluation_sets, ngrams, normalize
from lobass.data import read_examples
from lobass.pipeline import run


def _rows(name: str) -> list[dict]:
    return json.loads(Path(package_data(name)).read_text())


@pytest.fixture
def pool_file(tmp_path: Path) -> Path:
    """10 real pool rows, then a held-out row, a GSM8K test question and a re-typed answer."""
    clean = _rows("alpaca/alpaca_pool_1k.json")[:10]
    held = _rows("alpaca/alpaca_heldout_200.json")[0]
    test = json.loads(Path(package_data("gsm8k/gsm8k_test.jsonl")).read_text().splitlines()[0])
    gsm = {"instruction": test["question"], "input": "", "output": test["answer"]}
    # A new instruction whose answer copies the held-out answer with other case and punctuation:
    # only the normalised 13-gram test can see it.
    retyped = {"instruction": "Describe a typical regression task.", "input": "",
               "output": "AN EXAMPLE of a simple machine-learning problem is: predicting a "
                         "house\u2019s price based on its characteristics -- like size!"}
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([*clean, held, gsm, retyped]))
    return path


def _eval_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return with_defaults(compose(config_name="config", overrides=list(overrides))).eval


def test_normalize_and_ngrams():
    assert normalize("  Don\u2019t  STOP,\tbelieving!\n") == ["don", "t", "stop", "believing"]
    words = [str(i) for i in range(14)]
    assert ngrams(words) == {tuple(words[:13]), tuple(words[1:])}
    assert ngrams(words[:12]) == set()  # shorter than 13 words: only the exact test applies


def test_audit_counts_real_overlaps_per_set_and_drops_exactly_them(pool_file):
    examples, _ = read_examples(pool_file, "alpaca")
    ev = _eval_cfg()  # eval=cpu: every set the default run evaluates
    assert set(evaluation_sets(ev)) == {
        "heldout", "alpaca_eval_gpt4_turbo", "mt_bench_math_reasoning_coding_ref",
        "vicuna_coding_math_ref", "vicuna", "gsm8k", "ifeval"}
    kept, metrics = audit(examples, ev, drop=False)
    assert kept == examples
    expected = {name: (0.0, 0.0) for name in evaluation_sets(ev)}
    expected["heldout"] = (1.0, 2.0)  # the row itself (both tests) and the re-typed answer
    expected["gsm8k"] = (1.0, 1.0)  # the test question
    assert {name: (metrics[f"data/contamination/{name}/exact"],
                   metrics[f"data/contamination/{name}/ngram13"]) for name in expected} == expected
    assert metrics["data/contamination/rows"] == 3 and "data/decontaminated" not in metrics

    kept, dropped = audit(examples, ev, drop=True)
    assert [e.id for e in kept] == [e.id for e in examples[:10]]  # exactly the three are gone
    assert dropped["data/decontaminated"] == 3
    assert {k: v for k, v in dropped.items() if k != "data/decontaminated"} == metrics


def test_disabled_sets_are_not_audited(pool_file):
    examples, _ = read_examples(pool_file, "alpaca")
    ev = _eval_cfg("eval.gsm8k.enabled=false", "eval.heldout.enabled=false",
                   "eval.generation.enabled=false", "eval.ifeval.enabled=false")
    kept, metrics = audit(examples, ev, drop=True)
    assert "data/contamination/gsm8k/exact" not in metrics and "data/contamination/vicuna/exact" \
        not in metrics
    assert metrics["data/decontaminated"] == 0 and kept == examples


def test_pipeline_records_the_audit_and_decontaminates(make_cfg, tiny, pool_file):
    common = ["model=tiny_random", "logger=none", "stages=[score]", "scorer=length",
              f"data.path={pool_file}", "data.max_rows=null", "~data.mix.gsm8k"]
    summary = run(make_cfg(*common))
    m = summary["metrics"]
    assert m["data/pool_rows"] == 13 and m["data/contamination/rows"] == 3
    assert m["data/contamination/heldout/exact"] == 1 and m["data/contamination/gsm8k/exact"] == 1
    summary = run(make_cfg(*common, "data.decontaminate=true"))
    m = summary["metrics"]
    assert m["data/pool_rows"] == 10 and m["data/decontaminated"] == 3
    written = json.loads((pool_file.parent / "run" / "summary.json").read_text())["metrics"]
    assert written["data/decontaminated"] == 3 and written["data/contamination/gsm8k/ngram13"] == 1
