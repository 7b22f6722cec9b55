"""GPU defaults, decided by pure functions and checked on the CPU (issue 30, item 5).

``model.dtype=auto`` and ``score.shard_rows=auto`` resolved for the device (and into every key),
TF32 at run start, adapters in the model's dtype, no key/value cache where nothing reads it, and
the LM-head chunk from free memory. The CPU path keeps its keys and numbers exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF, TINY
from lobass import pipeline
from lobass.config import package_data, with_defaults
from lobass.data import read_examples
from lobass.devices import CPU_SHARD_ROWS, enable_tf32, resolve_dtype, resolve_shard_rows
from lobass.formatting import tokenize_example
from lobass.modeling import (
    INFERENCE_ADAPTER,
    load_adapter,
    load_model,
    lora_config,
    model_key,
    resolve_model_path,
)
from lobass.schema import ConfigError
from lobass.scoring import compute_response_losses
from lobass.scoring.engine import HEAD_CHUNK, head_chunk

GIB = 1024**3


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return with_defaults(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize(("dtype", "device", "bf16", "expected"), [
    ("auto", "cuda", True, "bfloat16"),  # Ampere or newer: half the memory, tensor cores
    ("auto", "cuda", False, "float32"),  # V100/T4: fp16 would need loss scaling; float32 is safe
    ("auto", "cpu", False, "float32"),  # bf16 is ~6x slower on a CPU
    ("auto", "cpu", True, "float32"),
    ("float32", "cuda", True, "float32"),  # a dtype given is kept, on any device
    ("bfloat16", "cpu", False, "bfloat16"),
    ("float16", "cuda", True, "float16"),
])
def test_auto_dtype_is_bf16_only_on_a_gpu_that_runs_it(dtype, device, bf16, expected):
    assert resolve_dtype(dtype, device, bf16) == expected


def test_auto_shard_rows_are_the_cpu_keys_on_the_cpu_and_follow_the_budget_on_cuda():
    assert resolve_shard_rows("auto", "cpu", 16384, 512) == CPU_SHARD_ROWS == 256
    assert resolve_shard_rows("auto", "cuda", 16384, 512) == 512  # 16 batches of 32 long rows
    assert resolve_shard_rows("auto", "cuda", 65536, 512) == 2048
    assert resolve_shard_rows("auto", "cuda", 16384, 2048) == 256  # 128 rows: the floor
    assert resolve_shard_rows("auto", "cuda", 1024, 512) == 256
    assert resolve_shard_rows(64, "cuda", 16384, 512) == 64  # a number given is kept


def test_head_chunk_is_64_on_the_cpu_and_follows_free_memory_on_cuda():
    for free in (0, 8 * GIB, 1000 * GIB):
        assert head_chunk("cpu", free, 32000, 4) == HEAD_CHUNK == 64
    # LLaMA vocabulary in bf16, 70 GiB free: 2.19 GiB allowed, 7340 rows fit, capped at 4096
    assert head_chunk("cuda", 70 * GIB, 32000, 2) == 4096
    # Gemma 3's 262k vocabulary: 2.6 MB of logits per row, 895 rows fit: 512
    assert head_chunk("cuda", 70 * GIB, 262144, 2) == 512
    # float32 on a card with 8 GiB free: 256 MiB / 384 kB per row = 699 rows: 512
    assert head_chunk("cuda", 8 * GIB, 32000, 4) == 512
    assert head_chunk("cuda", 100 * 2**20, 32000, 2) == 64  # nearly full: never below the CPU's
    chunk = head_chunk("cuda", 70 * GIB, 49152, 2)  # SmolLM2: 1.9 GiB of logits, within 2.2
    assert chunk == 4096 and chunk * 49152 * (2 + 4 + 4) <= 70 * GIB / 32


def test_auto_resolves_on_this_cpu_to_the_keys_the_float32_configs_had(tiny, models_dir):
    cfg = _cfg(*TINY, "model=tiny_random")
    assert (cfg.model.dtype, cfg.score.shard_rows) == ("float32", 256)  # conf says auto
    path, _ = resolve_model_path(cfg.model, models_dir)
    key = model_key(cfg.model, path, models_dir)
    # the parent commit's key for tiny_random (its config said dtype: float32): CPU artifacts
    # made before auto existed are reused
    assert key == "tiny_random-e83f4f43a817fc95"
    unresolved = cfg.model.copy()
    unresolved.dtype = "auto"  # a config that skipped validate(): keyed as it will load
    assert model_key(unresolved, path, models_dir) == key
    bf16 = cfg.model.copy()
    bf16.dtype = "bfloat16"  # what auto gives on a GPU: never the CPU's float32 artifacts
    assert model_key(bf16, path, models_dir) != key
    # model.device=cuda on this CPU resolves like the CPU (check_device refuses it right after)
    assert _cfg(*TINY, "model=tiny_random", "model.device=cuda").model.dtype == "float32"


def test_run_enables_tf32_first_and_it_is_a_no_op_on_the_cpu(tmp_path, models_dir, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(pipeline, "enable_tf32", lambda: calls.append(enable_tf32()))
    cfg = _cfg(*TINY, f"output_dir={tmp_path / 'run'}", f"artifacts_dir={tmp_path / 'a'}",
               f"models_dir={models_dir}", "selection.ratio=0")
    with pytest.raises(ConfigError):  # the run stops in preflight, after TF32 was set
        pipeline.run(cfg)
    assert calls == [False]  # called once, and without CUDA it does nothing
    assert torch.get_float32_matmul_precision() == "highest"  # the CPU computes as before


def _rows(tokenizer, n: int = 6):
    examples, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca",
                                max_rows=n)
    return [tokenize_example(e, tokenizer, "chat", 128) for e in examples]


def test_no_prefix_scoring_keeps_no_cache_and_matches_the_row_loop(tiny):
    model, tokenizer = tiny
    features = _rows(tokenizer)
    caches: list[list[str]] = []  # per forward: the cache fields its output holds (5.20+: cache)
    hook = model.get_decoder().register_forward_hook(lambda _m, _a, out: caches.append(
        [k for k in ("cache", "past_key_values") if out.get(k) is not None]))
    try:
        fast = compute_response_losses(model, features, max_tokens_per_batch=512,
                                       pad_token_id=tokenizer.pad_token_id, prefix_length=0)
    finally:
        hook.remove()
    assert caches and not any(caches)  # no DynamicCache was built (before: one per batch)
    with torch.no_grad():  # the slow path: the model's own loss, one row at a time
        slow = [model(input_ids=torch.tensor([f.input_ids]),
                      labels=torch.tensor([f.labels])).loss.item() for f in features]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def _saved_adapter(cfg, path: str, directory: Path) -> Path:
    """A LoRA adapter with non-zero B (its output differs from the base), saved in float32."""
    from peft import get_peft_model

    model = get_peft_model(load_model(cfg.model, path),
                           lora_config(cfg.reference.lora, list(cfg.model.lora_targets)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(str(directory))
    return directory


def _lora(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def test_loaded_adapters_take_the_models_dtype_and_float32_is_unchanged(tiny, models_dir,
                                                                          tmp_path):
    from peft import PeftModel

    cfg = _cfg(*TINY, "model=tiny_random", f"models_dir={models_dir}")
    path, _ = resolve_model_path(cfg.model, models_dir)
    adapter = _saved_adapter(cfg, path, tmp_path / "adapter")
    ids = torch.tensor([_rows(tiny[1], 1)[0].input_ids])

    bf16_cfg = cfg.copy()
    bf16_cfg.model.dtype = "bfloat16"
    fast = load_adapter(load_model(bf16_cfg.model, path), adapter)
    assert {p.dtype for p in _lora(fast)} == {torch.bfloat16}  # peft's default: float32
    fast.load_adapter(str(adapter), adapter_name="fold_1", **INFERENCE_ADAPTER)  # score's folds
    assert {p.dtype for p in _lora(fast)} == {torch.bfloat16}
    # the slow path: peft's float32 adapter on the same bf16 base; bf16 rounding apart, the same
    slow = PeftModel.from_pretrained(load_model(bf16_cfg.model, path), str(adapter)).eval()
    assert {p.dtype for p in _lora(slow)} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits.float(), slow(ids).logits.float(),
                                   atol=0.05, rtol=0.02)

    # float32 (the CPU): the adapter stays float32 and the logits are bit-identical to peft's
    plain = load_adapter(load_model(cfg.model, path), adapter)
    before = PeftModel.from_pretrained(load_model(cfg.model, path), str(adapter)).eval()
    assert {p.dtype for p in _lora(plain)} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, before(ids).logits)


def test_response_loss_batches_ask_for_no_cache(tiny, models_dir):
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from lobass.response_loss import ResponseLoss

    cfg = _cfg(*TINY, "model=tiny_random")
    path, _ = resolve_model_path(cfg.model, models_dir)
    model = get_peft_model(load_model(cfg.model, path),
                           lora_config(cfg.reference.lora, list(cfg.model.lora_targets)))
    loss = ResponseLoss(model)
    collate = loss.collate(DataCollatorForSeq2Seq(tiny[1], padding=True))
    batch = collate([{"input_ids": f.input_ids, "labels": f.labels} for f in _rows(tiny[1], 2)])
    assert batch["use_cache"] is False
    # the Trainer's forward with this batch (its labels go to ResponseLoss, not the model)
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.get("cache") is None and out.get("past_key_values") is None
    assert out.logits.shape[1] == 0
    assert torch.isfinite(loss(out, batch["labels"]))
    loss.remove()
