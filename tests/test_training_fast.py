"""The response-only training loss is the same training as the model's own loss, with less work.

Real shipped Alpaca rows, the tiny random Llama, LoRA dropout on (0.05, the GPU recipe's and the
committed CPU studies' value; the CPU default is 0): the fast
path (``train_lora``) and the plain ``Trainer`` loop with ``model(labels=...)``
(``response_only=False``) must log the same per-step losses within 1e-4 over 24 steps, end with
adapters that load in plain peft and agree, and the LM head must see exactly the positions that
predict a response token.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF
from lobass.config import package_data, with_defaults
from lobass.data import read_examples
from lobass.formatting import IGNORE_INDEX, tokenize_example
from lobass.modeling import load_model, load_tokenizer, resolve_model_path
from lobass.response_loss import ResponseLoss
from lobass.training import train_lora

STEPS, BATCH = 24, 2


@pytest.fixture
def setup(models_dir):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=[
            "model=tiny_random", f"reference.max_steps={STEPS}", f"reference.batch_size={BATCH}",
            "reference.logging_steps=1", "reference.save_steps=1000",
            "reference.lora.dropout=0.05"]))  # masks drawn in the same order both ways
    path, _ = resolve_model_path(cfg.model, models_dir)
    tokenizer = load_tokenizer(cfg.model, path)
    examples, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca",
                                max_rows=STEPS * BATCH)
    features = [tokenize_example(e, tokenizer, "chat", 128) for e in examples]
    return cfg, path, tokenizer, features


def _train(setup, work: Path, fast: bool) -> list[float]:
    cfg, path, tokenizer, features = setup
    train_lora(load_model(cfg.model, path), tokenizer, features, cfg.reference,
               list(cfg.model.lora_targets), work, seed=0, response_only=fast)
    return [e["loss"] for e in json.loads((work / "log_history.json").read_text())]


def test_fast_path_logs_the_plain_loops_losses_and_saves_a_peft_adapter(setup, tmp_path):
    from peft import PeftModel

    plain = _train(setup, tmp_path / "plain", fast=False)
    fast = _train(setup, tmp_path / "fast", fast=True)
    assert len(fast) == len(plain) == STEPS
    assert fast == pytest.approx(plain, abs=1e-4)
    assert plain[0] != plain[-1]  # it trained: the comparison is not between constants

    cfg, path, _, features = setup
    ids = torch.tensor([features[0].input_ids])
    logits = []
    for name in ("plain", "fast"):
        model = PeftModel.from_pretrained(load_model(cfg.model, path),
                                          str(tmp_path / name / "adapter")).eval()
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)


def test_lm_head_sees_only_response_positions(setup):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from lobass.modeling import lora_config

    cfg, path, tokenizer, features = setup
    model = get_peft_model(load_model(cfg.model, path),
                           lora_config(cfg.reference.lora, list(cfg.model.lora_targets)))
    loss = ResponseLoss(model)
    seen: list[int] = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:-1].numel()))
    collate = loss.collate(DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                  label_pad_token_id=IGNORE_INDEX))
    batch = collate([{"input_ids": f.input_ids, "labels": f.labels} for f in features[:4]])
    labels = batch.pop("labels")
    outputs = model(**batch)
    value = loss(outputs, labels)
    handle.remove()
    loss.remove()
    response = sum(f.n_response for f in features[:4])
    # The model's own forward ran the head on no position; ResponseLoss ran it on the rows
    # predicting a response token (each row's first response token is predicted by its prompt).
    assert outputs.logits.shape[1] == 0
    assert seen == [0, response]
    with torch.no_grad():
        reference = model(**{k: v for k, v in batch.items() if k != "logits_to_keep"},
                          labels=labels).loss
    torch.testing.assert_close(value, reference, atol=1e-5, rtol=0)


def test_response_loss_refuses_an_adapted_head(setup):
    from peft import get_peft_model

    from lobass.modeling import lora_config

    cfg, path, _, _ = setup
    model = get_peft_model(load_model(cfg.model, path),
                           lora_config(cfg.reference.lora, ["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head in model.lora_targets"):
        ResponseLoss(model)


def test_micro_batches_make_the_same_optimizer_steps_in_smaller_forward_passes(setup, tmp_path):
    """``micro_batch_size`` splits each step's rows (less activation memory), same training.

    LoRA dropout is off, so the only difference left is float rounding: the per-step losses and
    the trained adapters must agree, while no forward pass holds more than the micro-batch.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    cfg, path, tokenizer, features = setup
    widths: dict[str, set[int]] = {}
    losses, weights = {}, {}
    for micro in (None, 2, 1):
        recipe = OmegaConf.merge(cfg.reference, {"batch_size": 4, "micro_batch_size": micro,
                                                 "max_steps": 6, "lora": {"dropout": 0.0},
                                                 "share_prefix": False})  # whole rows per pass
        model = load_model(cfg.model, path)
        seen = widths.setdefault(str(micro), set())
        # On the decoder: peft 0.18 calls the base model's forward() directly, past hooks
        # on the model itself (0.21 calls the model; lowest-direct run)
        model.get_decoder().register_forward_pre_hook(
            lambda _m, _args, kwargs, seen=seen: seen.add(int(kwargs["input_ids"].shape[0])),
            with_kwargs=True)
        work = tmp_path / f"micro{micro}"
        train_lora(model, tokenizer, features, recipe, list(cfg.model.lora_targets), work,
                   seed=0)
        losses[micro] = [e["loss"] for e in json.loads((work / "log_history.json").read_text())]
        weights[micro] = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    assert widths == {"None": {4}, "2": {2}, "1": {1}}
    assert len(losses[None]) == 6 and losses[None][0] != losses[None][-1]
    for micro in (2, 1):
        assert losses[micro] == pytest.approx(losses[None], abs=1e-5)
        for name, tensor in weights[None].items():
            torch.testing.assert_close(weights[micro][name], tensor, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("batch", "cap", "rows"), [
    (8, None, 8), (4, 2, 2), (8, 2, 2), (3, 2, 1), (1, 2, 1), (8, 3, 2), (6, 4, 3), (4, 8, 4)])
