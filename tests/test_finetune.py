"""One fine-tune artifact: keyed on what changes the weights, so reuse needs no special case."""

import gc
import json
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from conftest import TINY
from lobass.pipeline import run


def _finetunes(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "artifacts" / "finetune").iterdir() if p.is_dir()
                  and not p.name.endswith((".partial", ".lock")))


@pytest.mark.slow
def test_bookkeeping_fields_reuse_a_fine_tune_and_the_learning_rate_does_not(make_cfg, tmp_path):
    first = run(make_cfg(*TINY, "stages=[train]"))
    assert not first["stages"]["train"]["reused"]
    assert len(_finetunes(tmp_path)) == 2  # the reference and the selection's model

    logged = run(make_cfg(*TINY, "stages=[train]", "train.logging_steps=2", "train.save_steps=1",
                          "reference.logging_steps=1"))
    assert logged["stages"]["train"]["reused"] and logged["stages"]["reference"]["reused"]
    assert logged["artifacts"]["adapter"] == first["artifacts"]["adapter"]

    faster = run(make_cfg(*TINY, "stages=[train]", "train.learning_rate=1e-3"))
    assert not faster["stages"]["train"]["reused"] and faster["stages"]["reference"]["reused"]
    assert faster["artifacts"]["adapter"] != first["artifacts"]["adapter"]
    assert len(_finetunes(tmp_path)) == 3


@pytest.mark.slow
def test_full_data_model_is_the_reference_by_content_address_alone(make_cfg, tmp_path):
    # train's recipe made equal to the reference's: the full-pool fine-tune is the same artifact.
    same = ["train.max_steps=4", "train.batch_size=8", "train.epochs=1", "selection.ratio=1.0"]
    full = run(make_cfg(*TINY, *same, "stages=[train]"))
    assert full["stages"]["train"]["reused"] and not full["stages"]["reference"]["reused"]
    assert full["artifacts"]["adapter"] == full["artifacts"]["reference_adapter"]
    assert full["metrics"]["train/steps"] == full["metrics"]["reference/steps"] == 4
    assert len(_finetunes(tmp_path)) == 1
    # Another training seed is another model, even on the same rows with the same recipe.
    seeded = run(make_cfg(*TINY, *same, "stages=[train]", "seed=1"))
    assert not seeded["stages"]["train"]["reused"]
    assert seeded["artifacts"]["adapter"] != seeded["artifacts"]["reference_adapter"]


def _live_models() -> int:
    gc.collect()
    return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())


@pytest.mark.slow
def test_no_stage_keeps_its_model_alive(make_cfg, tmp_path):
    before = _live_models()
    summary = run(make_cfg(*TINY, "eval.generation.sets.vicuna.max_rows=1",
                           "eval.generation.max_new_tokens=2"))
    assert not any(s["reused"] for s in summary["stages"].values())
    # Every stage loaded its own model (reference, score, train, eval): none outlives the run.
    assert _live_models() == before
    rows = json.loads((Path(summary["artifacts"]["adapter"]).parent / "train_metrics.json")
                      .read_text())
    assert rows["train/examples"] == 8


def test_response_tokens_trained_by_hand():

    from conftest import train_recipe
    from lobass.finetune import response_tokens_trained

    recipe = train_recipe(batch_size=2, grad_accum=1)
    lengths = [10, 20, 30, 40, 50]  # 150 tokens; 3 steps per epoch (2 + 2 + 1 rows)
    assert response_tokens_trained(lengths, 3, recipe) == 150
    # 2 whole epochs, then one step of 2 rows at the mean length (30)
    assert response_tokens_trained(lengths, 7, recipe) == 2 * 150 + 2 * 30
    accumulated = train_recipe(batch_size=1, grad_accum=2)
    assert response_tokens_trained(lengths, 3, accumulated) == 150  # 5 micro-batches, 3 steps
