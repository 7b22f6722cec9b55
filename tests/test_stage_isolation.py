"""A sharded stage leaves nothing behind for the next: ZeRO-3 or FSDP reference, then score, then
a plain (DDP) train stage, in one ``torchrun`` job of two ranks (gloo on CPU; DeepSpeed on its
CPU accelerator).

Each run's scores are checked against the obvious slow path: the reference adapter it saved,
loaded by peft in this fresh process, one row at a time through ``model(..., labels=...)``.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import ROOT, TINY, compose_under
from lobass.modeling import load_model, load_tokenizer, resolve_model_path
from lobass.pool import read_pool, tokenize_pool

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
# Two ranks, one row each per pass, two optimiser steps: enough to move the adapter. Shards of 4
# rows: both ranks load the model and score (one shard would be rank 0's alone).
RECIPE = ["reference.max_steps=2", "reference.batch_size=2", "reference.micro_batch_size=1",
          "score.shard_rows=4", "stages=[reference,score,train]"]
# ZeRO-3 through the Trainer: "auto" is filled from the recipe. The Trainer's own AdamW is
# kept (no DeepSpeed optimizer block), which ZeRO on the CPU accelerator allows only when told.
ZERO3 = ("+reference.deepspeed={zero_optimization:{stage:3,"
         "stage3_gather_16bit_weights_on_model_save:true},zero_force_ds_cpu_optimizer:false,"
         "train_batch_size:auto,train_micro_batch_size_per_gpu:auto,"
         "gradient_accumulation_steps:auto,gradient_clipping:auto}")
FSDP = ["+reference.fsdp=true", "+reference.fsdp_config={version:2,reshard_after_forward:true}"]


def _two_ranks(root: Path, models_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "run.py"), *TINY, *RECIPE, *overrides, f"artifacts_dir={root / 'artifacts'}",
           f"models_dir={models_dir}", f"output_dir={root / 'run'}"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=420)


def _check_scores_against_one_process(root: Path, models_dir: Path, *overrides: str) -> None:
    """Every row's score is finite and equals the saved adapter's, scored here row by row."""
    summary = json.loads((root / "run" / "summary.json").read_text())
    rows = [json.loads(line) for line in
            Path(summary["artifacts"]["scores"]).read_text().splitlines()]
    cfg = compose_under(root, models_dir, *TINY, *RECIPE, *overrides)
    path, _ = resolve_model_path(cfg.model, models_dir)
    examples, _ = read_pool(cfg.data)
    pool, _ = tokenize_pool(cfg, examples, load_tokenizer(cfg.model, path), model_id="unused")
    assert [r["id"] for r in rows] == pool.ids and len(rows) == 32
    base = load_model(cfg.model, path)
    with torch.inference_mode():
        init = [base(input_ids=torch.tensor([f.input_ids]),
                     labels=torch.tensor([f.labels])).loss.item() for f in pool.features]
    adapted = PeftModel.from_pretrained(base, summary["artifacts"]["reference_adapter"]).eval()
    with torch.inference_mode():
        ref = [adapted(input_ids=torch.tensor([f.input_ids]),
                       labels=torch.tensor([f.labels])).loss.item() for f in pool.features]
    scores = np.array([r["score"] for r in rows], dtype=float)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose([r["loss_init"] for r in rows], init, atol=1e-4, rtol=0)
    np.testing.assert_allclose([r["loss_ref"] for r in rows], ref, atol=1e-4, rtol=0)
    slow = (np.array(init) - np.array(ref)) / np.array(init)
    np.testing.assert_allclose(scores, slow, atol=1e-5, rtol=0)
    assert np.abs(scores).max() > 0  # the reference trained: L_ref moved away from L_init
    # The train stage (train=lora_cpu: no FSDP, no DeepSpeed) trained its 3 steps after it.
    trained = Path(summary["artifacts"]["adapter"]).parent
    assert json.loads((trained / "train_metrics.json").read_text())["train/steps"] == 3
    weights = load_file(trained / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in weights)
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (scripts/setup.sh installs it: "
                           "pip install --no-build-isolation '.[deepspeed]')")
def test_zero3_reference_then_score_in_one_run(tmp_path, models_dir, tiny):
    """Before stage_scope the score stage loaded under deepspeed.zero.Init (the Trainer's
    HfDeepSpeedConfig outlived the stage): on a GPU "DeepSpeed Zero-3 is not compatible with
    passing a device_map"; here rank 1 waited in zero.Init's broadcast while rank 0 waited at
    the score shards' barrier, until the timeout."""
    out = _two_ranks(tmp_path, models_dir, ZERO3)
    assert out.returncode == 0, out.stderr[-4000:]
    _check_scores_against_one_process(tmp_path, models_dir, ZERO3)


@pytest.mark.slow
def test_fsdp_reference_then_score_in_one_run(tmp_path, models_dir, tiny):
    """On a CPU accelerate trains the FSDP recipe as plain DDP (it turns FSDP on for accelerator
    devices only), but TrainingArguments and Accelerator still set FSDP_CPU_RAM_EFFICIENT_LOADING
    and ACCELERATE_USE_FSDP: left in the environment, the next Trainer (train=lora_cpu) built an
    FSDP plugin from them and stopped ("FSDP parameter initialization with
    `sync_module_states=True` is not supported on cpu"), and every later from_pretrained saw
    transformers' is_fsdp_enabled()."""
    out = _two_ranks(tmp_path, models_dir, *FSDP)
    assert out.returncode == 0, out.stderr[-4000:]
    _check_scores_against_one_process(tmp_path, models_dir, *FSDP)


def test_stage_scope_restores_the_environment_and_drops_zero3_and_accelerate_state(monkeypatch):
    """What a sharded Trainer leaves is gone after the scope, and the user's own ACCELERATE_*
    setting is kept. The two-rank runs above leave these through the Trainer itself; here the
    variables are set as TrainingArguments and Accelerator set them (on one CPU process
    accelerate refuses to build an FSDP plugin with RAM-efficient loading)."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from lobass.distributed import stage_scope

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the user's, from before the stage
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    # HfDeepSpeedConfig needs deepspeed (the `deepspeed` extra, which CI installs); without it
    # the environment and accelerate's state are still checked.
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    with stage_scope("reference"):
        zero3 = (HfDeepSpeedConfig({"zero_optimization": {"stage": 3}})  # what the Trainer holds
                 if has_deepspeed else None)
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"  # TrainingArguments' fsdp_config
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # what Accelerator(fsdp_plugin=...) sets
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
        PartialState(cpu=True)
        assert PartialState().initialized and is_deepspeed_zero3_enabled() == has_deepspeed
    assert not is_deepspeed_zero3_enabled()  # although the config object is still alive
    assert zero3 is None or zero3.is_zero3()
    assert "FSDP_CPU_RAM_EFFICIENT_LOADING" not in os.environ
    assert "ACCELERATE_USE_FSDP" not in os.environ
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    assert not PartialState._shared_state and not AcceleratorState._shared_state
