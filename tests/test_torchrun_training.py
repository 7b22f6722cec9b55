"""Data-parallel LoRA training under torchrun (two ranks, gloo on CPU) through run.py."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, TINY

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
