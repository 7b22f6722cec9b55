"""A W&B run a researcher can read: a curve per fine-tune, our config on top, outputs logged."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, wandb_records
from lobass.pipeline import run
from lobass.tracking import sweep_point_name


def _history(records):
    """Each history row as ``{key: json value}``."""
    return [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.mark.slow
def test_wandb_run_has_a_curve_per_fine_tune_our_config_and_the_outputs(make_cfg, monkeypatch,
                                                                         tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run(make_cfg(*TINY, "logger=wandb", "reference.logging_steps=1",
                           "train.logging_steps=1"))
    import wandb

    wandb.teardown()  # the service writes the run's file after finish() returns: wait for it
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    rows = _history(records)
    reference = [int(r["reference/step"]) for r in rows if "reference/train/loss" in r]
    final = [int(r["finetune/step"]) for r in rows if "finetune/train/loss" in r]
    assert reference == [1, 2, 3, 4] and final == [1, 2, 3]  # each on its own axis
    # no shared, restarting curve: train/loss is the run's summary value, logged once
    assert sum("train/loss" in r for r in rows) == 1
    config_keys = {item.key for r in records for item in (
        r.config.update if r.WhichOneof("record_type") == "config" else
        r.run.config.update if r.WhichOneof("record_type") == "run" else [])}
    assert {"seed", "reference/training_args", "finetune/training_args", "provenance"} <= \
        config_keys
    # transformers' arguments and the model's config are not merged over lobass's keys
    assert not config_keys & {"num_train_epochs", "learning_rate", "per_device_train_batch_size",
                              "model_type", "vocab_size"}
    artifacts = {r.artifact.name: r.artifact.type for r in records
                 if r.WhichOneof("record_type") == "artifact"}
    assert artifacts.get("adapter") == "model" and artifacts.get("reference_adapter") == "model"
    logged = {k.removesuffix("/_type"): json.loads(v) for r in rows for k, v in r.items()
              if k.endswith("/_type")}  # W&B objects, flattened: <key>/_type names their kind
    assert logged["generations/vicuna"] == logged["score/sample"] == "table-file"
    assert logged["score/loss_init"] == logged["score/score"] == "histogram"
    assert summary["artifacts"]["generations/vicuna"].endswith(".jsonl")


@pytest.mark.slow
def test_sweep_points_are_named_by_their_overrides_and_grouped_by_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "debug=tiny", "logger=wandb",
         "stages=[select]", "scorer=length", "selection.ratio=0.25,0.5",
         f"artifacts_dir={tmp_path}/artifacts", f"hydra.sweep.dir={sweep}"],
        check=True, capture_output=True, cwd=ROOT, timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = {}
    for log in sweep.glob("*/wandb/offline-run-*/run-*.wandb"):
        (record,) = [r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run"]
        runs[record.display_name] = record.run_group
    common = "debug=tiny,logger=wandb,scorer=length,selection.ratio={},stages=[select]"
    assert runs == {common.format(0.25): "sweep", common.format(0.5): "sweep"}
    assert sweep_point_name() == (None, None)  # a single run keeps W&B's own name
