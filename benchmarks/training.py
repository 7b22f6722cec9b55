"""Training speed: a plain Trainer + peft loop vs lobass's training stage, same rows, one process.

run: .venv/bin/python benchmarks/training.py [--model smollm2_135m|gemma3_270m] [--steps 12]
     .venv/bin/python benchmarks/training.py --device cuda          # bf16 on a GPU

Trains a fresh LoRA adapter (r16 on all projections, ``reference=lora_cpu``'s recipe, float32 on
the CPU) on the first ``--steps x --batch-size`` real Alpaca rows shipped in lobass/resources, two
ways, interleaved ``--repeats`` times in one process so both see the same machine conditions:

1. plain: ``lobass.training.train_lora(response_only=False)``: transformers ``Trainer`` with
   peft, ``DataCollatorForSeq2Seq`` padding and the model's own ``model(labels=...)`` loss (full
   vocabulary logits at every position), i.e. what a user writes and what lobass ran before;
2. lobass: ``train_lora`` as the train and reference stages run it (LM head at response
   positions only, ``lobass.response_loss``).

Both use lobass's length-grouped sampler, so they train the same batches in the same order: the
per-step losses are compared (they must agree within 1e-4). For each way it prints tokens/s
(real tokens, no padding, over the whole ``trainer.train`` call), the effective FLOP rate
``4 x params x tokens / time`` (forward plus the gradient with respect to activations of a frozen
base, every token at full cost as if all work were done) as a fraction of a large float32
``torch.matmul`` measured in the same process before and after each repeat, and the peak
resident memory (per step and over the run; ``torch.cuda.max_memory_allocated`` on CUDA). The
last line is exactly ``train_speedup=<x> train_matmul_fraction=<y>`` (medians over repeats).
``--profile N`` prints a torch.profiler table of N steps of each way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scoring import matmul_flops, reset_peak_rss, rss_kib, sync, use_device  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import lobass  # noqa: E402,F401
from lobass.batches import EpochSeededLengthSampler  # noqa: E402
from lobass.config import package_data  # noqa: E402
from lobass.data import read_examples  # noqa: E402
from lobass.formatting import tokenize_example  # noqa: E402
from lobass.modeling import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from lobass.response_loss import padding_share  # noqa: E402
from lobass.training import train_lora  # noqa: E402


class StepMeter(TrainerCallback):
    """Wall time of the training loop and resident memory after every step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = self.seconds = 0.0
        self.rss_mib: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.rss_mib.append(rss_kib() / 1024)

    def on_train_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


class Profiled(TrainerCallback):
    """torch.profiler over the first ``steps`` optimiser steps."""

    def __init__(self, steps: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities)
        self.steps = steps

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:  # the first step is warm-up (allocator, kernels)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 + self.steps:
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(self.prof.key_averages().table(sort_by=key, row_limit=14))


def layer_gemm_flops(model: torch.nn.Module, rows: int, device: str,
                     seconds: float = 3.0) -> float:
    """FLOP/s of a decoder layer's own matmuls at ``rows`` tokens: the shapes a step runs.

    For every linear of the first decoder layer, the two products a frozen-base LoRA step does
    per projection (forward ``x W^T`` and the input gradient ``g W``), timed over a window. The
    big square matmul of ``matmul_flops`` is the machine's ceiling; these narrow shapes (576 wide
    for SmolLM2) are the ceiling of *this* model's training, whatever the training loop does.
    """
    layer = model.get_decoder().layers[0]
    weights = [m.weight.detach().to(device) for m in layer.modules()
               if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, w.shape[1], device=device) for w in weights]
    grads = [torch.randn(rows, w.shape[0], device=device) for w in weights]
    flops_per_pass = sum(4 * rows * w.shape[0] * w.shape[1] for w in weights)
    passes = 0
    start = time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            for w, x, g in zip(weights, inputs, grads, strict=True):
                torch.matmul(x, w.t())
                torch.matmul(g, w)
            sync(device)
            passes += 1
    return flops_per_pass * passes / (time.perf_counter() - start)


