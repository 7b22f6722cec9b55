"""scripts/gpu_check.sh and its helpers: limits, per-step JSON, the SIGTERM summary, skips.

The whole rehearsal (`bash scripts/gpu_check.sh --rehearse`, ~4 min here) runs in CI (.ci/run);
these cover the parts that decide whether a GPU run leaves usable figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check_report  # noqa: E402
import gpu_image  # noqa: E402


def _dry_run(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **env}, check=False)


def _limits(stdout: str) -> dict[str, float]:
    """``{step: limit}`` from the dry run's lines ``NAME  LIMITs  COMMAND``."""
    words = [line.split() for line in stdout.splitlines()]
    return {w[0]: float(w[1][:-1]) for w in words
            if len(w) > 1 and w[0] in gpu_check_report.STEPS["run"]}


def test_default_limits_fit_one_ten_minute_run_and_decimals_are_accepted():
    limits = _limits(_dry_run().stdout)
    assert list(limits) == list(gpu_check_report.STEPS["run"])
    assert sum(limits.values()) <= 420
    decimal = _dry_run(GPU_CHECK_LIMITS="pipeline=90.5")
    assert decimal.returncode == 0 and _limits(decimal.stdout)["pipeline"] == 90.5
    bad = _dry_run(GPU_CHECK_LIMITS="pipeline=1m")
    assert bad.returncode == 2 and "must be STEP=SECONDS" in bad.stderr


def test_steps_are_appended_one_line_each_and_a_missing_step_fails_the_check(tmp_path):
    gpu_check_report.main([str(tmp_path), "--append", "install", "0", "3.2", "25"])
    gpu_check_report.main([str(tmp_path), "--append", "imports", "terminated", "1.5", "30.5"])
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["install", "imports"]
    report = gpu_check_report.assemble(tmp_path)
    assert report["steps"]["install"] == {"rc": 0, "seconds": 3.2, "limit_s": 25.0, "ok": True,
                                          "timed_out": False}
    assert report["steps"]["imports"]["rc"] == "terminated"
    assert report["steps"]["imports"]["limit_s"] == 30.5
    assert report["missing_steps"] == ["bench_llama7b", "bench_training", "pipeline",
                                       "gpu_tests"]
    assert report["all_ok"] is False


def test_a_skipped_gpu_test_fails_the_junit_check(tmp_path):
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_ran():\n    assert True\n\n"
        "@pytest.mark.skip(reason='no CUDA')\ndef test_skipped():\n    pass\n")
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", str(tmp_path / "test_one.py")],
                   cwd=tmp_path, capture_output=True, check=False)
    assert gpu_check_report.junit_skips(junit) == (2, 1)
    assert gpu_check_report.main([str(tmp_path), "--junit", str(junit)]) == 1
    assert gpu_check_report.main([str(tmp_path), "--junit", str(tmp_path / "none.xml")]) == 1


