"""Data-parallel LoRA training under torchrun (two ranks, gloo on CPU) through run.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY, compose_under
from lobass.modeling import resolve_model_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_ranks_train_one_adapter_and_rank_zero_publishes_it(tmp_path, models_dir, tiny):
    artifacts, run_dir = tmp_path / "artifacts", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "run.py"), *TINY, "train.max_steps=-1", "train.epochs=1",
           "train.batch_size=2", "stages=[train]", f"artifacts_dir={artifacts}",
           f"models_dir={models_dir}", f"output_dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    train_dirs = [p for p in (artifacts / "finetune").iterdir() if p.is_dir()
                  and str(p / "adapter") == summary["artifacts"]["adapter"]]
    assert len(train_dirs) == 1 and not list((artifacts / "finetune").glob("*.partial"))
    metrics = json.loads((train_dirs[0] / "train_metrics.json").read_text())
    # 8 selected rows, 2 per rank per step over 2 ranks: 2 optimiser steps for the epoch
    # (a single process would take 4), so the ranks really split the data.
    assert summary["metrics"]["select/count"] == 8 and metrics["train/steps"] == 2
    weights = load_file(train_dirs[0] / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())
    # Stage logs appear once per rank, but only rank 0 wrote the summary and the artifacts.
    assert out.stderr.count("stage train:") + out.stdout.count("stage train:") == 2
    # ... and each left the process group at the end (torch's shutdown: no NCCL exit warning)
    left = out.stderr + out.stdout
    assert "rank 0 left the process group" in left and "rank 1 left the process group" in left



# Two ranks shard the tiny model's LoRA model with FSDP2 (torch's fully_shard, gloo), take one
# optimiser step, then save the adapter with lobass.training.save_fsdp_adapter, and gather the
# whole model's state dict the way FULL_STATE_DICT saves do (torch's get_model_state_dict): the
# slow path the adapter must equal. (Through the Trainer FSDP cannot run on a CPU: accelerate
# turns FSDP on only for accelerator devices, never for MULTI_CPU.)
FSDP_WORKER = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from lobass.modeling import lora_config
from lobass.training import save_fsdp_adapter

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[2])
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), lora_config(
    OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0}), ["q_proj", "v_proj"]))
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(rank))
model(input_ids=ids, labels=ids).loss.backward()  # each rank its own rows: gradients reduced
optimizer.step()
gathered = save_fsdp_adapter(model, out / "adapter", main=rank == 0)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save({k: v for k, v in full.items() if "lora_" in k}, out / "full_lora.pt")
    (out / "counts.json").write_text(json.dumps({"gathered": gathered, "full": len(full)}))
# Both ranks leave together: rank 1 tearing gloo down while rank 0 still wrote its files once
# aborted rank 1 in CI ("terminate called without an active exception", after all files were on
# disk)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_adapter_save_gathers_only_the_lora_tensors_and_equals_the_full_gather(
        tmp_path, models_dir, tiny):
    path, _ = resolve_model_path(compose_under(tmp_path, models_dir, *TINY).model, models_dir)
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(worker), str(path), str(tmp_path)]
    # this checkout's lobass (the script's own directory comes first on its path)
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                               ENV.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    full = torch.load(tmp_path / "full_lora.pt")
    counts = json.loads((tmp_path / "counts.json").read_text())
    # 2 layers x (q_proj, v_proj) x (A, B): the adapter alone was gathered and saved, against the
    # whole model's tensors that the full-state-dict save gathers
    assert counts["gathered"] == len(saved) == len(full) == 8 and counts["full"] > 8
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)
    for key, value in full.items():  # peft's file names the adapter without ".default"
        torch.testing.assert_close(saved[key.replace(".default", "")], value, rtol=0, atol=0)
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in saved.items())  # the step moved B
