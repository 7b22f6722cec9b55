"""The pretrained Gemma 3 270M base (GGUF package, 262k vocabulary, Alpaca template)."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF
from lobass.config import package_data, with_defaults
from lobass.data import read_examples
from lobass.formatting import tokenize_example
from lobass.modeling import load_model, load_tokenizer, resolve_model_path
from lobass.scoring import compute_response_losses


@pytest.mark.slow  # the one-time GGUF conversion takes ~90 s here
def test_gemma_base_model_scores_alpaca_rows_exactly(models_dir):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=["model=gemma3_270m"]))
    path, _ = resolve_model_path(cfg.model, models_dir)
    model, tokenizer = load_model(cfg.model, path), load_tokenizer(cfg.model, path)
    assert model.config.vocab_size == 262144 and not tokenizer.chat_template
    examples, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca", max_rows=4)
    features = [tokenize_example(e, tokenizer, cfg.model.template, 192) for e in examples]
    for f in features:  # Gemma needs BOS; Alpaca's prompt; EOS closes the response
        assert f.input_ids[0] == tokenizer.bos_token_id
        assert f.input_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(f.input_ids[: f.n_prompt]).endswith("### Response:\n")
    batched = compute_response_losses(model, features, max_tokens_per_batch=1024,
                                      pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        naive = np.array([model(input_ids=torch.tensor([f.input_ids]),
                                labels=torch.tensor([f.labels])).loss.item() for f in features])
    np.testing.assert_allclose(batched, naive, atol=1e-4, rtol=0)
    assert 0.5 < naive.mean() < 5  # a pretrained LM on Alpaca answers, far below ln(262144)
