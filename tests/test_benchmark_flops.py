"""benchmarks/flops.py: the FLOPs the scoring engine executes and the bf16 peak table for MFU."""

import sys

import pytest

from conftest import ROOT
from lobass.formatting import IGNORE_INDEX, Features

sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import (  # noqa: E402
    Dims,
    attention_pairs,
    bf16_peak_tflops,
    engine_flops,
    model_dims,
    naive_flops,
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
    ("NVIDIA GeForce RTX 4090", 165.0),
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