def test_sigterm_records_the_running_step_and_writes_the_summary(tmp_path):
    """A kill mid-run (the lease ending) still leaves every finished step and the summary."""
    env = {**os.environ, "GPU_CHECK_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable, "PYTHONPATH": ""}
    process = subprocess.Popen(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "out" / "gpu_check.log"
    deadline = time.monotonic() + 120
    # the imports step loads torch, transformers and lm-eval: seconds, time enough to be killed
    while "=== imports (limit" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    steps = [json.loads(line) for line in
             (tmp_path / "out" / "steps.jsonl").read_text().splitlines()]
    assert [s["name"] for s in steps] == ["install", "imports"]
    assert steps[1]["rc"] == "terminated"
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["all_ok"] is False and report["steps"]["imports"]["rc"] == "terminated"


def test_image_stubs_are_wheels_pip_takes_for_the_image_version(tmp_path):
    listing = tmp_path / "image.txt"
    listing.write_text("# the image\ntorch==2.11.0\nsurely-not-installed-pkg\n")
    assert gpu_image.main(["stubs", str(listing), str(tmp_path / "stubs")]) == 0
    wheel = tmp_path / "stubs" / "torch-2.11.0+image-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("torch-2.11.0+image.dist-info/METADATA").decode()
    assert "Version: 2.11.0+image" in metadata and "Requires-Dist" not in metadata
    assert (tmp_path / "stubs" / "constraints.txt").read_text() == "torch==2.11.0+image\n"
    # pip, offline, resolves a requirement on torch to the stub for a Python 3.12 machine
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links",
         str(tmp_path / "stubs"), "-c", str(tmp_path / "stubs" / "constraints.txt"),
         "--python-version", "3.12", "--only-binary=:all:", "--target", str(tmp_path / "t"),
         "torch>=2.6"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Would install torch-2.11.0+image" in result.stdout
    listing.write_text("torch>=2.6\n")
    with pytest.raises(ValueError, match=r"image.txt:1: expected name or name==version"):
        gpu_image.read_image_list(listing)


def test_a_dist_info_without_metadata_names_no_installed_version(tmp_path, monkeypatch):
    # what an earlier rehearsal's image site left on PYTHONPATH once its venv was gone
    (tmp_path / "six-1.0.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gpu_image.installed_version("six") is None
    listing = tmp_path / "image.txt"
    listing.write_text("six\n")
    assert gpu_image.main(["stubs", str(listing), str(tmp_path / "stubs"), "--installed"]) == 0
    assert (tmp_path / "stubs" / "constraints.txt").read_text() == ""


@pytest.mark.slow
def test_training_benchmark_writes_its_json_before_a_failed_loss_check(tmp_path, models_dir):
    """bf16 on a GPU differs by ~6e-3 between the two paths: the figures must survive a check."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/training.py", "--model", "tiny_offline", "--dtype",
         "bfloat16", "--steps", "2", "--batch-size", "2", "--repeats", "1",
         "--loss-tolerance", "0", "--models-dir", str(models_dir), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "over the bfloat16 tolerance 0.0e+00 (the figures are written)" in result.stderr
    figures = json.loads(out.read_text())
    assert figures["dtype"] == "bfloat16" and figures["loss_check_ok"] is False
    assert figures["runs"][0]["lobass_s"] > 0 and figures["runs"][0]["max_loss_diff"] >= 0


def test_loss_tolerance_follows_the_dtype():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from training import loss_tolerance

    assert loss_tolerance("float32") == 1e-4
    assert loss_tolerance("bfloat16") == pytest.approx(2 * 2**-7)  # ~6e-3 was seen on a GPU
    assert loss_tolerance("float16") == pytest.approx(2 * 2**-10)


def test_version_dependent_names_are_the_ones_the_installed_transformers_takes(tiny):
    """transformers 5.20 renamed the cache keyword and the checkpointing argument (5.17: old)."""
    import dataclasses

    from transformers import TrainingArguments

    from lobass.shared_prefix import cache_keyword, output_cache
    from lobass.training import checkpointing_argument

    model, _ = tiny
    decoder = model.get_decoder()
    keyword = cache_keyword(decoder)
    assert keyword in ("cache", "past_key_values")
    out = decoder(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    cache = output_cache(out)
    assert cache.layers[0].keys.shape[2] == 3  # (1, kv_heads, 3, head_dim)
    # the cache goes back in under that keyword: the next token attends to the three cached
    step = decoder(input_ids=torch.tensor([[4]]), use_cache=True, **{keyword: cache})
    assert output_cache(step).layers[0].keys.shape[2] == 4
    assert checkpointing_argument() in {f.name for f in dataclasses.fields(TrainingArguments)}


def test_every_dependency_reaches_the_offline_gpu_machine():
    """A new dependency must be in the image, in the wheelhouse's list, or left out with a why."""
    import re

    import tomllib

    def names(path: Path) -> set[str]:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        return {canonical(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]) for line in lines if line}

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {canonical(re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0]) for d in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    image = names(ROOT / "scripts" / "gpu_image.txt")
    wheelhouse = names(ROOT / "scripts" / "gpu_requirements.txt")
    left_out = {"wandb", "gguf"}  # logger=wandb and GGUF models only (gpu_requirements.txt)
    assert declared - image - wheelhouse - left_out == set()
    assert not wheelhouse & image  # the wheelhouse carries only what the image lacks
