"""The per-stage memory estimate (lobass.memory) against figures worked out by hand.

LLaMA-7B: h 4096, MLP 11008, vocabulary 32000, 32 layers, 32 key/value heads of 128.
LLaMA-13B: h 5120, MLP 13824, vocabulary 32000, 40 layers, 40 key/value heads of 128.
The recipes are the paper's: lora_gpu (batch 8 x 512 tokens, checkpointing), score=gpu (16384
tokens per batch), eval=gpu (lm-eval batch auto, 16 answers of 512 + 1024 tokens), bf16.
"""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF
from lobass.config import with_defaults
from lobass.data import read_examples
from lobass.formatting import tokenize_example
from lobass.memory import (
    GIB,
    InsufficientMemoryError,
    architecture_config,
    check_memory,
    estimate_memory,
    layer_activation_bytes,
    model_shape,
    scoring_activation_bytes,
)
from lobass.scoring.engine import head_chunk

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPE = ["data=alpaca", "reference=lora_gpu", "train=lora_gpu", "score=gpu", "eval=gpu"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return with_defaults(compose(config_name="config", overrides=list(overrides)))


def _shape(cfg):
    return model_shape(architecture_config(cfg.model), list(cfg.model.lora_targets), 16)


def _by_hand(h, inter, vocab, layers):
    """Sizes of a LLaMA of these dimensions (multi-head attention, untied embeddings)."""
    layer_params = 4 * h * h + 3 * h * inter + 2 * h  # attention, SwiGLU MLP, two RMSNorms
    n_params = 2 * vocab * h + layers * layer_params + h  # embeddings, LM head, final norm
    n_lora = layers * 16 * (4 * (h + h) + 3 * (h + inter))  # r x (in + out) per projection
    adapted_inputs = 6 * h + inter  # q, k, v, o, gate, up read h features; down reads I
    layer = 36 * h + 4 * h + 10 * inter + 4 * adapted_inputs  # autograd bytes per token, bf16
    kv_token = layers * 2 * h * 2  # keys and values of every layer, bf16
    transient = (4 * h + 2 * h + 3 * inter) * 2  # one layer's forward tensors per token
    return layer_params, n_params, n_lora, layer, kv_token, transient


def test_every_stage_of_the_7b_recipe_by_hand():
    cfg = _compose("model=llama_7b", *RECIPE)
    h, inter, vocab, layers = 4096, 11008, 32000, 32
    layer_params, n_params, n_lora, layer, kv_token, transient = _by_hand(h, inter, vocab, layers)
    shape = _shape(cfg)
    assert (shape.n_params, shape.n_lora, shape.layer_params) == (
        n_params, n_lora, layer_params) == (6_738_415_616, 39_976_960, 202_383_360)

    est = estimate_memory(cfg, shape, world=1, on_cuda=True)
    assert list(est.stages) == ["reference", "train", "score", "eval"]  # no vLLM: backend hf
    weights = 2 * n_params
    # reference / train: weights + fp32 LoRA weight, grad, Adam m and v + checkpointed activations
    activations = 8 * 512 * (layers * h * 2 + layer + 12 * vocab)
    assert est.stages["train"].parts == {"weights": weights, "LoRA state": 16 * n_lora,
                                         "activations": activations, "runtime": GIB}
    assert est.stages["train"].total == 19_541_794_816  # 18.2 GiB: a 24 GB card
    assert est.stages["reference"] == est.stages["train"].__class__("reference",
                                                                    est.stages["train"].parts)
    # score: whole model + bf16 reference adapter (the model's dtype for inference) + one
    # 16k-token batch + one LM-head chunk
    scoring = 16384 * (transient + 2 * h * 2) + 64 * vocab * (2 + 4 + 4)
    assert scoring == 2_176_352_256  # 2.0 GiB (the old estimate: full logits and K/V, 14 GiB)
    assert est.stages["score"].parts == {"weights": weights, "adapter": 2 * n_lora,
                                         "activations": scoring, "runtime": GIB}
    # eval: the largest step is the judge's answers, 16 rows of 512 + 1024 tokens of cache
    generation = 16 * 1536 * kv_token + 16 * 512 * transient + 16 * vocab * 8
    assert est.stages["eval"].parts == {"weights": weights, "generation": generation,
                                        "runtime": GIB}
    assert est.stages["eval"].total == 28_383_289_344  # 26.4 GiB: a 40 GB card
    assert est.peak.stage == "eval" and est.total == 28_383_289_344


def test_13b_fits_80gb_and_vllm_and_fsdp_are_counted_honestly():
    h, inter, vocab, layers = 5120, 13824, 32000, 40
    layer_params, n_params, n_lora, layer, kv_token, transient = _by_hand(h, inter, vocab, layers)
    assert n_params == 13_015_864_320
    cfg = _compose("model=llama_13b", *RECIPE)
    shape = _shape(cfg)
    est = estimate_memory(cfg, shape, world=1, on_cuda=True)
    train = 2 * n_params + 16 * n_lora + 8 * 512 * (layers * h * 2 + layer + 12 * vocab) + GIB
    generation = 16 * 1536 * kv_token + 16 * 512 * transient + 16 * vocab * 8
    assert est.stages["train"].total == train == 33_492_346_880  # 31.2 GiB
    assert est.stages["eval"].total == 2 * n_params + generation + GIB == 48_425_019_392
    assert est.total / GIB < 79  # an 80 GB card (79.2 GiB usable on an A100/H100 80GB)

    # lm-eval at a fixed batch 64 (the old eval=gpu): 64 rows x 2048 tokens of cache, 100 GiB
    fixed = estimate_memory(_compose("model=llama_13b", *RECIPE, "eval.gsm8k.batch_size=64"),
                            shape, 1, True)
    assert fixed.stages["eval"].parts["gsm8k"] == (64 * 2048 * kv_token + 64 * 1792 * transient
                                                   + 64 * vocab * 8)
    assert fixed.stages["eval"].total / GIB > 120

    # vLLM: its own weights and one 2048-token sequence beside the merged model still held
    vllm = estimate_memory(_compose("model=llama_13b", *RECIPE, "eval.backend=vllm"), shape, 1,
                           True).stages["eval/vllm"]
    assert vllm.total == 2 * (2 * n_params) + 2 * n_lora + 2048 * kv_token + 2 * GIB + GIB

    # FSDP over 4 GPUs: a quarter of weights and LoRA state, plus what is gathered while a layer
    # runs (embeddings, LM head, final norm, the running and the prefetched layer); scoring and
    # eval still hold the whole model on every GPU.
    fsdp = estimate_memory(_compose("model=llama_13b", *RECIPE, "train=lora_gpu_fsdp",
                                    "reference=lora_gpu_fsdp"), shape, 4, True)
    gathered = (n_params - layers * layer_params + 2 * layer_params) * 2
    assert fsdp.stages["train"].parts["weights"] == 2 * n_params // 4 + gathered
    assert fsdp.stages["train"].parts["LoRA state"] == 16 * n_lora // 4
    assert fsdp.stages["score"].parts["weights"] == 2 * n_params
    ds = estimate_memory(_compose("model=llama_13b", *RECIPE, "train=lora_gpu_deepspeed",
                                  "reference=lora_gpu_deepspeed"), shape, 4, True)
    assert ds.stages["train"].parts["weights"] == fsdp.stages["train"].parts["weights"]
    ddp = estimate_memory(cfg, shape, 4, True)  # plain data parallel: nothing is divided
    assert ddp.stages["train"] == est.stages["train"]


def test_stages_follow_cfg_stages_and_no_pass_keeps_a_cache():
    cfg = _compose("model=llama_7b", *RECIPE, "stages=[score]")
    shape = _shape(cfg)
    assert list(estimate_memory(cfg, shape, 1, False).stages) == ["reference", "score"]
    plain = estimate_memory(_compose("model=llama_7b", *RECIPE, "stages=[score]",
                                     "score.share_prefix=false"), shape, 1, False)
    # the no-prefix path runs with use_cache=False: no layer's keys and values outlive it
    assert plain.stages["score"] == estimate_memory(cfg, shape, 1, False).stages["score"]


@pytest.mark.parametrize("model_type,kv_heads", [("llama", 2), ("gemma", 1)])
def test_activation_coefficients_match_autograds_saved_tensors(model_type, kv_heads):
    """The per-layer formula against what autograd keeps (bf16, LoRA with dropout, CPU).

    Saved tensors are collected with saved_tensors_hooks and counted once per storage; the
    difference between a 2-layer and a 1-layer model is one layer's share, so embeddings, logits
    and the loss cancel out. The shape differs from the ones the coefficients were fitted on.
    """
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lobass.modeling import lora_config

    batch, length = 2, 96
    measured = []
    for layers in (1, 2):
        config = AutoConfig.for_model(model_type, vocab_size=512, hidden_size=384,
                                      intermediate_size=1024, num_hidden_layers=layers,
                                      num_attention_heads=6, num_key_value_heads=kv_heads,
                                      head_dim=64)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        lora = OmegaConf.create({"r": 16, "alpha": 32, "dropout": 0.05})
        model = get_peft_model(model, lora_config(lora, ALL_LINEAR)).train()
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 512, (batch, length))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured.append(sum(n for ptr, n in storages.items() if ptr not in weights))
        shape = model_shape(config, ALL_LINEAR, 16)
    per_token = (measured[1] - measured[0]) / (batch * length)
    assert layer_activation_bytes(shape, "bfloat16", 0.05) == pytest.approx(per_token, rel=0.1)


