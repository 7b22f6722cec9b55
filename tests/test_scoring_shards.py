"""The score stage as a user runs it: killed with SIGKILL and resumed, run again, and under
torchrun with two ranks (gloo on CPU). Real subprocesses of run.py on the tiny random model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

POOL = ["model=tiny_random", "logger=none", "stages=[score]", "data.max_rows=64",
        "data.mix.gsm8k.max_rows=8", "data.max_length=128", "reference.max_steps=2"]
N_ROWS = 72
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}  # torchrun's own default: the same kernels in every process


def _args(artifacts: Path, models_dir: Path, run: Path, *extra: str) -> list[str]:
    return [*POOL, f"artifacts_dir={artifacts}", f"models_dir={models_dir}", f"output_dir={run}",
            *extra]


def _run(args: list[str], launcher: list[str] | None = None) -> dict:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "run.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    return json.loads((run_dir / "summary.json").read_text())


def _scores(summary: dict) -> list[dict]:
    return [json.loads(x) for x in Path(summary["artifacts"]["scores"]).read_text().splitlines()]


def _loss_meta(artifacts: Path) -> dict:
    (directory,) = [d for d in (artifacts / "losses").iterdir() if d.is_dir()]
    return json.loads((directory / "manifest.json").read_text())["meta"]


@pytest.mark.slow
def test_kill_9_then_rerun_computes_only_missing_shards_and_a_third_run_no_forward(
        tmp_path, models_dir, tiny):
    args = ["scorer=loss", "score.shard_rows=2"]  # 36 shards: many chances to die mid-way
    clean = _run(_args(tmp_path / "clean", models_dir, tmp_path / "run0", *args))
    assert clean["metrics"]["score/init_shards_computed"] == 36

    artifacts = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "run.py"),
           *_args(artifacts, models_dir, tmp_path / "run1", *args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    shards = artifacts / "losses"
    deadline = time.time() + 300
    while len(list(shards.glob("*.partial/shards/*.json"))) < 3 and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_disk = len(list(shards.glob("*.partial/shards/[!.]*.json")))
    assert 3 <= on_disk < 36
    assert not [d for d in shards.iterdir() if d.is_dir() and not d.name.endswith(".partial")]

    resumed = _run(_args(artifacts, models_dir, tmp_path / "run2", *args))
    assert resumed["metrics"]["score/init_shards_computed"] == 36 - on_disk
    meta = _loss_meta(artifacts)
    assert meta["shards_resumed"] == on_disk and meta["shards_computed"] == 36 - on_disk
    assert _scores(resumed) == _scores(clean)  # identical, bit for bit
    assert len(_scores(resumed)) == N_ROWS

    again = _run(_args(artifacts, models_dir, tmp_path / "run3", *args))
    assert again["stages"]["score"]["reused"]
    assert again["metrics"]["score/model_loads"] == 0  # no model load, so no forward at all
    assert again["metrics"]["score/init_shards_computed"] == 0
    assert _scores(again) == _scores(clean)


@pytest.mark.slow
def test_torchrun_two_ranks_writes_the_single_process_result(tmp_path, models_dir, tiny):
    # lobass needs both losses and the reference adapter: trained once here, single process.
    args = ["scorer=lobass", "score.shard_rows=4", "score.extra_scorers=[ifd_chat]"]
    single = _run(_args(tmp_path / "single", models_dir, tmp_path / "run0", *args))
    assert not single["stages"]["score"]["reused"]
    shutil.copytree(tmp_path / "single" / "finetune", tmp_path / "ranks" / "finetune")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"]
    ranks = _run(_args(tmp_path / "ranks", models_dir, tmp_path / "run1", *args), torchrun)
    assert ranks["stages"]["reference"]["reused"] and not ranks["stages"]["score"]["reused"]
    rows = _scores(ranks)
    assert [r["id"] for r in rows] == [r["id"] for r in _scores(single)]  # pool order
    assert rows == _scores(single)
    assert all(r["loss_ref"] is not None and r["loss_uncond"] is not None for r in rows)
    metas = [json.loads((d / "manifest.json").read_text())["meta"]
             for d in (tmp_path / "ranks" / "losses").iterdir() if d.is_dir()]
    assert len(metas) == 3  # init, ref, uncond: each once for two scorers
    assert all(m["world_size"] == 2 and m["shards_computed"] == 18 for m in metas)
