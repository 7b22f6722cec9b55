"""Assemble ``gpu_check.json`` from what ``scripts/gpu_check.sh`` left in its output folder.

run: python scripts/gpu_check_report.py OUT_DIR [--mode run|rehearse]   (gpu_check.sh, last)
     python scripts/gpu_check_report.py OUT_DIR --append NAME RC SECONDS LIMIT   (after a step)
     python scripts/gpu_check_report.py OUT_DIR --junit FILE   (exit 1 on a skipped test)

Reads ``steps.jsonl`` (one JSON line per step, appended the moment it ends: name, exit status or
``skipped``/``terminated``, seconds, time limit), the benchmark
figures (``bench_*.json``), the pipeline's ``pipeline_summary.json`` and ``nvidia_smi.txt``, and
writes ``gpu_check.json``: every step's status, the scoring figures (speed-up over the naive loop,
MFU, tokens/s; issue 4's goal is 5x the naive loop on a GPU), the training figures (lobass's
stage against what a user writes, its matmul fraction, peak memory: issue 14), the pipeline's
stage times and metrics. Missing files are recorded as missing, never guessed: a step that
failed, never ran or was killed shows as such, and ``all_ok`` needs every step of the mode.
Standard library only, so it runs whatever state the set-up left.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

GOAL_SPEEDUP = 5.0  # issue 4: scoring at least 5x the naive per-row loop on a GPU
STEPS = {  # what each mode of gpu_check.sh runs, in order
    "run": ("install", "imports", "bench_llama7b", "bench_training", "pipeline", "gpu_tests"),
    "rehearse": ("resolve312", "install_local", "imports", "shape7b", "gpu_config", "pipeline",
                 "gpu_tests_collect"),
}
TRAIN_KEYS = ("speedup", "speedup_same_batches", "lobass_matmul_fraction", "user_peak_mib",
              "lobass_peak_mib", "user_s", "lobass_s", "max_loss_diff")
BENCH_KEYS = ("device", "model", "dtype", "rows", "tokens", "speedup_vs_naive", "tokens_per_s",
              "engine_tflops", "mfu", "naive_mfu", "max_abs_diff", "peak_memory_vs_model")


def read_steps(path: Path) -> dict[str, dict[str, Any]]:
    """``steps.jsonl`` as ``{name: {rc, seconds, limit_s, ok, timed_out}}`` (a rerun step: last).

    Raises:
        ValueError: a malformed line, naming the file and line.

    """
    steps: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return steps
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            steps[entry["name"]] = {k: entry[k] for k in ("rc", "seconds", "limit_s", "ok",
                                                          "timed_out")}
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a step line ({error}): {line!r}") from None
    return steps


def step_entry(name: str, rc: str, seconds: str, limit: str) -> dict[str, Any]:
    """One step's JSON line; ``rc`` an exit status, ``skipped`` or ``terminated``.

    Raises:
        ValueError: a non-numeric exit status, seconds or limit (decimals are accepted).

    """
    status: int | str = rc if rc in ("skipped", "terminated") else int(rc)
    return {"name": name, "rc": status, "seconds": float(seconds), "limit_s": float(limit),
            "ok": status == 0, "timed_out": status in (124, 137)}


def append_step(out: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to ``out/steps.jsonl`` as one line, flushed to disk before returning."""
    with (out / "steps.jsonl").open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def junit_skips(path: Path) -> tuple[int, int]:
    """``(tests, skipped)`` of a pytest ``--junitxml`` file (0, 0 when it is missing)."""
    if not path.is_file():
        return 0, 0
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return (sum(int(s.get("tests", 0)) for s in suites),
            sum(int(s.get("skipped", 0)) for s in suites))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def assemble(out: Path, mode: str = "run") -> dict[str, Any]:
    """The report of one ``gpu_check.sh`` run (``mode``: run or rehearse) in ``out``."""
    smi = out / "nvidia_smi.txt"
    header = re.search(r"Driver Version:\s*(\S+)\s+CUDA Version:\s*(\S+)",
                       smi.read_text()) if smi.is_file() else None
    report: dict[str, Any] = {
        "driver": header[1] if header else None,
        "driver_cuda": header[2] if header else None,
        "mode": mode,
        "steps": read_steps(out / "steps.jsonl"),
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
    tests, skipped = junit_skips(out / "gpu_tests.xml")
    if mode == "run":
        report["gpu_tests"] = {"tests": tests, "skipped": skipped}
    report["missing_steps"] = [n for n in STEPS[mode] if n not in report["steps"]]
    report["all_ok"] = not report["missing_steps"] and all(
        report["steps"][n]["ok"] for n in STEPS[mode])
    return report


def main(argv: list[str] | None = None) -> int:
    """Write ``<OUT_DIR>/gpu_check.json`` and print it; or append a step; or check a junit file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=sorted(STEPS), default="run")
    parser.add_argument("--append", nargs=4, metavar=("NAME", "RC", "SECONDS", "LIMIT"))
    parser.add_argument("--junit", type=Path, help="exit 1 unless it ran tests and skipped none")
    args = parser.parse_args(argv)
    if args.append:
        append_step(args.out, step_entry(*args.append))
        return 0
    if args.junit:
        tests, skipped = junit_skips(args.junit)
        print(f"{args.junit}: {tests} tests, {skipped} skipped")
        return 0 if tests and not skipped else 1
    report = assemble(args.out, args.mode)
    text = json.dumps(report, indent=1, sort_keys=True)
    tmp = args.out / "gpu_check.json.tmp"  # renamed into place: a kill never leaves half a file
    tmp.write_text(text + "\n")
    tmp.replace(args.out / "gpu_check.json")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