def train_once(cfg, path, tokenizer, features, *, fast: bool, device: str, profile: int,
               micro: int | None = None):
    """One fresh model trained one way: (seconds, per-step losses, per-step RSS MiB, peak)."""
    recipe = cfg.reference
    if fast and micro:  # lobass's micro-batches: the same optimiser steps in smaller passes
        recipe = OmegaConf.merge(recipe, {"micro_batch_size": micro})
    model = load_model(cfg.model, path)
    with torch.no_grad():  # page in every weight (safetensors loads lazily through mmap)
        sum(float(p.sum()) for p in model.parameters())
    meter = StepMeter(device)
    callbacks = [meter] + ([Profiled(profile)] if profile else [])
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        train_lora(model, tokenizer, features, recipe, list(cfg.model.lora_targets),
                   Path(tmp), seed=0, dtype=cfg.model.dtype, response_only=fast,
                   callbacks=callbacks)
        losses = [e["loss"] for e in json.loads((Path(tmp) / "log_history.json").read_text())]
        if fast:  # the saved adapter loads in plain peft
            from peft import PeftModel

            PeftModel.from_pretrained(load_model(cfg.model, path), str(Path(tmp) / "adapter"))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else rss_kib("VmHWM") / 1024)
    del model
    return meter.seconds, losses, meter.rss_mib, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model option "
                        "(smollm2_135m, gemma3_270m)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=0,
                        help="lobass trains each batch in passes of N rows (0 = whole batch); "
                        "LoRA dropout is then off both ways, so the losses still compare exactly")
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="LoRA dropout of both ways (default: the recipe's, 0 on the CPU; "
                        "0.05 is the GPU recipe's and what the CPU recipe had before issue 14)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--profile", type=int, default=0, help="profile N steps of each way")
    parser.add_argument("--models-dir", default=str(ROOT / "artifacts" / "models"))
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    use_device(args.device, args.threads)

    gpu = ["model.dtype=bfloat16", "model.device=cuda"] if args.device == "cuda" else []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"model={args.model}", *gpu, "reference.epochs=1", f"reference.max_steps={args.steps}",
            f"reference.batch_size={args.batch_size}", "reference.logging_steps=1",
            *([f"reference.lora.dropout={args.lora_dropout}"] if args.lora_dropout is not None
              else ["reference.lora.dropout=0.0"] if args.micro_batch_size else []),
            "reference.save_steps=100000", "logger=none"])
    path, _ = resolve_model_path(cfg.model, Path(args.models_dir).resolve())
    tokenizer = load_tokenizer(cfg.model, path)
    examples, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca",
                                max_rows=args.steps * args.batch_size)
    features = [tokenize_example(e, tokenizer, cfg.model.template, args.max_length)
                for e in examples]
    lengths = [len(f.input_ids) for f in features]
    tokens = sum(lengths)
    torch.manual_seed(0)  # the sampler's first epoch draws from the global RNG, as in training
    order = list(EpochSeededLengthSampler(lengths, args.batch_size, 0))
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    print(f"model={args.model} device={args.device} threads={torch.get_num_threads()} "
          f"rows={len(features)} tokens={tokens} "
          f"response_tokens={sum(f.n_response for f in features)} "
          f"batch={args.batch_size} micro_batch={args.micro_batch_size or args.batch_size} "
          f"lora_dropout={cfg.reference.lora.dropout} "
          f"steps={args.steps} "
          f"padding_share={padding_share(lengths, batches):.3f} load={os.getloadavg()[0]:.1f}")

    params, gemm_fraction = 0, float("nan")
    runs: list[dict[str, float]] = []
    ceilings: list[float] = []
    for repeat in range(args.repeats):
        before = matmul_flops(args.device)
        figures = {}
        ways = (("plain", False), ("lobass", True))
        for name, fast in ways if repeat % 2 == 0 else ways[::-1]:  # alternate: drift cancels
            seconds, losses, rss, peak = train_once(
                cfg, path, tokenizer, features, fast=fast, device=args.device,
                profile=args.profile if repeat == 0 else 0, micro=args.micro_batch_size or None)
            figures[name] = (seconds, losses, rss, peak)
        after = matmul_flops(args.device)
        ceiling = (before + after) / 2
        ceilings.append(ceiling)
        if not params:
            model = load_model(cfg.model, path)
            params = sum(p.numel() for p in model.parameters())
            rows = round(sum(len(b) * max(lengths[i] for i in b) for b in batches) / len(batches))
            gemm = layer_gemm_flops(model, rows, args.device)
            gemm_fraction = gemm / ceiling
            print(f"a decoder layer's own matmuls at {rows} tokens (a padded batch): "
                  f"{gemm / 1e9:.1f} GFLOP/s = {gemm / ceiling:.3f} of the square matmul "
                  "(the ceiling of train_matmul_fraction for this model's shapes)")
            del model
        diff = max(abs(a - b) for a, b in zip(figures["plain"][1], figures["lobass"][1],
                                              strict=True))
        print(f"repeat {repeat}: matmul {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s "
              f"before / after; per-step loss max |plain - lobass| = {diff:.2e} over "
              f"{len(figures['plain'][1])} steps; load {os.getloadavg()[0]:.1f}")
        assert diff < 1e-4, f"plain and lobass per-step losses differ by {diff}"
        for name, (seconds, _, rss, peak) in sorted(figures.items(), reverse=True):
            rate = 4 * params * tokens / seconds
            print(f"  {name:<7} {seconds:8.2f} s {tokens / seconds:9.1f} tokens/s "
                  f"{rate / 1e9:7.1f} GFLOP/s effective = {rate / ceiling:.3f} of matmul; "
                  f"peak memory {peak:.0f} MiB; RSS per step (MiB) "
                  + " ".join(f"{r:.0f}" for r in rss))
        runs.append({"plain_s": figures["plain"][0], "lobass_s": figures["lobass"][0],
                     "speedup": figures["plain"][0] / figures["lobass"][0],
                     "matmul_fraction": 4 * params * tokens / figures["lobass"][0] / ceiling,
                     "plain_matmul_fraction": 4 * params * tokens / figures["plain"][0] / ceiling,
                     "plain_peak_mib": figures["plain"][3], "lobass_peak_mib": figures["lobass"][3],
                     "max_loss_diff": diff, "matmul_gflops": ceiling / 1e9})
    speedups = [r["speedup"] for r in runs]
    fractions = [r["matmul_fraction"] for r in runs]
    print("speedup over repeats: " + " ".join(f"{s:.3f}" for s in speedups) + "; matmul fraction: "
          + " ".join(f"{f:.3f}" for f in fractions) + " (plain: "
          + " ".join(f"{r['plain_matmul_fraction']:.3f}" for r in runs) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": args.device,
                                               "tokens": tokens, "params": params,
                                               "layer_gemm_fraction": gemm_fraction,
                                               "runs": runs}, indent=1) + "\n")
    print(f"train_speedup={statistics.median(speedups):.3f} "
          f"train_matmul_fraction={statistics.median(fractions):.3f}")


if __name__ == "__main__":
    main()
