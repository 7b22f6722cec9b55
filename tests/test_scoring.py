import numpy as np
import pytest
import torch

from lobass.config import package_data
from lobass.data import Example, read_examples
from lobass.formatting import tokenize_example
from lobass.scoring import SCORERS, compute_response_losses, get_scorer, length_batches


def _features(tokenizer, n=10, max_length=160):
    alpaca, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca", max_rows=n)
    one_token = Example("one", ({"role": "user", "content": "Say nothing."},
                                {"role": "assistant", "content": ""}), "t", {})
    rows = [tokenize_example(e, tokenizer, "chat", max_length) for e in alpaca]
    # A response of exactly one token: just the end-of-turn token.
    rows.append(tokenize_example(one_token, tokenizer, "chat", max_length))
    return rows


def naive_losses(model, features):
    """The obvious slow path: one row at a time through model(..., labels=...)."""
    out = []
    with torch.inference_mode():
        for f in features:
            ids = torch.tensor([f.input_ids])
            out.append(model(input_ids=ids, labels=torch.tensor([f.labels])).loss.item())
    return np.array(out)


@pytest.mark.parametrize("budget", [64, 700, 100_000])
def test_batched_losses_match_per_row_loop_on_tiny_model(tiny, budget):
    model, tokenizer = tiny
    features = _features(tokenizer)
    assert features[-1].n_response == 1
    assert len({len(f.input_ids) for f in features}) > 5  # mixed lengths
    batched = compute_response_losses(model, features, max_tokens_per_batch=budget,
                                      pad_token_id=tokenizer.pad_token_id)
    np.testing.assert_allclose(batched, naive_losses(model, features), atol=1e-4, rtol=0)


def test_batched_losses_match_per_row_loop_on_embedded_model(smol):
    model, tokenizer = smol
    features = _features(tokenizer, n=5, max_length=96)
    batched = compute_response_losses(model, features, max_tokens_per_batch=1024,
                                      pad_token_id=tokenizer.pad_token_id)
    naive = naive_losses(model, features)
    np.testing.assert_allclose(batched, naive, atol=1e-4, rtol=0)
    assert 0.1 < naive.mean() < 5  # a real instruction model on real Alpaca responses


def test_length_batches_respect_budget_and_cover_every_row():
    lengths = [5, 100, 37, 37, 64, 1, 250, 12]
    batches = length_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 128


def test_scorers_on_known_losses():
    losses = {"init": np.array([2.0, 1.0, 4.0, 0.5]), "ref": np.array([1.0, 0.9, 3.0, 0.5])}
    n = np.array([10, 20, 30, 40])
    np.testing.assert_allclose(get_scorer("lobass").compute(losses, n, 0), [0.5, 0.1, 0.25, 0.0])
    np.testing.assert_allclose(get_scorer("rho").compute(losses, n, 0), [1.0, 0.1, 1.0, 0.0])
    np.testing.assert_allclose(get_scorer("loss").compute(losses, n, 0), losses["init"])
    np.testing.assert_allclose(get_scorer("length").compute(losses, n, 0), n)
    a, b = (get_scorer("random").compute(losses, n, s) for s in (1, 2))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a, get_scorer("random").compute(losses, n, 1))
    assert SCORERS["lobass"].needs == ("init", "ref") and SCORERS["loss"].needs == ("init",)
    with pytest.raises(ValueError, match="choose one of"):
        get_scorer("alpagasus")
