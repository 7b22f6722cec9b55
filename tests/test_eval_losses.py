"""The eval stage's per-row losses go through the batched scoring engine and equal the slow path.

Every reference-answer set of the shipped CPU eval config (held-out Alpaca rows, MT-Bench and
AlpacaEval reference answers), tokenised as the stage does, scored the way ``evaluate`` scores
them (``_losses`` with the engine: length batches, shared prefix, response-only head) and row by
row with the model's own ``model(labels=...)`` loss, on a merged LoRA adapter.
"""

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF
from lobass.config import with_defaults
from lobass.evaluation import suite
from lobass.evaluation.stage import _losses
from lobass.formatting import tokenize_example
from lobass.modeling import load_model, load_tokenizer, lora_config, resolve_model_path
from lobass.scoring import compute_response_losses, shared_prefix_length


def test_eval_losses_equal_the_per_row_slow_path(models_dir):
    from peft import get_peft_model

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=["model=tiny_random",
                                                       "eval.heldout.max_rows=12"]))
    path, _ = resolve_model_path(cfg.model, models_dir)
    tokenizer = load_tokenizer(cfg.model, path)
    torch.manual_seed(0)
    model = get_peft_model(load_model(cfg.model, path),
                           lora_config(cfg.train.lora, list(cfg.model.lora_targets)))
    for name, module in model.named_modules():  # a non-zero adapter: merging must matter
        if name.endswith("lora_B.default"):
            torch.nn.init.normal_(module.weight, std=0.05)
    model = model.merge_and_unload().eval()
    sets = suite.reference_sets(cfg.eval)
    assert len(sets) >= 2
    for name, examples in sets.items():
        features = [tokenize_example(e, tokenizer, cfg.model.template, cfg.data.max_length)
                    for e in examples[:12]]
        assert shared_prefix_length(features) > 0, name  # the prefix reuse is exercised
        fast = _losses(compute_response_losses, model, features, 256)  # several batches
        with torch.no_grad():
            slow = [model(input_ids=torch.tensor([f.input_ids]),
                          labels=torch.tensor([f.labels])).loss.item() for f in features]
        assert fast.tolist() == pytest.approx(slow, abs=1e-4), name