def test_memory_check_fails_before_loading_and_names_the_stage(make_cfg, caplog):
    from lobass.pipeline import run

    # 13B with 4,096 rows of 512 tokens per micro-batch and no checkpointing: terabytes.
    huge = ["model=llama_13b", "model.device=cpu", "reference=lora_gpu", "train=lora_gpu",
            "logger=none", "data.max_rows=8", "data.mix={}", "train.batch_size=4096",
            "train.global_batch_size=null", "train.gradient_checkpointing=false"]
    with pytest.raises(InsufficientMemoryError, match=r"model=llama_13b does not fit .*; train "
                       r"\d+\.\d GiB = weights .*lower train\.batch_size"):
        run(make_cfg(*huge))  # the hub weights are never requested: this would fail offline
    cfg = make_cfg(*huge, "memory_check=warn")
    with caplog.at_level("WARNING"):
        estimate = check_memory(cfg)
    assert estimate is not None and estimate.stages["train"].parts["activations"] > 1000 * GIB
    assert "memory_check=warn runs anyway" in caplog.text
    assert check_memory(make_cfg(*huge, "memory_check=off")) is None
    # eval at a fixed batch that cannot fit: the check names eval and its knobs
    eval_cfg = make_cfg("model=llama_13b", "model.device=cpu", *RECIPE,
                        "eval.generation.batch_size=100000")
    with pytest.raises(InsufficientMemoryError, match=r"eval .*eval\.generation\.batch_size"):
        check_memory(eval_cfg)


