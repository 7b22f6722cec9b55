"""Training speed: what a user writes vs lobass's training stage, same rows, one process.

run: .venv/bin/python benchmarks/training.py [--model smollm2_135m|gemma3_270m] [--steps 12]
     .venv/bin/python benchmarks/training.py --compile              # with train.compile
     .venv/bin/python benchmarks/training.py --device cuda          # bf16 on a GPU

Trains a fresh LoRA adapter (r16 on all projections, ``reference=lora_cpu``'s recipe, float32 on
the CPU) on the first ``--steps x --batch-size`` real Alpaca rows shipped in lobass/resources,
three ways, interleaved ``--repeats`` times in one process so all see the same machine conditions:

1. user: what a user writes: peft + ``Trainer`` with its defaults (rows shuffled, whole batches
   of ``--batch-size``), ``DataCollatorForSeq2Seq`` padding and the model's own
   ``model(labels=...)`` loss (full-vocabulary logits at every position). The baseline of
   ``train_speedup``.
2. plain: ``lobass.training.train_lora(response_only=False)``: lobass's batches (length-grouped
   order, passes of the recipe's ``micro_batch_size`` rows) with the model's own loss. It trains
   exactly what lobass trains: the per-step losses are compared (they must agree within
   ``loss_tolerance``: 1e-4 in float32, the dtype's rounding in bf16/fp16; checked after the
   JSON is written, so a failed check still leaves the figures).
3. lobass: ``train_lora`` as the train and reference stages run it (LM head at response
   positions only, ``lobass.response_loss``; the rows' shared prefix encoded once per step,
   ``lobass.prefix_trainer``, unless ``--no-share-prefix``; compiled decoder layers with
   ``--compile``).

For each way it prints the loop's time (the whole ``trainer.train`` call, compilation included)
and real tokens/s (padding not counted), the rate after the first step (what is left once
warm-up and compilation are paid), the padding it ran (counted by a forward pre-hook), the
effective FLOP rate ``4 x params x tokens / time`` (forward plus the gradient with respect to
activations of a frozen base, every token at full cost) as a fraction of a large
``torch.matmul`` in the model's dtype (float32 on the CPU, bf16 on CUDA) measured in the same
process before and after each repeat and, on a GPU in ``benchmarks/flops.py``'s table, of its
dense datasheet peak for that dtype (``<way>_mfu``), and the peak
resident memory (per step and over the run; ``torch.cuda.max_memory_allocated`` on CUDA). The
last line is exactly ``train_speedup=<x> train_matmul_fraction=<y>``: medians over repeats of
user time / lobass time and of lobass's fraction. ``--profile N`` prints a torch.profiler table
of N steps of each way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
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
from scoring import (  # noqa: E402
    matmul_flops,
    peak_flops_of,
    reset_peak_rss,
    rss_kib,
    sync,
    use_device,
)
from transformers import TrainerCallback  # noqa: E402

import lobass  # noqa: E402,F401
from lobass.artifacts import atomic_write_json  # noqa: E402
from lobass.batches import FeatureDataset  # noqa: E402
from lobass.config import package_data, with_defaults  # noqa: E402
from lobass.data import read_examples  # noqa: E402
from lobass.formatting import IGNORE_INDEX, tokenize_example  # noqa: E402
from lobass.modeling import (  # noqa: E402
    DTYPES,
    load_model,
    load_tokenizer,
    lora_config,
    resolve_model_path,
)
from lobass.shared_prefix import shared_prefix_length  # noqa: E402
from lobass.training import (  # noqa: E402
    shares_prefix,
    train_lora,
    training_arguments,
    training_plan,
)


def loss_tolerance(dtype: str) -> float:
    """Largest per-step loss difference between two correct paths computing in ``dtype``.

    float32: 1e-4 (reordered sums of ~1e-7 relative error over a loss of ~10). bf16 and fp16
    round every activation to 8 or 11 bits of mantissa, so the two paths (prefix shared or not,
    head at response positions or everywhere) differ by a few units of the dtype's ``eps``:
    ~6e-3 was seen in bf16 against an eps of 7.8e-3; two eps leave room without hiding a real
    error (a wrong mask or scale moves the loss by far more than 0.1).
    """
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise SystemExit(f"model.dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return max(1e-4, 2 * torch.finfo(dtypes[dtype]).eps)


class StepMeter(TrainerCallback):
    """Wall time of the training loop and of every step, resident memory after every step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.start = self.seconds = self.last = 0.0
        self.rss_mib: list[float] = []
        self.step_s: list[float] = []
        self.log_history: list[dict[str, float]] = []
        # Filled by count(), a forward pre-hook on the model: what each way really ran.
        self.positions = self.passes = self.tokens = self.real_run = self.prefix_positions = 0
        self.step_tokens: list[int] = []

    def count(self, _module, _args, kwargs) -> None:
        """Forward pre-hook: positions run (padding included), passes, the rows' real tokens.

        With ``share_prefix`` a step's prefix runs alone (no attention mask: not a pass over rows)
        and every pass runs its rows' tokens after the prefix, while its attention mask still
        covers the whole rows: the rows' tokens are the mask's, the positions run the ids'.
        """
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        self.positions += int(ids.numel())
        if mask is None:  # the shared prefix, once per step
            self.prefix_positions += int(ids.numel())
            self.real_run += int(ids.numel())
            return
        self.passes += 1
        self.tokens += int(mask.sum())
        self.real_run += int(mask[:, -ids.shape[1]:].sum())

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.start = self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        now = time.perf_counter()
        self.step_s.append(now - self.last)
        self.step_tokens.append(self.tokens - sum(self.step_tokens))
        self.last = now
        self.rss_mib.append(rss_kib() / 1024)

    def on_train_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        self.log_history = [e for e in state.log_history if "loss" in e]

    def steady_rate(self) -> float:
        """Real tokens/s without the first step (warm-up; compilation when asked)."""
        return sum(self.step_tokens[1:]) / sum(self.step_s[1:])

    def padding(self) -> float:
        """Share of the positions run that were padding."""
        return 1 - self.real_run / self.positions

    def pass_width(self) -> int:
        """Mean positions of a pass over rows (the shared prefix's own pass left out)."""
        return round((self.positions - self.prefix_positions) / self.passes)


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
    # in the weights' dtype: bf16 weights (CUDA) take bf16 activations, as in the step itself
    inputs = [torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights]
    grads = [torch.randn(rows, w.shape[0], device=device, dtype=w.dtype) for w in weights]
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