def test_micro_batch_size_caps_the_rows_per_pass_at_a_divisor_of_the_batch(batch, cap, rows):
    """A cap, so the CPU default (2) works with any batch size; passes of a step stay equal."""
    from conftest import train_recipe
    from lobass.finetune import weights_recipe
    from lobass.training import rows_per_pass, training_plan

    recipe = train_recipe(batch_size=batch, micro_batch_size=cap, grad_accum=1, logging_steps=1)
    assert rows_per_pass(recipe) == rows
    plan = training_plan(recipe, world=1)
    assert (plan.rows_per_pass, plan.passes_per_step, plan.rows_per_step) == (rows, batch // rows,
                                                                               batch)
    # The artifact key names the rows a pass holds, and nothing when the batch is not split.
    assert weights_recipe(recipe).get("micro_batch_size") == (None if rows == batch else rows)


@pytest.mark.slow
def test_compiled_decoder_layers_train_the_same_steps_and_are_handed_back_eager(setup, tmp_path):
    """``train.compile``: the loop runs compiled decoder layers, and the same training.

    After the loop the layers are eager again, so scoring and generation in the same process
    never meet a compiled layer; compiled or not, the per-step
    losses and the adapters agree to float rounding, and only ``compile: true`` enters the key.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from lobass.compilation import decoder_layers
    from lobass.finetune import weights_recipe

    class Seen(TrainerCallback):
        def __init__(self, model: torch.nn.Module) -> None:
            self.model, self.states = model, set()

        def on_step_end(self, args, state, control, **kwargs):
            layers = decoder_layers(self.model)
            self.states.add(all(la._compiled_call_impl is not None for la in layers))

    cfg, path, tokenizer, features = setup
    losses, weights, seen = {}, {}, {}
    for compiled in (False, True):
        recipe = OmegaConf.merge(cfg.reference, {"batch_size": 4, "micro_batch_size": 2,
                                                 "max_steps": 6, "compile": compiled,
                                                 "lora": {"dropout": 0.0}})
        assert ("compile" in weights_recipe(recipe)) is compiled
        model = load_model(cfg.model, path)
        callback = Seen(model)
        work = tmp_path / f"compiled{compiled}"
        train_lora(model, tokenizer, features, recipe, list(cfg.model.lora_targets), work,
                   seed=0, callbacks=[callback])
        seen[compiled] = callback.states
        assert all(la._compiled_call_impl is None for la in decoder_layers(model))
        losses[compiled] = [e["loss"] for e in json.loads((work / "log_history.json").read_text())]
        weights[compiled] = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    assert seen == {False: {False}, True: {True}}
    assert len(losses[True]) == 6 and losses[False][0] != losses[False][-1]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_layers_with_a_shared_prefix_compile_every_layer(setup, models_dir, tmp_path):
    """``compile`` with ``share_prefix`` on more layers than dynamo's default limit (8 graphs).

    Each pass reads the prefix's cache at the layer's own index, a constant to dynamo, so each
    layer compiles its own graph. Every layer must run compiled: a layer that would fall back to
    eager at the limit fails the test (``fail_on_recompile_limit_hit``). The prefix's own pass
    runs eager (no second graph per layer), and the losses are the eager loop's.
    """
    from omegaconf import OmegaConf
    from torch._dynamo.utils import counters

    _, _, tokenizer, features = setup
    layers = 10
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=[
            "model=tiny_random", f"model.random_init.llama.num_hidden_layers={layers}",
            "reference.logging_steps=1", "reference.save_steps=1000"]))
    path, _ = resolve_model_path(cfg.model, models_dir)
    losses, graphs = {}, {}
    for compiled in (False, True):
        recipe = OmegaConf.merge(cfg.reference, {
            "batch_size": 4, "micro_batch_size": 2, "max_steps": 2, "compile": compiled,
            "share_prefix": True, "lora": {"dropout": 0.0}})
        model = load_model(cfg.model, path)
        assert model.config.num_hidden_layers == layers
        before = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            train_lora(model, tokenizer, features, recipe, list(cfg.model.lora_targets),
                       tmp_path / f"compiled{compiled}", seed=0)
        graphs[compiled] = counters["stats"]["unique_graphs"] - before
        log = json.loads((tmp_path / f"compiled{compiled}" / "log_history.json").read_text())
        losses[compiled] = [e["loss"] for e in log]
    assert graphs[False] == 0
    assert layers <= graphs[True] <= layers + 4  # one per layer (and none for the prefix pass)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.slow
def test_shared_prefix_is_encoded_once_per_step_and_trains_the_same_steps(setup, tmp_path):
    """``share_prefix``: each optimiser step encodes the rows' common prefix once, same training.

    Steps of 4 rows in passes of 2 (the prefix's gradient collects over two passes), 20 steps
    on real rows, no LoRA dropout: the per-step losses equal the plain loop's (the model's own
    loss over whole rows) within 1e-4 and the adapters agree; the decoder ran the prefix alone
    once per step and every pass without it. Only an applied ``share_prefix`` enters the key.
    """
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from lobass.finetune import weights_recipe
    from lobass.shared_prefix import shared_prefix_length

    cfg, path, tokenizer, features = setup
    prefix = shared_prefix_length(features)
    assert prefix >= 8  # the chat template's system prompt: the test shares something
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"  # as Gemma's: the shared path pads its own batches right
    steps = 20
    losses, weights, widths = {}, {}, {}
    for way in ("plain", "shared", "unshared"):
        recipe = OmegaConf.merge(cfg.reference, {
            "batch_size": 4, "micro_batch_size": 2, "max_steps": steps,
            "lora": {"dropout": 0.0}, "share_prefix": way == "shared"})
        model = load_model(cfg.model, path)
        seen = widths.setdefault(way, [])
        model.get_decoder().register_forward_pre_hook(
            lambda _m, _args, kwargs, seen=seen: seen.append(tuple(kwargs["input_ids"].shape)),
            with_kwargs=True)
        work = tmp_path / way
        train_lora(model, tokenizer, features, recipe, list(cfg.model.lora_targets), work,
                   seed=0, response_only=way != "plain")
        losses[way] = [e["loss"] for e in json.loads((work / "log_history.json").read_text())]
        weights[way] = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    assert widths["shared"].count((1, prefix)) == steps  # the prefix alone, once per step
    passes = [w for w in widths["shared"] if w != (1, prefix)]
    assert len(passes) == 2 * steps and len(widths["plain"]) == 2 * steps
    for short, whole in zip(passes, widths["plain"], strict=True):  # same batches, prefix cut
        assert short == (whole[0], whole[1] - prefix)
    assert len(losses["shared"]) == steps and losses["plain"][0] != losses["plain"][-1]
    for way in ("shared", "unshared"):
        assert losses[way] == pytest.approx(losses["plain"], abs=1e-4)
    for name, tensor in weights["unshared"].items():
        torch.testing.assert_close(weights["shared"][name], tensor, atol=1e-5, rtol=1e-4)
    assert tokenizer.padding_side == "left"  # the caller's tokenizer is not changed
    on = OmegaConf.merge(cfg.reference, {"lora": {"dropout": 0.0}, "share_prefix": True})
    assert weights_recipe(on)["share_prefix"] is True
    for off in ({"share_prefix": False}, {"lora": {"dropout": 0.05}},
                {"gradient_checkpointing": True}):
        assert "share_prefix" not in weights_recipe(OmegaConf.merge(on, off))


def test_shared_prefix_refuses_rows_that_label_a_prefix_token(setup, tmp_path):
    """A row whose labels reach into the shared prefix would lose that loss: it is refused."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    cfg, path, tokenizer, features = setup
    labelled = [replace(f, labels=list(f.input_ids)) for f in features[:4]]  # prompt labelled
    recipe = OmegaConf.merge(cfg.reference, {"batch_size": 4, "max_steps": 1,
                                             "lora": {"dropout": 0.0}, "share_prefix": True})
    with pytest.raises(RuntimeError, match="labels a token inside its shared prefix"):
        train_lora(load_model(cfg.model, path), tokenizer, labelled, recipe,
                   list(cfg.model.lora_targets), tmp_path, seed=0)