def test_memory_estimate_reads_a_local_checkpoint_without_arch(make_cfg, tiny, models_dir,
                                                               caplog):
    from lobass.modeling import resolve_model_path

    cfg = make_cfg("model=tiny_random")
    path, _ = resolve_model_path(cfg.model, models_dir)
    with caplog.at_level("INFO"):
        estimate = check_memory(cfg, path)
    assert estimate is not None and estimate.stages["train"].parts["weights"] == 4 * sum(
        p.numel() for p in tiny[0].parameters())
    assert estimate.stages["train"].parts["runtime"] == 0  # model.device auto: the CPU here
    assert "memory estimate for model=tiny_random" in caplog.text


@pytest.mark.gpu
def test_memory_estimate_against_cuda_peak(tmp_path, tiny):
    """On a GPU: the training estimate of a 4-layer 7B-wide model against torch's peak."""
    from transformers import AutoModelForCausalLM

    from lobass.training import train_lora

    cfg = _compose("model=llama_7b", *RECIPE, "train.max_steps=1", "train.batch_size=4",
                   "train.global_batch_size=null", "train.grad_accum=1", "data.max_length=512")
    _, tokenizer = tiny
    config = architecture_config(cfg.model, num_hidden_layers=4, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    rows, _ = read_examples(CONF.parent / "lobass/resources/data/alpaca/alpaca_pool_1k.json",
                            "alpaca", max_rows=4)
    long = [tokenize_example(e, tokenizer, "alpaca", 512) for e in rows]
    for f in long:  # pad every row to 512 tokens so the micro-batch is the estimate's shape
        f.input_ids += [tokenizer.eos_token_id] * (512 - len(f.input_ids))
        f.labels += [f.input_ids[-1]] * (512 - len(f.labels))
    torch.cuda.reset_peak_memory_stats()
    train_lora(model, tokenizer, long, cfg.train, ALL_LINEAR, tmp_path, seed=0,
               dtype="bfloat16")
    peak = torch.cuda.max_memory_allocated()
    estimate = estimate_memory(cfg, model_shape(config, ALL_LINEAR, 16), 1, on_cuda=False)
    train_part = estimate.stages["train"].total
    assert train_part == pytest.approx(peak, rel=0.3), json.dumps(
        {"peak_gib": peak / GIB, "estimate_gib": train_part / GIB})


@pytest.mark.gpu
def test_scoring_estimate_against_cuda_peak(tiny):
    """On a GPU: one 16k-token scoring batch of a 4-layer 7B-wide model against torch's peak."""
    from transformers import AutoModelForCausalLM

    from lobass.scoring import compute_response_losses

    cfg = _compose("model=llama_7b", *RECIPE)
    _, tokenizer = tiny
    config = architecture_config(cfg.model, num_hidden_layers=4, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda().eval()
    rows, _ = read_examples(CONF.parent / "lobass/resources/data/alpaca/alpaca_pool_1k.json",
                            "alpaca", max_rows=256)
    features = [tokenize_example(e, tokenizer, "alpaca", 512) for e in rows]
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    compute_response_losses(model, features, max_tokens_per_batch=16384,
                            pad_token_id=tokenizer.pad_token_id)
    peak = torch.cuda.max_memory_allocated() - held
    shape = model_shape(config, ALL_LINEAR, 16)
    total = torch.cuda.get_device_properties(0).total_memory  # the head chunk check_memory counts
    estimate = estimate_memory(cfg, shape, 1, True, total).stages["score"].parts["activations"]
    assert peak <= estimate * 1.3, json.dumps({"peak_gib": peak / GIB,
                                               "estimate_gib": estimate / GIB})


def test_ifd_chat_prefixless_pass_keeps_no_cache():
    base = _compose("model=llama_7b", *RECIPE, "stages=[score]")
    shape = _shape(base)
    ifd = estimate_memory(_compose("model=llama_7b", *RECIPE, "stages=[score]", "scorer=ifd_chat"),
                          shape, 1, False).stages["score"].parts["activations"]
    extra = estimate_memory(_compose("model=llama_7b", *RECIPE, "stages=[score]",
                                     "score.extra_scorers=[ifd_chat]"), shape, 1, False)
    plain = estimate_memory(base, shape, 1, False).stages["score"].parts["activations"]
    # L(y) has no shared prefix, and the engine's no-prefix path keeps no key/value cache
    assert ifd == extra.stages["score"].parts["activations"] == plain


def test_cuda_estimate_counts_the_head_chunk_the_engine_will_choose():
    cfg = _compose("model=llama_7b", *RECIPE, "stages=[score]")
    shape = _shape(cfg)
    card = 80 * GIB
    est = estimate_memory(cfg, shape, 1, True, card).stages["score"].parts["activations"]
    free = card - 2 * shape.n_params - GIB  # what the weights and the CUDA runtime leave
    rows = head_chunk("cuda", free, 32000, 2)
    assert rows == 4096  # 80 GB: 2.2 GiB of logits allowed, 4096 rows take 1.2 GiB (the cap)
    assert est == scoring_activation_bytes(shape, "bfloat16", 16384, rows)
    assert est - estimate_memory(cfg, shape, 1, True).stages["score"].parts["activations"] == (
        (4096 - 64) * 32000 * (2 + 4 + 4))
    # a 24 GiB card with the 7B weights loaded leaves 10.4 GiB: 1096 rows fit, 1024 taken
    small = estimate_memory(cfg, shape, 1, True, 24 * GIB).stages["score"].parts["activations"]
    assert small == scoring_activation_bytes(shape, "bfloat16", 16384, 1024)