def user_loop(model, tokenizer, features, recipe, targets, work: Path, dtype: str,
              callbacks) -> None:
    """What a user writes: peft + ``Trainer`` defaults (shuffled rows, whole batches of
    ``batch_size``), ``DataCollatorForSeq2Seq`` padding and the model's own loss."""
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    set_seed(0)
    peft_model = get_peft_model(model, lora_config(recipe.lora, targets))
    whole = OmegaConf.merge(recipe, {"micro_batch_size": None, "compile": False})
    args = replace(training_arguments(whole, work, 0, "none", dtype),
                   train_sampling_strategy="random")  # the Trainer's default order
    Trainer(model=peft_model, args=args, train_dataset=FeatureDataset(features),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                 label_pad_token_id=IGNORE_INDEX),
            callbacks=callbacks).train()


def train_once(cfg, path, tokenizer, features, way: str, *, device: str, profile: int,
               recipe):
    """One fresh model trained one way (``user``, ``plain`` or ``lobass``).

    Returns the meter (loop seconds, per-step seconds, tokens and RSS, padding), the per-step
    losses and the peak memory.
    """
    model = load_model(cfg.model, path)
    with torch.no_grad():  # page in every weight (safetensors loads lazily through mmap)
        sum(float(p.sum()) for p in model.parameters())
    meter = StepMeter(device)
    model.register_forward_pre_hook(meter.count, with_kwargs=True)
    callbacks = [meter] + ([Profiled(profile)] if profile else [])
    reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    targets = list(cfg.model.lora_targets)
    with tempfile.TemporaryDirectory() as tmp:
        if way == "user":
            user_loop(model, tokenizer, features, recipe, targets, Path(tmp), cfg.model.dtype,
                      callbacks)
            losses = [e["loss"] for e in meter.log_history]
        else:
            train_lora(model, tokenizer, features, recipe, targets, Path(tmp), seed=0,
                       dtype=cfg.model.dtype, response_only=way == "lobass", callbacks=callbacks)
            losses = [e["loss"] for e in json.loads((Path(tmp) / "log_history.json").read_text())]
        if way == "lobass":  # the saved adapter loads in plain peft
            from peft import PeftModel

            PeftModel.from_pretrained(load_model(cfg.model, path), str(Path(tmp) / "adapter"))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else rss_kib("VmHWM") / 1024)
    del model
    return meter, losses, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a conf/model option "
                        "(smollm2_135m, gemma3_270m)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="plain and lobass train each batch in passes of at most N rows "
                        "(default: the recipe's, 2 on the CPU; 0 = whole batches)")
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="LoRA dropout of every way (default: the recipe's, 0 on the CPU; "
                        "0.05 is the GPU recipe's and what the CPU recipe had before issue 14)")
    parser.add_argument("--compile", action="store_true",
                        help="lobass with train.compile (decoder layers through torch.compile)")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="lobass without train.share_prefix (the rows' shared template "
                        "prefix encoded in every row, as before it)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="model.dtype (default: the model config's on the CPU, bfloat16 "
                        "on CUDA)")
    parser.add_argument("--loss-tolerance", type=float, default=None,
                        help="largest per-step |plain - lobass| loss accepted (default: "
                        "loss_tolerance of the dtype)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--profile", type=int, default=0, help="profile N steps of each way")
    parser.add_argument("--models-dir", default=str(ROOT / "artifacts" / "models"))
    parser.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = parser.parse_args()
    use_device(args.device, args.threads)

    overrides = [f"model={args.model}", "reference.epochs=1", f"reference.max_steps={args.steps}",
                 f"reference.batch_size={args.batch_size}", "reference.logging_steps=1",
                 "reference.save_steps=100000", "logger=none"]
    if args.device == "cuda":
        overrides += ["model.dtype=bfloat16", "model.device=cuda"]
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    if args.lora_dropout is not None:
        overrides.append(f"reference.lora.dropout={args.lora_dropout}")
    if args.micro_batch_size is not None:
        overrides.append(f"reference.micro_batch_size={args.micro_batch_size or 'null'}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=overrides))
    recipes = {"user": cfg.reference, "plain": cfg.reference,
               "lobass": OmegaConf.merge(cfg.reference, {"compile": args.compile,
                                                         "share_prefix": not args.no_share_prefix})}
    path, _ = resolve_model_path(cfg.model, Path(args.models_dir).resolve())
    tokenizer = load_tokenizer(cfg.model, path)
    examples, _ = read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca",
                                max_rows=args.steps * args.batch_size)
    features = [tokenize_example(e, tokenizer, cfg.model.template, args.max_length)
                for e in examples]
    tokens = sum(len(f.input_ids) for f in features)
    prefix = shared_prefix_length(features) if shares_prefix(recipes["lobass"]) else 0
    print(f"model={args.model} device={args.device} threads={torch.get_num_threads()} "
          f"rows={len(features)} tokens={tokens} "
          f"response_tokens={sum(f.n_response for f in features)} "
          f"batch={args.batch_size} rows_per_pass={training_plan(cfg.reference).rows_per_pass} "
          f"lora_dropout={cfg.reference.lora.dropout} compile={args.compile} "
          f"shared_prefix={prefix} "
          f"steps={args.steps} load={os.getloadavg()[0]:.1f}")

    params, gemm_fraction = 0, float("nan")
    tolerance = (loss_tolerance(cfg.model.dtype) if args.loss_tolerance is None
                 else args.loss_tolerance)
    # The ceiling and the MFU peak are those of the dtype the model computes in: bf16 work over
    # a float32 matmul (or the fp32 peak) would overstate its fraction up to 15x on a GPU.
    dtype = DTYPES[cfg.model.dtype]
    peak, peak_name = peak_flops_of(args.device, dtype, 0.0)
    runs: list[dict[str, float]] = []
    ways = ("user", "plain", "lobass")
    for repeat in range(args.repeats):
        before = matmul_flops(args.device, dtype=dtype)
        figures = {}
        for way in ways if repeat % 2 == 0 else ways[::-1]:  # alternate: drift cancels
            figures[way] = train_once(cfg, path, tokenizer, features, way, device=args.device,
                                      profile=args.profile if repeat == 0 else 0,
                                      recipe=recipes[way])
        after = matmul_flops(args.device, dtype=dtype)
        ceiling = (before + after) / 2
        if repeat == 0:  # loaded after the timed ways, so it never adds to their memory
            model = load_model(cfg.model, path)
            params = sum(p.numel() for p in model.parameters())
            meter = figures["lobass"][0]
            width = meter.pass_width()
            gemm_fraction = layer_gemm_flops(model, width, args.device) / ceiling
            del model
            print(f"a decoder layer's own matmuls at {width} positions (lobass's mean pass): "
                  f"{gemm_fraction:.3f} of the square matmul (the ceiling of "
                  "train_matmul_fraction for this model's shapes)")
        diff = max(abs(a - b) for a, b in zip(figures["plain"][1], figures["lobass"][1],
                                              strict=True))
        print(f"repeat {repeat}: matmul {before / 1e9:.1f} / {after / 1e9:.1f} GFLOP/s "
              f"before / after; per-step loss max |plain - lobass| = {diff:.2e} over "
              f"{len(figures['plain'][1])} steps; load {os.getloadavg()[0]:.1f}")
        run: dict[str, float] = {"matmul_gflops": ceiling / 1e9, "max_loss_diff": diff}
        for way in ways:
            meter, _, peak = figures[way]
            rate = 4 * params * tokens / meter.seconds
            if peak:  # model FLOP utilisation against the datasheet's dense peak of the dtype
                run[f"{way}_mfu"] = rate / peak
            run.update({f"{way}_s": meter.seconds, f"{way}_matmul_fraction": rate / ceiling,
                        f"{way}_steady_tokens_per_s": meter.steady_rate(),
                        f"{way}_padding": meter.padding(), f"{way}_peak_mib": peak})
            print(f"  {way:<7} {meter.seconds:8.2f} s {tokens / meter.seconds:7.1f} tokens/s "
                  f"(after step 1: {meter.steady_rate():7.1f}) {rate / ceiling:.3f} of matmul; "
                  f"padding {meter.padding():.3f} over {meter.passes} passes; peak memory "
                  f"{peak:.0f} MiB; RSS per step (MiB) "
                  + " ".join(f"{r:.0f}" for r in meter.rss_mib))
        run["speedup"] = run["user_s"] / run["lobass_s"]
        run["speedup_same_batches"] = run["plain_s"] / run["lobass_s"]
        print(f"  lobass vs user {run['speedup']:.3f}x, vs plain (same batches) "
              f"{run['speedup_same_batches']:.3f}x")
        runs.append(run)
        if args.json:  # after every repeat: a later failure or a kill keeps these figures
            atomic_write_json(Path(args.json), {
                "model": args.model, "device": args.device, "dtype": cfg.model.dtype,
                "tokens": tokens, "params": params, "layer_gemm_fraction": gemm_fraction,
                "compile": args.compile, "loss_tolerance": tolerance,
                "matmul_dtype": str(dtype).removeprefix("torch."), "mfu_peak": peak_name,
                "peak_tflops": peak / 1e12 if peak else None,
                "loss_check_ok": all(r["max_loss_diff"] < tolerance for r in runs),
                "runs": runs})
    speedups = [r["speedup"] for r in runs]
    fractions = [r["lobass_matmul_fraction"] for r in runs]
    print("speedup over repeats: " + " ".join(f"{s:.3f}" for s in speedups)
          + "; same batches: " + " ".join(f"{r['speedup_same_batches']:.3f}" for r in runs)
          + "; matmul fraction: " + " ".join(f"{f:.3f}" for f in fractions))
    print(f"train_speedup={statistics.median(speedups):.3f} "
          f"train_matmul_fraction={statistics.median(fractions):.3f}")
    worst = max(r["max_loss_diff"] for r in runs)
    if worst >= tolerance:
        raise SystemExit(f"plain and lobass per-step losses differ by {worst:.2e}, over the "
                         f"{cfg.model.dtype} tolerance {tolerance:.1e} (the figures are written)")


if __name__ == "__main__":
    main()
