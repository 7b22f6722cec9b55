import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import TINY
from lobass.config import package_data
from lobass.data import Example, read_examples
from lobass.formatting import response_only, tokenize_example
from lobass.pipeline import run
from lobass.pool import read_pool, tokenize_pool
from lobass.scoring import (
    SCORERS,
    adapter_state,
    compute_response_losses,
    get_scorer,
    length_batches,
    needed_losses,
    shared_prefix_length,
)
from lobass.scoring.runner import flag_nonfinite, score_rows


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


def _with_random_lora(model):
    """A LoRA adapter with random (non-zero) B matrices, so that L_ref differs from L_init."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    torch.manual_seed(0)
    return get_peft_model(model, config).eval()


def _engine_vs_naive(peft_model, features, budget, prefix):
    """Max abs(engine - naive) for init (adapter off), ref (adapter on), uncond (response alone)."""
    worst = {}
    for loss, rows in (("init", features), ("ref", features),
                       ("uncond", [response_only(f, 1) for f in features])):
        with adapter_state(peft_model, loss):
            fast = compute_response_losses(peft_model, rows, max_tokens_per_batch=budget,
                                           pad_token_id=2, prefix_length=prefix)
            slow = naive_losses(peft_model, rows)
        assert np.isfinite(fast).all()
        worst[loss] = float(np.abs(fast - slow).max())
    return worst


@pytest.mark.parametrize(("budget", "prefix"), [(64, None), (100_000, None), (700, 0)])
def test_engine_matches_per_row_loop_on_tiny_model(tiny, budget, prefix):
    model, tokenizer = tiny
    features = _features(tokenizer, n=7)
    assert features[-1].n_response == 1
    assert len({len(f.input_ids) for f in features}) > 5  # mixed lengths
    peft_model = _with_random_lora(copy.deepcopy(model))
    worst = _engine_vs_naive(peft_model, features, budget, prefix)
    assert max(worst.values()) < 1e-4, worst
    with adapter_state(peft_model, "init"):
        plain = naive_losses(model, features)  # the adapter disabled is the initial model
        np.testing.assert_allclose(naive_losses(peft_model, features), plain, atol=1e-6)


@pytest.mark.slow
def test_engine_matches_per_row_loop_on_embedded_model(smol):
    model, tokenizer = smol
    features = _features(tokenizer, n=4, max_length=96)
    peft_model = _with_random_lora(model)  # injected into the session model: removed below
    try:
        worst = _engine_vs_naive(peft_model, features, 1024, None)
        with adapter_state(peft_model, "init"):
            naive = naive_losses(peft_model, features[:-1])
    finally:
        peft_model.unload()
    assert max(worst.values()) < 1e-4, worst
    assert 0.1 < naive.mean() < 5  # a real instruction model on real Alpaca responses


def test_shared_prefix_is_the_chat_header_and_stops_before_the_response(tiny):
    _, tokenizer = tiny
    features = _features(tokenizer)
    length = shared_prefix_length(features)
    header = tokenizer.decode(features[0].input_ids[:length])
    # SmolLM2's template opens every row with the same default system prompt.
    assert header.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert length < min(f.n_prompt for f in features)
    assert shared_prefix_length([response_only(f, 1) for f in features]) == 0
    assert shared_prefix_length(features[:1]) == features[0].n_prompt - 1


def test_response_only_keeps_the_same_targets(tiny):
    _, tokenizer = tiny
    for f in _features(tokenizer, n=3):
        alone = response_only(f, tokenizer.bos_token_id)
        assert alone.input_ids[1:] == f.input_ids[f.n_prompt:]
        assert [t for t in alone.labels if t != -100] == [t for t in f.labels if t != -100]


def test_length_batches_respect_budget_and_cover_every_row():
    lengths = [5, 100, 37, 37, 64, 1, 250, 12]
    batches = length_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 128


def test_scorers_on_known_losses():
    losses = {"init": np.array([2.0, 1.0, 4.0, 0.5]), "ref": np.array([1.0, 0.9, 3.0, 0.5]),
              "uncond": np.array([4.0, 1.0, 2.0, 0.25])}
    n = np.array([10, 20, 30, 40])
    np.testing.assert_allclose(get_scorer("lobass").compute(losses, n, 0), [0.5, 0.1, 0.25, 0.0])
    np.testing.assert_allclose(get_scorer("rho").compute(losses, n, 0), [1.0, 0.1, 1.0, 0.0])
    np.testing.assert_allclose(get_scorer("loss").compute(losses, n, 0), losses["init"])
    np.testing.assert_allclose(get_scorer("ifd_chat").compute(losses, n, 0), [0.5, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(get_scorer("length").compute(losses, n, 0), n)
    a, b = (get_scorer("random").compute(losses, n, s) for s in (1, 2))
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a, get_scorer("random").compute(losses, n, 1))
    assert SCORERS["lobass"].needs == ("init", "ref") and SCORERS["loss"].needs == ("init",)
    assert SCORERS["ifd_chat"].needs == ("init", "uncond")
    assert SCORERS["ifd"].needs == ("ifd_cond", "ifd_alone")  # Cherry's passes: test_ifd_cherry
    # Several scorers in one run: each loss once.
    assert needed_losses([SCORERS[s] for s in ("lobass", "ifd_chat", "rho", "length")]) == [
        "init", "ref", "uncond"]
    assert needed_losses([SCORERS[s] for s in ("ifd", "loss", "ifd_chat")]) == [
        "ifd_cond", "ifd_alone", "init", "uncond"]
    with pytest.raises(ValueError, match="choose one of"):
        get_scorer("alpagasus")


def test_nonfinite_losses_are_flagged_counted_and_fail_unless_dropped(tiny):
    model, tokenizer = tiny
    features = _features(tokenizer, n=4)
    broken = copy.deepcopy(model)
    with torch.no_grad():  # an overflowed weight, as a float16 run can produce
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    losses = {"init": compute_response_losses(broken, features, max_tokens_per_batch=4096,
                                              pad_token_id=2)}
    losses["init"][1] = 3.0  # one row finite, to check that only the bad ones are flagged
    losses["init"][2:] = compute_response_losses(model, features[2:], max_tokens_per_batch=4096,
                                                 pad_token_id=2)
    ids = [f"r{i}" for i in range(len(features))]
    assert not np.isfinite(losses["init"][0])
    with pytest.raises(ValueError, match=r"1 rows have a non-finite loss.*r0.*on_nonfinite=drop"):
        flag_nonfinite(losses, ids, "error")
    flagged = flag_nonfinite(losses, ids, "drop")
    assert flagged.tolist() == [True] + [False] * (len(features) - 1)
    rows = score_rows(ids, ["a"] * len(ids), features, losses, [SCORERS["loss"]], flagged, 0)
    assert rows[0]["score"] is None and rows[0]["nonfinite"] and rows[0]["loss_init"] is None
    assert rows[1]["score"] == 3.0 and "nonfinite" not in rows[1]


def test_exclude_eos_leaves_the_end_token_out_of_the_mean_exactly(make_cfg, tiny):
    """score.exclude_eos: each row's loss equals a slow per-row loss over the response tokens
    without the last one (the end of turn), and truncated rows keep every token."""
    import torch

    from lobass.formatting import IGNORE_INDEX
    from lobass.scoring.runner import without_end_token

    model, tokenizer = tiny
    plain = run(make_cfg(*TINY, "scorer=loss", "stages=[score]"))
    dropped = run(make_cfg(*TINY, "scorer=loss", "stages=[score]", "score.exclude_eos=true"))
    assert dropped["artifacts"]["scores"] != plain["artifacts"]["scores"]
    rows = [json.loads(x) for x in Path(dropped["artifacts"]["scores"]).read_text().splitlines()]
    cfg = make_cfg(*TINY)
    examples, _ = read_pool(cfg.data)
    pool, _ = tokenize_pool(cfg, examples, tokenizer, model_id="unused here")
    by_id = {r["id"]: r for r in rows}
    checked = 0
    for example, f in zip(pool.examples, pool.features, strict=True):
        g = without_end_token(f)
        assert (g is f) == f.truncated  # untruncated rows lose exactly their last label
        if g is f:
            continue
        assert g.labels[-1] == IGNORE_INDEX and g.labels[:-1] == f.labels[:-1]
        with torch.no_grad():
            logits = model(torch.tensor([g.input_ids])).logits[0, :-1]
        targets = torch.tensor(g.labels[1:])
        slow = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
        assert by_id[example.id]["loss_init"] == pytest.approx(float(slow), abs=1e-4)
        checked += 1
    assert checked >= 10
