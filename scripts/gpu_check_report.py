"""Assemble ``gpu_check.json`` from what ``scripts/gpu_check.sh`` left in its output folder.

run: python scripts/gpu_check_report.py OUT_DIR        (gpu_check.sh calls it last)

Reads ``steps.tsv`` (one line per step: name, exit status, seconds, time limit), the benchmark
figures (``bench_*.json``), the pipeline's ``pipeline_summary.json`` and ``nvidia_smi.txt``, and
writes ``gpu_check.json``: every step's status, the scoring figures (speed-up over the naive loop,
MFU, tokens/s; issue 4's goal is 5x the naive loop on a GPU), the training figures (lobass's
stage against what a user writes, its matmul fraction, peak memory: issue 14), the pipeline's
stage times and metrics. Missing files are recorded as missing, never guessed: a step that
failed shows as such.
Standard library only, so it runs whatever state the set-up left.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

GOAL_SPEEDUP = 5.0  # issue 4: scoring at least 5x the naive per-row loop on a GPU
TRAIN_KEYS = ("speedup", "speedup_same_batches", "lobass_matmul_fraction", "user_peak_mib",
              "lobass_peak_mib", "user_s", "lobass_s", "max_loss_diff")
BENCH_KEYS = ("device", "model", "dtype", "rows", "tokens", "speedup_vs_naive", "tokens_per_s",
              "engine_tflops", "mfu", "naive_mfu", "max_abs_diff", "peak_memory_vs_model")


def read_steps(path: Path) -> dict[str, dict[str, Any]]:
    """``steps.tsv`` as ``{name: {rc, seconds, limit_s, ok, timed_out}}``.

    Raises:
        ValueError: a malformed line, naming the file and line.

    """
    steps: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return steps
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise ValueError(f"{path}:{number}: expected name, rc, seconds, limit; got {line!r}")
        name, rc, seconds, limit = fields
        steps[name] = {"rc": rc if rc == "skipped" else int(rc), "seconds": float(seconds),
                       "limit_s": int(limit), "ok": rc == "0", "timed_out": rc in ("124", "137")}
    return steps


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def assemble(out: Path) -> dict[str, Any]:
    """The report of one ``gpu_check.sh`` run whose files are in ``out``."""
    smi = out / "nvidia_smi.txt"
    header = re.search(r"Driver Version:\s*(\S+)\s+CUDA Version:\s*(\S+)",
                       smi.read_text()) if smi.is_file() else None
    report: dict[str, Any] = {
        "driver": header[1] if header else None,
        "driver_cuda": header[2] if header else None,
        "steps": read_steps(out / "steps.tsv"),
        "scoring": {},
    }
    for name in ("embedded", "llama7b"):
        bench = _read_json(out / f"bench_{name}.json")
        report["scoring"][name] = ({k: bench.get(k) for k in BENCH_KEYS} if bench
                                   else "missing: the benchmark step failed (see the log)")
    embedded = report["scoring"]["embedded"]
    if isinstance(embedded, dict) and embedded.get("speedup_vs_naive") is not None:
        report["issue4_goal_5x_naive_met"] = embedded["speedup_vs_naive"] >= GOAL_SPEEDUP
    training = _read_json(out / "bench_training.json")
    runs = training.get("runs") if training else None
    report["training"] = ({k: runs[-1].get(k) for k in TRAIN_KEYS}
                          if isinstance(runs, list) and runs
                          else "missing: the training benchmark step failed (see the log)")
    summary = _read_json(out / "pipeline_summary.json")
    if summary is None:
        report["pipeline"] = "missing: the pipeline step failed (see the log)"
    else:
        metrics = summary.get("metrics", {})
        report["pipeline"] = {
            "stages": {k: v.get("seconds") for k, v in summary.get("stages", {}).items()},
            "metrics": {k: v for k, v in metrics.items()
                        if k.startswith(("train/loss", "reference/loss", "score/mean",
                                         "eval/gsm8k/strict_acc", "eval/heldout"))},
        }
    report["all_ok"] = bool(report["steps"]) and all(s["ok"] or s["rc"] == "skipped"
                                                     for s in report["steps"].values())
    return report


def main(argv: list[str] | None = None) -> int:
    """Write ``<OUT_DIR>/gpu_check.json`` and print it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: gpu_check_report.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    report = assemble(out)
    text = json.dumps(report, indent=1, sort_keys=True)
    (out / "gpu_check.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
