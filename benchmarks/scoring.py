"""Scoring speed: naive per-row loop vs the lobass engine vs the engine with a warm cache.

run: .venv/bin/python benchmarks/scoring.py [--rows 512] [--device cpu|cuda] [--profile]
     .venv/bin/python benchmarks/scoring.py --device cuda --shape llama_7b --max-tokens 16384

Scores the first ``--rows`` real Alpaca rows shipped in lobass/resources (chat template of the
embedded SmolLM2-135M-Instruct, float32) three ways in one process:

1. naive: ``model(input_ids, labels=...)`` one row at a time (Cherry LLM's IFD code does this);
2. engine: ``ensure_losses`` as the score stage runs it (length-batched under
   ``--max-tokens``, LM head at response positions only, shared-prefix KV reuse, shards on disk);
3. cached: the same call again, finding the complete artifact (no model forward).

It checks that engine and naive agree within 1e-4, then prints tokens/s for each, the ratio to
the naive loop, the effective FLOP rate ``2 * params * tokens / time`` (every token counted, as if
all work were done) as a fraction of a large ``torch.matmul`` in the model's dtype on the same
device (float32 on the CPU, bf16 on CUDA), and the
peak memory of the engine pass relative to holding the model. The last line is exactly
``speedup_vs_naive=<x> matmul_fraction=<y> cached_speedup=<z>``. Each way is warmed up on a few
rows before it is timed (CUDA kernels load and the allocator grows on the first call).

On CUDA the model runs in bf16 (``--device cuda``; float32 on the CPU), and the model FLOP
utilisation (MFU) counts only the FLOPs executed (``benchmarks/flops.py``: the shared prefix once,
the LM head at response positions only) against the GPU's dense peak at the precision the model
runs at (bf16; TF32 for a float32 model, TF32 being on as in a lobass run), looked up by name in
``benchmarks/flops.py``'s table of datasheet figures (H100 SXM and PCIe told apart, H200, A100,
L40S, A10G, L4, RTX 4090...) or ``--peak-tflops``.
``--json PATH`` also writes the figures as JSON (``scripts/gpu_check.sh`` reads them).

``--shape llama_7b`` (any model config with an ``arch`` block) scores the same rows' token
lengths on a random-initialised model of that architecture instead (``model.dtype``, bf16 for
the GPU configs; ``--layers N`` keeps only N layers for a CPU smoke run). Token ids are the
embedded tokenizer's, folded into the model's vocabulary: the work per token is real, the losses
are not. It also prints the model FLOP utilisation on a line ``mfu=<m> tokens_per_s=<t>``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flops import device_peaks, engine_flops, model_dims, naive_flops, precision  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import lobass  # noqa: E402,F401
from lobass.config import package_data, with_defaults  # noqa: E402
from lobass.data import read_examples  # noqa: E402
from lobass.devices import enable_tf32  # noqa: E402
from lobass.formatting import tokenize_example  # noqa: E402
from lobass.modeling import DTYPES, load_model, load_tokenizer, resolve_model_path  # noqa: E402
from lobass.scoring import compute_response_losses, shared_prefix_length  # noqa: E402
from lobass.scoring.runner import LazyModel, loss_fn  # noqa: E402
from lobass.scoring.store import ensure_losses  # noqa: E402


def use_device(device: str, threads: int) -> None:
    """Apply ``--device`` and ``--threads``: fail when CUDA is asked for and absent; on the CPU,
    hide any GPU (``load_model`` moves to CUDA when it sees one). On CUDA, TF32 for float32
    matmuls, as a lobass run sets it (``lobass.devices.enable_tf32``)."""
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if device == "cuda":
        enable_tf32()
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: str, n: int = 2048, seconds: float = 4.0,
                 dtype: torch.dtype = torch.float32) -> float:
    """Measured FLOP/s of a large square matmul in ``dtype``: the machine's practical ceiling.

    ``dtype`` is the model's: a bf16 model's work over a float32 ceiling would overstate its
    fraction up to 15x on a GPU (float32 on the CPU, where the models run in float32).

    Timed over a window of ``seconds`` (not a handful of products): on this shared 2-core VM a
    sub-second sample moved between 210 and 330 GFLOP/s from run to run, which swung the matmul
    fraction between 0.68 and 1.11 for the same engine code.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    reps = 0
    start = time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        if reps % 4 == 0:
            sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2 * n**3 * reps / (time.perf_counter() - start)


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so that it measures from now on.

    Freed heap pages go back to the OS first (glibc's ``malloc_trim``), so that memory freed
    before the engine pass (tokenisation, weight paging) is not counted as the engine's.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_flops_of(device: str, dtype: torch.dtype, override: float) -> tuple[float | None, str]:
    """The device's dense peak in FLOP/s for ``dtype``'s matmuls, and what it is.

    ``--peak-tflops`` when given; else ``benchmarks/flops.py``'s table by the GPU's name, at
    the precision the matmuls run at: bf16 for bf16/fp16 weights, TF32 for float32 with TF32 on
    (``torch.get_float32_matmul_precision() != "highest"``), plain FP32 otherwise.
    """
    tf32 = torch.get_float32_matmul_precision() != "highest"
    kind = precision(str(dtype).removeprefix("torch."), tf32)
    if override:
        return override * 1e12, f"{kind} (--peak-tflops)"
    if device != "cuda":
        return None, kind
    peaks = device_peaks(torch.cuda.get_device_name())
    if peaks is None:
        return None, kind
    return getattr(peaks, kind) * 1e12, f"{kind}: {peaks.source}"


def warm_up(model, features, budget: int, pad: int, device: str) -> None:
    """One untimed engine call and one naive row: kernels load, the allocator reaches its size."""
    rows = sorted(features, key=lambda f: -len(f.input_ids))[:max(1, budget // 512)]
    compute_response_losses(model, rows, max_tokens_per_batch=budget, pad_token_id=pad)
    naive(model, rows[:1], device)


def random_shaped_model(model_cfg, layers: int, device: str):
    """A random-initialised model of ``model_cfg``'s architecture (its ``arch`` block)."""
    from transformers import AutoModelForCausalLM

    from lobass.memory import architecture_config

    config = architecture_config(model_cfg)
    if config is None:
        raise SystemExit(f"--shape {model_cfg.name}: the model config has no `arch` block")
    if layers:
        config.num_hidden_layers = layers
    dtype = DTYPES[model_cfg.dtype] if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.eval()


def fold_vocab(features, vocab: int):
    """The same rows with token ids folded into ``vocab`` (lengths and masks unchanged)."""
    from lobass.formatting import IGNORE_INDEX, Features

    return [Features([t % vocab for t in f.input_ids],
                     [t if t == IGNORE_INDEX else t % vocab for t in f.labels],
                     f.n_prompt, f.truncated) for f in features]


def naive(model, features, device: str) -> tuple[np.ndarray, float]:
    out = []
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for f in features:
            ids = torch.tensor([f.input_ids], device=device)
            # use_cache=False: a user's loop reads only the loss (no cache to build and drop)
            out.append(model(input_ids=ids, labels=torch.tensor([f.labels], device=device),
                             use_cache=False).loss.item())
    sync(device)
    return np.array(out), time.perf_counter() - start


def profile_engine(model, features, budget: int, pad: int) -> None:
    """Where the engine's time goes, by operator (torch.profiler, CPU and CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        compute_response_losses(model, features, max_tokens_per_batch=budget, pad_token_id=pad)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096, help="score.max_tokens_per_batch")
    parser.add_argument("--shard-rows", type=int, default=256, help="score.shard_rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--models-dir", default=str(ROOT / "artifacts" / "models"))
    parser.add_argument("--budgets", default="", help="also time the engine at these budgets, "
                        "e.g. 256,1024,16384 (no cache, on the same rows)")
    parser.add_argument("--profile", type=int, default=0, help="profile the engine on N rows")
    parser.add_argument("--model", default="smollm2_135m", help="model config whose model (and "
                        "tokenizer) is scored; tiny_offline needs no model package")
    parser.add_argument("--shape", default="", help="a model config with an `arch` block "
                        "(e.g. llama_7b): random-initialised model of that architecture")
    parser.add_argument("--layers", type=int, default=0, help="with --shape: keep N layers")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="dense peak of the device for MFU at the model's precision; "
                        "default: known GPUs by name (benchmarks/flops.py)")
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    use_device(args.device, args.threads)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # bf16 on CUDA: float32 there would time a configuration no GPU recipe uses.
        on_gpu = ["model.dtype=bfloat16", "model.device=cuda"] if args.device == "cuda" else []
        cfg = with_defaults(compose(config_name="config", overrides=[f"model={args.model}",
                                                                     *on_gpu]))
    path, _ = resolve_model_path(cfg.model, Path(args.models_dir).resolve())
    tokenizer = load_tokenizer(cfg.model, path)
    examples, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca",
                                max_rows=args.rows)
    features = [tokenize_example(e, tokenizer, "chat", args.max_length) for e in examples]
    tokens = sum(len(f.input_ids) for f in features)
    response = sum(f.n_response for f in features)
    pad = tokenizer.pad_token_id
    print(f"rows={len(features)} tokens={tokens} response_tokens={response} "
          f"shared_prefix={shared_prefix_length(features)} device={args.device} "
          f"threads={torch.get_num_threads()} truncated={sum(f.truncated for f in features)}")

    # The ceiling is sampled just before the model loads and just after the timed engine pass,
    # so the fraction compares the two under the same machine conditions. The first sample runs
    # before the memory baseline: MKL keeps its GEMM buffers, which are not the engine's memory.
    # in the dtype the model runs in: bf16 on CUDA (model.dtype, and --shape's bf16 configs)
    run_dtype = DTYPES[cfg.model.dtype] if args.device == "cuda" else torch.float32
    flops_before = matmul_flops(args.device, dtype=run_dtype)
    rss_before = rss_kib()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.shape:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            shape_cfg = with_defaults(compose(config_name="config",
                                              overrides=[f"model={args.shape}"])).model
        model = random_shaped_model(shape_cfg, args.layers, args.device)
        features = fold_vocab(features, model.config.vocab_size)
        pad = 0
        print(f"shape={args.shape} layers={model.config.num_hidden_layers} "
              f"dtype={next(model.parameters()).dtype} (random init)")
    else:
        model = load_model(cfg.model, path)
    model = model.to(args.device)
    sync(args.device)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # page in every weight (safetensors loads lazily through mmap)
        sum(float(p.sum()) for p in model.parameters())
    rss_model = rss_kib()
    held_gpu = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    warm_up(model, features, args.max_tokens, pad, args.device)

    # 2) engine, as the score stage runs it (first, so its memory peak is measured on its own)
    lazy = LazyModel(lambda: model)
    compute = loss_fn(lazy, "init", features, max_tokens_per_batch=args.max_tokens,
                      pad_token_id=pad, share_prefix=True)
    ids = [e.id for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "losses" / "bench"
        hwm_ok = reset_peak_rss()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        start = time.perf_counter()
        engine = ensure_losses(directory, ids, compute, shard_rows=args.shard_rows,
                               desc="engine")
        sync(args.device)
        t_engine = time.perf_counter() - start
        rss_peak = rss_kib("VmHWM")
        gpu_peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
        flops_after = matmul_flops(args.device, dtype=run_dtype)
        peak_flops = (flops_before + flops_after) / 2
        print(f"matmul {str(run_dtype).removeprefix('torch.')}: {flops_before / 1e9:.1f} "
              "GFLOP/s before the engine pass, "
              f"{flops_after / 1e9:.1f} after; ceiling {peak_flops / 1e9:.1f} (their mean)")

        # 3) the same call again: the artifact is complete, nothing is computed
        start = time.perf_counter()
        cached = ensure_losses(directory, ids, compute, shard_rows=args.shard_rows, desc="cached")
        t_cached = time.perf_counter() - start
        assert cached.reused and np.array_equal(cached.values, engine.values)

    # 1) the naive per-row loop
    reference, t_naive = naive(model, features, args.device)
    diff = float(np.abs(engine.values - reference).max())
    exact = next(model.parameters()).dtype == torch.float32
    assert diff < 1e-4 or not exact, f"engine and naive loop differ by {diff}"

    def line(name: str, seconds: float) -> None:
        rate = 2 * params * tokens / seconds
        print(f"{name:<8} {seconds:9.2f} s {tokens / seconds:12.1f} tokens/s "
              f"x{t_naive / seconds:10.2f} vs naive  {rate / 1e9:9.1f} GFLOP/s effective "
              f"= {rate / peak_flops:.3f} of matmul")

    print(f"params={params} max_abs_diff_engine_vs_naive={diff:.2e}")
    line("naive", t_naive)
    line("engine", t_engine)
    line("cached", t_cached)
    if args.device == "cuda":
        print(f"memory: model {held_gpu / 2**20:.0f} MiB allocated, engine peak "
              f"{gpu_peak / 2**20:.0f} MiB = {gpu_peak / held_gpu:.3f}x holding the model")
    elif hwm_ok:
        model_kib = rss_model - rss_before
        print(f"memory: process RSS {rss_before / 1024:.0f} MiB before the model, "
              f"{rss_model / 1024:.0f} MiB holding it (model {model_kib / 1024:.0f} MiB), "
              f"engine peak {rss_peak / 1024:.0f} MiB = {rss_peak / rss_model:.3f}x the process "
              f"holding the model; peak above the model-holding process "
              f"{(rss_peak - rss_model) / 1024:.0f} MiB = "
              f"{(rss_peak - rss_before) / model_kib:.3f}x the model's own RSS")

    for budget in [int(b) for b in args.budgets.split(",") if b]:
        sync(args.device)
        start = time.perf_counter()
        compute_response_losses(model, features, max_tokens_per_batch=budget, pad_token_id=pad)
        sync(args.device)
        line(f"b={budget}", time.perf_counter() - start)
    if args.profile:
        profile_engine(model, features[:args.profile], args.max_tokens, pad)

    dims = model_dims(model)
    executed = engine_flops(dims, features, shared_prefix_length(features))
    figures = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "model": args.shape or args.model, "dtype": str(next(model.parameters()).dtype),
               "rows": len(features), "tokens": tokens, "response_tokens": response,
               "naive_s": t_naive, "engine_s": t_engine, "speedup_vs_naive": t_naive / t_engine,
               "tokens_per_s": tokens / t_engine, "engine_tflops": executed / t_engine / 1e12,
               "naive_tflops": naive_flops(dims, features) / t_naive / 1e12,
               "max_abs_diff": diff, "peak_memory_vs_model": (gpu_peak / held_gpu
                                                              if held_gpu else None)}
    peak, peak_name = peak_flops_of(args.device, next(model.parameters()).dtype,
                                    args.peak_tflops)
    figures["mfu_peak"] = peak_name
    if peak:  # model FLOP utilisation: FLOPs the engine executed over the device's peak
        figures["mfu"] = executed / t_engine / peak
        figures["naive_mfu"] = naive_flops(dims, features) / t_naive / peak
        figures["peak_tflops"] = peak / 1e12
        print(f"mfu={figures['mfu']:.3f} tokens_per_s={tokens / t_engine:.1f} "
              f"(naive loop: mfu {figures['naive_mfu']:.3f}; executed FLOPs "
              f"{executed:.3e} over a {peak / 1e12:.0f} TFLOP/s dense peak, {peak_name})")
    fraction = 2 * params * tokens / t_engine / peak_flops
    figures["matmul_fraction"] = fraction
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"speedup_vs_naive={t_naive / t_engine:.3f} matmul_fraction={fraction:.3f} "
          f"cached_speedup={t_naive / t_cached:.1f}")


if __name__ == "__main__":
    main()
