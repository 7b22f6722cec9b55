"""A cross-fitted reference (``reference.fit=cross_fit``): every row's L_ref from an adapter that
never trained on it, cached by content like every artifact."""

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from conftest import TINY
from lobass.config import ConfigError, validate
from lobass.finetune import TRAINED_IDS, assign_folds, weights_recipe
from lobass.modeling import load_model, resolve_model_path
from lobass.pipeline import run
from lobass.pool import read_pool, tokenize_pool
from lobass.scoring.stage import scorer_label

CROSS = [*TINY, "reference.fit=cross_fit", "stages=[score]"]


def _scores(summary: dict) -> list[dict]:
    return [json.loads(line) for line in Path(summary["artifacts"]["scores"]).read_text()
            .splitlines()]


def _trained_ids(artifacts: Path, adapter_key: str) -> list[str]:
    """The ids a fine-tune artifact says it trained on (written by the fine-tune itself)."""
    return json.loads((artifacts / "finetune" / adapter_key / TRAINED_IDS).read_text())


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256 (what 'artifacts unchanged' compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_folds_are_deterministic_balanced_and_follow_content_not_order(make_cfg):
    examples, _ = read_pool(make_cfg().data)  # the shipped default pool (Alpaca + GSM8K rows)
    ids = [e.id for e in examples]
    assert len(ids) > 100 and len(set(ids)) == len(ids)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    for k in (2, 3, 5, 7):
        folds = assign_folds(ids, k, seed=0)
        sizes = Counter(folds)
        assert sorted(sizes) == list(range(k))
        assert max(sizes.values()) - min(sizes.values()) <= 1  # balanced
        assert assign_folds(ids, k, seed=0) == folds  # deterministic
        by_id = dict(zip(ids, folds, strict=True))
        # the same row, anywhere in the pool, is in the same fold
        assert [by_id[i] for i in shuffled] == assign_folds(shuffled, k, seed=0)
        # not dealt by position: each half of the pool order has rows of every fold
        assert set(folds[: len(ids) // 2]) == set(folds[len(ids) // 2:]) == set(range(k))
    # another seed deals other folds, still balanced
    other = assign_folds(ids, 2, seed=1)
    assert other != assign_folds(ids, 2, seed=0) and abs(sum(other) * 2 - len(ids)) <= 1
    # five ids in two folds: 3 + 2
    assert sorted(Counter(assign_folds(ids[:5], 2, seed=0)).values()) == [2, 3]


def test_schema_accepts_the_fields_and_refuses_bad_values(make_cfg):
    validate(make_cfg(*TINY, "reference.fit=cross_fit", "reference.folds=3"))
    with pytest.raises(ConfigError, match=r"reference\.fit.*cross_fit.*in_sample"):
        validate(make_cfg(*TINY, "reference.fit=held_out"))
    with pytest.raises(ConfigError, match=r"reference\.folds.*>= 2"):
        validate(make_cfg(*TINY, "reference.fit=cross_fit", "reference.folds=1"))
    # fit and folds do not enter a fine-tune's key: each fold's adapter is keyed on its rows
    cfg = make_cfg(*TINY, "reference.fit=cross_fit", "reference.folds=3")
    assert weights_recipe(cfg.reference) == weights_recipe(make_cfg(*TINY).reference)
    # a cross-fitted L_ref makes its own point of a study
    assert scorer_label(cfg) == "lobass (cross-fit reference, 3 folds)"
    assert scorer_label(make_cfg(*TINY, "reference.fit=cross_fit", "scorer=loss")) == "loss"
    assert scorer_label(make_cfg(*TINY)) == "lobass"


@pytest.mark.slow
def test_no_row_is_scored_by_an_adapter_that_trained_on_it(make_cfg, tmp_path):
    artifacts = tmp_path / "artifacts"
    summary = run(make_cfg(*CROSS))
    rows = _scores(summary)
    ids = [r["id"] for r in rows]
    # Who scored each row (the score stage's own record) against what that adapter trained on
    # (the fine-tune artifact's own record).
    scorers = {r["ref_adapter"] for r in rows}
    assert len(scorers) == 2
    trained = {key: set(_trained_ids(artifacts, key)) for key in scorers}
    for row in rows:
        assert row["id"] not in trained[row["ref_adapter"]]
        assert row["loss_ref"] is not None and row["loss_ref"] != row["loss_init"]
    # each adapter trained on exactly the rows it does not score: the other fold
    for key, seen in trained.items():
        scored = {r["id"] for r in rows if r["ref_adapter"] == key}
        assert seen == set(ids) - scored
        assert abs(len(scored) - len(ids) / 2) <= 0.5
    # the manifest says the same
    manifest = json.loads(Path(summary["artifacts"]["reference_folds"]).read_text())
    assert manifest["folds"] == 2 and manifest["fit"] == "cross_fit"
    for fold in manifest["per_fold"]:
        assert set(fold["trained_ids"]) == trained[fold["adapter"]]
        assert not set(fold["trained_ids"]) & set(fold["scored_ids"])
    # two folds: each trains the in-sample recipe's steps, on half the rows
    assert summary["metrics"]["reference/fold0/steps"] == 4
    assert summary["metrics"]["reference/steps"] == 8
    assert summary["metrics"]["reference/examples"] == len(ids)


@pytest.mark.slow
def test_cross_fit_reuses_its_references_and_never_collides_with_in_sample(make_cfg, tmp_path):
    artifacts = tmp_path / "artifacts"
    first = run(make_cfg(*CROSS))
    assert not first["stages"]["reference"]["reused"] and not first["stages"]["score"]["reused"]
    before = _tree(artifacts)
    second = run(make_cfg(*CROSS))
    assert second["stages"]["reference"]["reused"] and second["stages"]["score"]["reused"]
    assert second["artifacts"] == first["artifacts"]
    assert second["metrics"]["score/model_loads"] == 0  # every loss read back, none computed
    assert _tree(artifacts) == before  # nothing rewritten
    # In sample on the same pool: its own reference and L_ref, the same L_init (computed once).
    plain = run(make_cfg(*TINY, "stages=[score]"))
    assert not plain["stages"]["reference"]["reused"]
    assert plain["artifacts"]["scores"] != first["artifacts"]["scores"]
    assert plain["metrics"]["score/init_shards_computed"] == 0
    assert plain["metrics"]["score/ref_shards_computed"] > 0
    cross, inside = _scores(first), _scores(plain)
    assert [r["loss_init"] for r in cross] == [r["loss_init"] for r in inside]
    assert [r["loss_ref"] for r in cross] != [r["loss_ref"] for r in inside]
    # three folds: three new adapters and new scores, the two-fold ones untouched
    three = run(make_cfg(*CROSS, "reference.folds=3"))
    assert not three["stages"]["reference"]["reused"]
    assert len({r["ref_adapter"] for r in _scores(three)}) == 3
    assert three["artifacts"]["scores"] not in (first["artifacts"]["scores"],
                                                plain["artifacts"]["scores"])


@pytest.mark.slow
def test_cross_fit_loss_ref_is_the_fold_adapters_own_loss(make_cfg, tmp_path, models_dir):
    """Each row's L_ref equals a plain forward of the base model with its fold's adapter loaded
    on its own (peft), the mean cross-entropy over the response labels."""
    cfg = make_cfg(*CROSS)
    rows = {r["id"]: r for r in _scores(run(cfg))}
    path, _ = resolve_model_path(cfg.model, models_dir)
    from lobass.modeling import load_tokenizer

    examples, _ = read_pool(cfg.data)
    pool, _ = tokenize_pool(cfg, examples, load_tokenizer(cfg.model, path), model_id="unused here")
    checked = 0
    for key in sorted({r["ref_adapter"] for r in rows.values()}):
        model = PeftModel.from_pretrained(load_model(cfg.model, path),
                                          str(tmp_path / "artifacts" / "finetune" / key /
                                              "adapter")).eval()
        mine = [(e.id, f) for e, f in zip(pool.examples, pool.features, strict=True)
                if rows[e.id]["ref_adapter"] == key]
        with torch.inference_mode():
            slow = [model(input_ids=torch.tensor([f.input_ids]),
                          labels=torch.tensor([f.labels])).loss.item() for _, f in mine]
        fast = [rows[row_id]["loss_ref"] for row_id, _ in mine]
        np.testing.assert_allclose(fast, slow, atol=1e-4, rtol=0)
        checked += len(mine)
    assert checked == len(rows)


@pytest.mark.slow
def test_fraction_applies_within_each_fold(make_cfg, tmp_path):
    summary = run(make_cfg(*CROSS, "reference.fraction=0.5"))
    manifest = json.loads(Path(summary["artifacts"]["reference_folds"]).read_text())
    ids = {r["id"] for r in _scores(summary)}
    for fold in manifest["per_fold"]:
        outside = ids - set(fold["scored_ids"])
        assert set(fold["trained_ids"]) < outside
        assert len(fold["trained_ids"]) == round(0.5 * len(outside))
        assert set(_trained_ids(tmp_path / "artifacts", fold["adapter"])) == set(
            fold["trained_ids"])
