"""benchmarks/flops.py: the FLOPs the scoring engine executes and the table of peaks for MFU."""

import sys

import pytest

from conftest import ROOT
from lobass.formatting import IGNORE_INDEX, Features

sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import (  # noqa: E402
    PEAK_TFLOPS,
    Dims,
    attention_pairs,
    bf16_peak_tflops,
    engine_flops,
    model_dims,
    naive_flops,
    peak_tflops,
)


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.2),  # Ada whitepaper: FP32 accumulate
    ("NVIDIA GeForce GTX 1080", None),  # unknown: the benchmark asks for --peak-tflops
])
def test_peak_by_the_name_cuda_reports(name, tflops):
    assert bf16_peak_tflops(name) == tflops


def _row(n, prompt):
    return Features(list(range(n)), [IGNORE_INDEX] * prompt + list(range(prompt, n)), prompt,
                    False)


def test_engine_counts_only_what_it_executes():
    dims = Dims(body_params=1000, head_params=300, layers=2, hidden=8)
    rows = [_row(10, 4), _row(6, 5)]  # 6 and 1 response tokens; prefix of 3 shared
    assert attention_pairs(10, 3) == sum(p + 1 for p in range(3, 10)) == 49
    body = 2 * 1000 * (3 + (10 - 3) + (6 - 3))  # prefix once, then each row's own tokens
    attention = 4 * 2 * 8 * (attention_pairs(3, 0) + 49 + attention_pairs(6, 3))
    head = 2 * 300 * (6 + 1)  # response positions only
    assert engine_flops(dims, rows, prefix=3) == body + attention + head
    # the naive loop: every token through body and head, no prefix reuse
    naive = 2 * 1300 * 16 + 4 * 2 * 8 * (attention_pairs(10, 0) + attention_pairs(6, 0))
    assert naive_flops(dims, rows) == naive
    assert engine_flops(dims, rows, prefix=3) < naive


def test_dims_of_a_tied_model(tiny):
    model, tokenizer = tiny
    dims = model_dims(model)
    total = sum(p.numel() for p in model.parameters())
    vocab, h = model.config.vocab_size, model.config.hidden_size
    assert model.config.tie_word_embeddings  # one matrix: the lookup is free, the head is not
    assert (dims.head_params, dims.body_params) == (vocab * h, total - vocab * h)
    assert (dims.layers, dims.hidden) == (2, 4 * 16)


@pytest.mark.parametrize("name,dtype,tf32,tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", True, 989.0),  # bf16 work: the bf16 peak
    ("NVIDIA H100 80GB HBM3", "float16", False, 989.0),
    ("NVIDIA H100 80GB HBM3", "float32", True, 494.5),  # float32 with TF32 on: TF32's
    ("NVIDIA H100 80GB HBM3", "float32", False, 67.0),  # TF32 off: the CUDA cores'
    ("NVIDIA A100-SXM4-80GB", "float32", True, 156.0),
    ("NVIDIA A100-SXM4-80GB", "torch.bfloat16", True, 312.0),  # str(tensor.dtype) too
    ("NVIDIA H100 PCIe", "float32", True, 378.0),
    ("NVIDIA L4", "float32", True, 60.0),
    ("NVIDIA GeForce GTX 1080", "bfloat16", True, None),
])
def test_mfu_divides_by_the_peak_of_the_dtype_it_runs_at(name, dtype, tf32, tflops):
    assert peak_tflops(name, dtype, tf32) == tflops


def test_every_peak_names_its_source_and_is_dense():
    for pattern, peaks in PEAK_TFLOPS:
        assert peaks.source and ("datasheet" in peaks.source or "whitepaper" in peaks.source
                                 or "AWS" in peaks.source), pattern
        # dense figures: TF32 is half of bf16 on every part listed, FP32 never above TF32
        assert peaks.tf32 == pytest.approx(peaks.bf16 / 2, rel=0.02), pattern
        assert peaks.fp32 <= peaks.tf32, pattern


@pytest.mark.slow
def test_scoring_benchmark_runs_on_the_cpu_with_the_peak_of_its_dtype(tmp_path, models_dir):
    """The CPU smoke run of benchmarks/scoring.py; --peak-tflops takes the MFU path here."""
    import json
    import subprocess

    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/scoring.py", "--model", "tiny_offline", "--rows", "8",
         "--max-tokens", "1024", "--peak-tflops", "1", "--models-dir", str(models_dir),
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["dtype"] == "torch.float32" and figures["mfu_peak"] == "fp32 (--peak-tflops)"
    assert figures["peak_tflops"] == 1.0
    assert figures["mfu"] == pytest.approx(figures["engine_tflops"] / 1.0)
    assert figures["max_abs_diff"] < 1e-4
