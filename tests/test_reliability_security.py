"""Secrets (issues 8 and 15): API keys never reach any output of a run.

Keys planted in the environment: the whole pipeline runs through ``run.py`` (so Hydra saves its
config) with W&B on (offline), then every byte the run wrote is searched: summary.json, Hydra's
saved config and log, W&B's offline run files, the artifacts, and the process's own output.
Keys typed into the config: ``run.py`` refuses them before Hydra writes anything, without
echoing them (the in-process checks are in ``tests/test_configs.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY

PLANTED = {
    "OPENAI_API_KEY": "sk-test-PLANTED-123",
    "WANDB_API_KEY": "PLANTEDwandb" + "0" * 29,  # W&B keys are 40 characters
    "HF_TOKEN": "hf_PLANTEDhuggingfacetoken",
    "ANTHROPIC_API_KEY": "sk-ant-PLANTED-456",
}


@pytest.mark.slow
def test_planted_keys_appear_in_no_output_of_a_full_run(tmp_path, models_dir):
    env = {**os.environ, **PLANTED, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run_dir, artifacts = tmp_path / "hydra_run", tmp_path / "artifacts"
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *[o for o in TINY if o != "logger=none"],
         "logger=wandb", f"artifacts_dir={artifacts}", f"models_dir={models_dir}",
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output.decode(errors="replace")[-3000:]
    # The run wrote what we are about to search.
    assert (run_dir / "summary.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    files = [p for root in (run_dir, artifacts, models_dir) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 20
    for name, secret in PLANTED.items():
        assert secret.encode() not in output, f"{name} in the process output"
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, f"{name} leaked into {leaked}"


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["judge=openai_compatible", f"eval.judge.api_key_env={PLANTED['OPENAI_API_KEY']}"],
    [f"+eval.judge.api_key={PLANTED['ANTHROPIC_API_KEY']}"],
    ["-m", f"data.name=alpaca,{PLANTED['HF_TOKEN']}"],  # one point of a sweep
    # issue 27: a password in a URL reached config.yaml, .hydra/, W&B and the log
    ["judge=openai_compatible", "eval.judge.base_url=https://alice:PLANTEDpw9@judge.example.com"],
], ids=["key_in_api_key_env", "api_key_option", "sweep_point", "password_in_url"])
def test_a_key_typed_into_the_config_stops_run_py_before_anything_is_written(tmp_path,
                                                                            overrides):
    secret = overrides[-1].split("=", 1)[1].split(",")[-1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *overrides, "model=tiny_random", "logger=none",
         f"artifacts_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}",
         f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=tmp_path, env=env, capture_output=True, timeout=300)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 1, output[-3000:]
    assert "looks like a secret" in output and "environment variables only" in output
    assert secret not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no .hydra/, no cache
