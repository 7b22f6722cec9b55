"""Pinned training: a fixed-seed tiny-model run must give these exact first losses.

torchtune's habit: any change that moves training (data order, masking, LoRA init, the optimiser,
the artifact that is reused) shows here as a number, not as a vague drift in a study. The values
were recorded from the pipeline before the stage bodies moved out of ``pipeline.py``.
"""

import json
from pathlib import Path

import pytest

from conftest import TINY
from lobass.pipeline import run

# reference: 32 rows (24 Alpaca + 8 GSM8K), batch 8, 4 steps; train: the top 8 rows, batch 4,
# 3 steps
REFERENCE_LOSSES = [10.819872856140137, 10.814119338989258, 10.788848876953125, 10.809741973876953]
# Step 3 is the first step of the second epoch (8 rows / 4 = 2 steps per epoch): its batch order
# comes from EpochSeededLengthSampler (seed + epoch) since issue 15, which made resume exact.
TRAIN_LOSSES = [10.819191932678223, 10.79804515838623, 10.800477027893066]


def _losses(adapter: str) -> list[float]:
    history = json.loads((Path(adapter).parent / "log_history.json").read_text())
    return [entry["loss"] for entry in history]


def test_fixed_seed_tiny_training_gives_pinned_losses(make_cfg, tiny):
    summary = run(make_cfg(*TINY, "stages=[train]", "reference.logging_steps=1"))
    assert _losses(summary["artifacts"]["reference_adapter"]) == pytest.approx(
        REFERENCE_LOSSES, abs=1e-4)
    assert _losses(summary["artifacts"]["adapter"]) == pytest.approx(TRAIN_LOSSES, abs=1e-4)
    assert summary["metrics"]["train/steps"] == 3 and summary["metrics"]["reference/steps"] == 4
