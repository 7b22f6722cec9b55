"""Issue 27, round 3: every cache key holds content, not names.

Each test reproduces a finding of the round from its description, on the tiny random Llama:
a pool file silently replaced by a mix entry of the same name, a model directory or eval file
changed in place that reused old results, and an initial-model evaluation keyed without its tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY
from lobass.config import package_data
from lobass.pipeline import run
from lobass.pool import read_pool
from lobass.schema import ConfigError

# train=none on the held-out losses alone: the cheapest evaluation that produces a number.
HELDOUT_ONLY = ["train=none", "stages=[eval]", "eval.gsm8k.enabled=false",
                "eval.ifeval.enabled=false", "eval.generation.enabled=false",
                "eval.reference_loss.alpaca_eval_gpt4_turbo.enabled=false",
                "eval.reference_loss.mt_bench_math_reasoning_coding_ref.enabled=false",
                "eval.reference_loss.vicuna_coding_math_ref.enabled=false"]


# ---------------------------------------------------------------------------------------------
# High 1: data.source equal to a data.mix name replaced the primary file

def test_source_named_like_a_mix_entry_is_refused_not_dropped(make_cfg):
    cfg = make_cfg(*TINY, "data.source=gsm8k", "stages=[select]")
    with pytest.raises(ConfigError, match=r"data.source and data.mix.gsm8k both label their "
                                          r"rows 'gsm8k'.*give one another label"):
        read_pool(cfg.data)  # before: 8 GSM8K rows, the 24 Alpaca rows gone without a word
    with pytest.raises(ConfigError, match="data.source and data.mix.gsm8k"):
        run(cfg)  # the run stops at the pool, before any model loads
    assert (Path(cfg.output_dir) / "error.txt").is_file()


def test_mix_source_label_is_honoured_and_checked(make_cfg):
    examples, metrics = read_pool(make_cfg(*TINY, "+data.mix.gsm8k.source=math").data)
    assert [e.source for e in examples] == ["alpaca"] * 24 + ["math"] * 8  # before: "gsm8k"
    assert metrics["data/math/rows"] == 8
    with pytest.raises(ConfigError, match=r"data.source and data.mix.gsm8k.source both label "
                                          r"their rows 'alpaca'"):
        read_pool(make_cfg(*TINY, "+data.mix.gsm8k.source=alpaca").data)


# ---------------------------------------------------------------------------------------------
# High 2: a model changed in place reused old losses

def _save_llama(tiny, directory: Path, seed: int) -> None:
    """The tiny random Llama's architecture and tokenizer with weights drawn from ``seed``."""
    from transformers import LlamaForCausalLM

    model, tokenizer = tiny
    torch.manual_seed(seed)
    LlamaForCausalLM(model.config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _losses(summary: dict) -> list[float]:
    rows = Path(summary["artifacts"]["scores"]).read_text().splitlines()
    return [json.loads(x)["loss_init"] for x in rows]


@pytest.mark.slow
def test_local_model_overwritten_in_place_is_scored_again(make_cfg, tiny, tmp_path):
    local = tmp_path / "my_llama"
    _save_llama(tiny, local, seed=1)
    args = [*TINY, "model.source=hub", f"model.hub_id={local}", "stages=[score]", "scorer=loss"]
    first = run(make_cfg(*args))
    assert run(make_cfg(*args))["stages"]["score"]["reused"]  # unchanged files: reused
    _save_llama(tiny, local, seed=2)  # same names and sizes, other weights
    second = run(make_cfg(*args))
    assert not second["stages"]["score"]["reused"]  # before: reused, the old losses kept
    assert second["artifacts"]["scores"] != first["artifacts"]["scores"]
    changed = [abs(a - b) > 1e-4 for a, b in zip(_losses(first), _losses(second), strict=True)]
    assert all(changed) and len(changed) == 32

    moved = tmp_path / "elsewhere"  # the same files at another path: the same model
    shutil.copytree(local, moved)
    again = run(make_cfg(*TINY, "model.source=hub", f"model.hub_id={moved}", "stages=[score]",
                         "scorer=loss"))
    assert again["stages"]["score"]["reused"]
    cache = json.loads((Path(make_cfg().models_dir) / "file_hashes.json").read_text())
    assert str((moved / "model.safetensors").resolve()) in cache  # hashed once, then stat'ed


def test_unpinned_hub_model_updated_upstream_is_scored_again(make_cfg, tiny, tmp_path,
                                                             monkeypatch):
    """``revision: null`` follows the hub's ``main``: a new commit there must not reuse losses.

    The hub cache is a real one in tmp_path, laid out as ``huggingface_hub`` writes it (refs/main
    naming a snapshot); pointing the hub's cache constant at it is what ``HF_HUB_CACHE`` does.
    """
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--lobass-test--tiny"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def publish(commit: str, seed: int) -> None:  # a new commit on main, as a download leaves it
        _save_llama(tiny, repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    args = [*TINY, "model.source=hub", "model.hub_id=lobass-test/tiny", "model.revision=null",
            "stages=[score]", "scorer=loss"]
    publish("a" * 40, seed=1)
    first = run(make_cfg(*args))
    publish("b" * 40, seed=2)
    second = run(make_cfg(*args))
    assert not second["stages"]["score"]["reused"]
    assert _losses(second) != _losses(first)


def test_gguf_package_is_keyed_by_its_file_content(make_cfg, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from lobass.modeling import model_key, package_dir

    cfg = make_cfg().model  # the embedded SmolLM2, from its GGUF package
    package = tmp_path / "site" / "lobass_test_gguf"  # the same file in a package of our own
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    gguf = package / cfg.gguf_file
    shutil.copy(package_dir(cfg.gguf_package) / cfg.gguf_file, gguf)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ours = OmegaConf.merge(cfg, {"gguf_package": "lobass_test_gguf"})
    before = model_key(ours, "unused", tmp_path)
    assert model_key(ours, "unused", tmp_path) == before
    with open(gguf, "r+b") as handle:  # a package upgrade that ships other bytes, same name
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert model_key(ours, "unused", tmp_path) != before


def test_local_judge_model_is_keyed_by_its_files(tiny, tmp_path):
    from lobass.modeling import checkpoint_fingerprint

    judge = tmp_path / "judge"
    _save_llama(tiny, judge, seed=1)
    before = checkpoint_fingerprint(judge, tmp_path)
    assert checkpoint_fingerprint(judge, tmp_path) == before  # from the hash cache
    _save_llama(tiny, judge, seed=2)
    assert checkpoint_fingerprint(judge, tmp_path) != before


def test_missing_local_model_dir_says_so(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.hub_id=.*/nowhere/llama: no such local "
                                                r"model directory"):
        run(make_cfg(*TINY, "model.source=hub", f"model.hub_id={tmp_path}/nowhere/llama"))


# ---------------------------------------------------------------------------------------------
# High 3: an eval file edited in place reused old metrics

def test_heldout_file_edited_in_place_gives_new_metrics(make_cfg, tmp_path):
    rows = json.loads(Path(package_data("alpaca/alpaca_heldout_200.json")).read_text())[:6]
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps(rows))
    args = [*TINY, *HELDOUT_ONLY, f"eval.heldout.path={heldout}"]
    first = run(make_cfg(*args))
    heldout.write_text(json.dumps([{**r, "output": r["output"] + " Indeed."} for r in rows]))
    second = run(make_cfg(*args))
    assert not second["stages"]["eval"]["reused"]  # before: reused, the old loss reported
    assert second["metrics"]["eval/heldout/loss"] != first["metrics"]["eval/heldout/loss"]


EVAL_FILES = [("heldout", "path"), ("gsm8k", "test_path"), ("gsm8k", "fewshot_path"),
              ("ifeval", "path"), ("reference_loss.alpaca_eval_gpt4_turbo", "answers"),
              ("reference_loss.vicuna_coding_math_ref", "questions"),
              ("reference_loss.vicuna_coding_math_ref", "answers"),
              ("generation.sets.vicuna", "path")]


@pytest.mark.parametrize(("group", "field"), EVAL_FILES)
def test_every_eval_file_is_keyed_by_content(make_cfg, tmp_path, group, field):
    from omegaconf import OmegaConf

    from lobass.evaluation.stage import eval_recipe

    ev = make_cfg().eval
    shipped = Path(OmegaConf.select(ev, f"{group}.{field}"))
    copy = tmp_path / "copy" / shipped.name
    copy.parent.mkdir()
    shutil.copy(shipped, copy)
    OmegaConf.update(ev, f"{group}.{field}", str(copy))
    assert eval_recipe(ev, None) == eval_recipe(make_cfg().eval, None)  # another path, same key
    copy.write_bytes(copy.read_bytes() + b"\n")
    assert eval_recipe(ev, None) != eval_recipe(make_cfg().eval, None)  # edited: a new key


# ---------------------------------------------------------------------------------------------
# High 4: the initial-model row ignored its tokens

@pytest.mark.parametrize("change", ["data.max_length=32", "model.template=alpaca"])
def test_initial_model_eval_follows_its_tokens(make_cfg, change):
    first = run(make_cfg(*TINY, *HELDOUT_ONLY))
    second = run(make_cfg(*TINY, *HELDOUT_ONLY, change))
    assert not second["stages"]["eval"]["reused"]  # before: the first evaluation, reused
    assert second["artifacts"]["eval"] != first["artifacts"]["eval"]
    assert second["metrics"]["eval/heldout/loss"] != first["metrics"]["eval/heldout/loss"]


# ---------------------------------------------------------------------------------------------
# Low: score.shard_rows changed losses (rows are batched within a shard) but was not keyed

@pytest.mark.slow
def test_shard_size_has_its_own_losses(make_cfg):
    args = [*TINY, "stages=[score]", "scorer=loss"]
    first = run(make_cfg(*args))
    other = run(make_cfg(*args, "score.shard_rows=4"))
    assert other["metrics"]["score/init_shards_computed"] == 8  # before: 0, the 1-shard losses
    assert other["artifacts"]["scores"] != first["artifacts"]["scores"]


# ---------------------------------------------------------------------------------------------
# Lows: directories that cannot work are refused before anything is written

def test_run_dir_inside_an_artifact_is_refused(make_cfg, tmp_path):
    inside = tmp_path / "artifacts" / "eval" / "0123abcd" / "run"
    with pytest.raises(ValueError, match=r"output_dir=.* is inside an artifact of artifacts_dir"):
        run(make_cfg(*TINY, f"output_dir={inside}"))
    beside = run(make_cfg(*TINY, "stages=[score]", "scorer=length",
                          f"output_dir={tmp_path / 'artifacts' / 'run'}"))
    assert beside["metrics"]["score/rows"] == 32  # beside the stages is fine


def test_artifacts_dir_that_is_a_file_is_refused(make_cfg, tmp_path):
    not_a_dir = tmp_path / "artifacts.txt"
    not_a_dir.write_text("")
    with pytest.raises(NotADirectoryError, match=r"artifacts_dir=.*artifacts.txt is a file, "
                                                 r"not a directory"):
        run(make_cfg(*TINY, artifacts=not_a_dir))
