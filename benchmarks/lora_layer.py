"""Where a LoRA training step's time goes, one decoder layer at a time (Llama-architecture models).

run: .venv/bin/python benchmarks/lora_layer.py [--rows 2 --positions 88] [--no-compile]

``training.py`` measures whole loops; this isolates the decoder layers of the default model
(SmolLM2's shape, read from its converted checkpoint; weights random, which does not change the
time) to show what separates ``train_matmul_fraction`` from the layer's own products. A few
layers run forward and backward with respect to their input (a frozen base: the gradient that
LoRA training sends down every layer) at lobass's pass width, six ways:

1. products: only the layer's linear products, forward ``x W^T`` and input gradient ``g W``
   (``training.layer_gemm_flops``, the ceiling ``training.py`` prints);
2. no adapter: the layer as transformers runs it, without LoRA (norms, RoPE, attention, SwiGLU);
3. peft LoRA: the layer with peft's LoRA (the recipe's rank, on the recipe's targets), as
   lobass trains it;
4. one node per projection: a hand-written ``torch.autograd.Function`` for each adapted
   projection (base and adapter in one node, the scaling folded into ``addmm``): what removing
   peft's Python and autograd overhead, short of a fused kernel, would buy;
5. and 6.: 3 and 4 with the layers compiled (``torch.compile``, as ``train.compile`` does).

Each is reported in ms per layer and as a fraction of the square matmul measured in the same
process (``scoring.matmul_flops``), with the layer's products' FLOPs (4 x weights x positions) as
the work: the ``4 x params`` count of ``training.py`` restricted to one layer. The last line is
``layer_fractions products=<a> no_adapter=<b> peft=<c>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from scoring import matmul_flops  # noqa: E402
from training import layer_gemm_flops  # noqa: E402

from lobass.config import with_defaults  # noqa: E402
from lobass.memory.shape import architecture_config  # noqa: E402
from lobass.modeling import lora_config, resolve_model_path  # noqa: E402


class OneNodeLoRA(torch.autograd.Function):
    """``x W^T + s (x A^T) B^T`` and its gradients in one autograd node (the reference for 4.)."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):  # type: ignore[override]
        flat = x.reshape(-1, x.shape[-1])
        xa = flat @ lora_a.t()
        y = torch.mm(flat, weight.t()).addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.shape = scaling, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        flat, weight, lora_a, lora_b, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        g_xa = torch.mm(g, lora_b).mul_(ctx.scaling)
        g_b = torch.mm(g.t(), xa).mul_(ctx.scaling)
        g_a = torch.mm(g_xa.t(), flat)
        g_x = torch.mm(g, weight).addmm_(g_xa, lora_a)
        return g_x.view(ctx.shape), None, g_a, g_b, None


def one_node_forward(self, x, *args, **kwargs):
    name = self.active_adapters[0]
    return OneNodeLoRA.apply(x, self.base_layer.weight, self.lora_A[name].weight,
                             self.lora_B[name].weight, self.scaling[name])


def seconds_per_call(fn: Callable[[], None], seconds: float = 4.0) -> float:
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m", help="a Llama-architecture conf/model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=2, help="rows per pass (the CPU recipe's 2)")
    parser.add_argument("--positions", type=int, default=88,
                        help="positions per row (a shipped Alpaca row after the shared prefix)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: none)")
    parser.add_argument("--models-dir", default=str(ROOT / "artifacts" / "models"))
    args = parser.parse_args()
    from peft import get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = with_defaults(compose(config_name="config", overrides=[f"model={args.model}"]))
    path, _ = resolve_model_path(cfg.model, Path(args.models_dir).resolve())
    config = architecture_config(cfg.model, path, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    model.requires_grad_(False)
    rows, width = args.rows, config.hidden_size
    x = torch.randn(rows, args.positions, width)
    positions = torch.arange(args.positions)[None].expand(rows, -1)
    rotary = model.get_decoder().rotary_emb(x, positions)

    def through(layers: list[torch.nn.Module]) -> Callable[[], None]:
        def step() -> None:
            h = x.clone().requires_grad_()
            for layer in layers:
                h = layer(h, position_embeddings=rotary, attention_mask=None)
                h = h[0] if isinstance(h, tuple) else h
            h.sum().backward()
        return step

    weights = [m.weight for m in model.get_decoder().layers[0].modules()
               if isinstance(m, torch.nn.Linear)]
    tokens = rows * args.positions
    flops = sum(4 * tokens * w.shape[0] * w.shape[1] for w in weights)  # per layer
    times = {"products": args.layers * flops / layer_gemm_flops(model, tokens, "cpu"),
             "no_adapter": seconds_per_call(through(list(model.get_decoder().layers)))}
    peft_model = get_peft_model(model, lora_config(cfg.train.lora, list(cfg.model.lora_targets)))
    adapted = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    for m in adapted:  # B starts at zero; a trained B makes no difference to the time
        torch.nn.init.normal_(m.lora_B[m.active_adapters[0]].weight, std=0.02)
    layers = list(peft_model.get_decoder().layers)
    times["peft"] = seconds_per_call(through(layers))
    for m in adapted:
        m.forward = types.MethodType(one_node_forward, m)
    times["one_node"] = seconds_per_call(through(layers))
    if not args.no_compile:
        for layer in layers:
            layer.compile(dynamic=True, mode=args.compile_mode)
        with torch._dynamo.config.patch(recompile_limit=64):
            times["one_node_compiled"] = seconds_per_call(through(layers))
            for m in adapted:
                del m.forward  # peft's own forward again
            torch._dynamo.reset()
            times["peft_compiled"] = seconds_per_call(through(layers))
    ceiling = matmul_flops("cpu")
    print(f"model={args.model} layers={args.layers} positions={tokens} threads="
          f"{torch.get_num_threads()} lora_r={cfg.train.lora.r} targets="
          f"{len(adapted) // args.layers} square_matmul={ceiling / 1e9:.0f} GFLOP/s")
    fractions = {}
    for way, seconds in times.items():
        fractions[way] = flops * args.layers / seconds / ceiling
        print(f"  {way:<18} {seconds / args.layers * 1e3:7.2f} ms per layer  "
              f"{fractions[way]:.3f} of the square matmul")
    print(f"layer_fractions products={fractions['products']:.3f} "
          f"no_adapter={fractions['no_adapter']:.3f} peft={fractions['peft']:.3f}")


if __name__ == "__main__":
    main()
