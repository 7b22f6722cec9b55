import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel
from safetensors.torch import load_file

from conftest import ROOT, TINY
from lobass.pipeline import run


def _summary(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.slow
def test_all_stages_end_to_end_on_tiny_model_then_everything_is_reused(make_cfg, tmp_path, tiny):
    summary = run(make_cfg(*TINY))
    assert summary == _summary(tmp_path)
    assert list(summary["stages"]) == ["reference", "score", "select", "train", "eval"]
    assert not any(s["reused"] for s in summary["stages"].values())
    # each stage's own peak resident memory (the high-water mark is reset between stages)
    assert all(100 < s["peak_rss_mb"] < 20_000 for s in summary["stages"].values())
    m = summary["metrics"]
    assert m["data/pool_rows"] == 32 and m["select/count"] == 8  # 25% of 24 Alpaca + 8 GSM8K
    assert m["eval/gsm8k/n"] == 2 and m["eval/heldout/n"] == 6
    assert 5 < m["eval/heldout/loss"] < 15  # random init: about ln(49152) = 10.8

    scores = [json.loads(x) for x in Path(summary["artifacts"]["scores"]).read_text().splitlines()]
    assert len(scores) == 32
    for row in scores:
        expected = (row["loss_init"] - row["loss_ref"]) / row["loss_init"]
        assert row["score"] == pytest.approx(expected, abs=1e-12)
        assert set(row) >= {"id", "source", "n_tokens", "loss_init", "loss_ref", "score"}
    selected_path = Path(summary["artifacts"]["selected"])
    selected = [json.loads(x) for x in selected_path.read_text().splitlines()]
    top = sorted(scores, key=lambda r: (-r["score"], r["id"]))[:8]
    assert [r["id"] for r in selected] == [r["id"] for r in top]
    export = selected_path.with_name("export_pool_format.jsonl").read_text().splitlines()
    assert all({"instruction", "output"} <= set(json.loads(x)) or {"question", "answer"} <=
               set(json.loads(x)) for x in export) and len(export) == 8

    # The adapter is plain peft safetensors with trained (non-zero) LoRA B matrices, and the
    # base weights are untouched: the same initial model loads and the adapter applies on top.
    adapter = Path(summary["artifacts"]["adapter"])
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and w.abs().sum() > 0 for k, w in weights.items())
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = PeftModel.from_pretrained(model, str(adapter))
    wrapped.unload()
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())

    again = run(make_cfg(*TINY))
    assert all(s["reused"] for s in again["stages"].values())
    assert again["metrics"]["eval/heldout/loss"] == m["eval/heldout/loss"]


def test_loss_scorer_needs_no_reference(make_cfg, tmp_path):
    summary = run(make_cfg(*TINY, "scorer=loss", "stages=[score]"))
    assert list(summary["stages"]) == ["score"]
    assert "reference_adapter" not in summary["artifacts"]
    rows = [json.loads(x) for x in Path(summary["artifacts"]["scores"]).read_text().splitlines()]
    assert all(r["loss_ref"] is None and r["score"] == r["loss_init"] for r in rows)
    assert not (tmp_path / "artifacts" / "finetune").exists()
    # lobass then trains the reference and reuses the L_init pass already on disk.
    lobass = run(make_cfg(*TINY, "scorer=lobass", "stages=[score]"))
    assert list(lobass["stages"]) == ["reference", "score"]
    init = {r["id"]: r["loss_init"] for r in rows}
    rows2 = [json.loads(x) for x in Path(lobass["artifacts"]["scores"]).read_text().splitlines()]
    assert all(init[r["id"]] == r["loss_init"] for r in rows2)
    built = [p for p in (tmp_path / "artifacts" / "losses").iterdir()
             if p.is_dir() and not p.name.endswith(".partial")]
    assert len(built) == 2  # L_init (reused by lobass) and L_ref


@pytest.mark.slow
def test_cli_help_cfg_job_and_unknown_key():
    env_run = [sys.executable, str(ROOT / "run.py")]
    out = subprocess.run([*env_run, "--cfg", "job"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "smollm2_135m" in out.stdout
    out = subprocess.run([*env_run, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "scorer: ifd, ifd_chat, length, lobass, loss, random, rho" in out.stdout
    out = subprocess.run([*env_run, "no_such_key=1"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "no_such_key" in out.stderr


@pytest.mark.slow
def test_default_pipeline_on_embedded_model(make_cfg, tmp_path):
    summary = run(make_cfg(
        "logger=wandb", "data.max_rows=12", "data.mix.gsm8k.max_rows=4", "data.max_length=128",
        "selection=count", "selection.count=4", "train.epochs=2", "eval.gsm8k.limit=2",
        "eval.gsm8k.max_gen_toks=32", "eval.heldout.max_rows=8",
        "eval.generation.sets.vicuna.max_rows=2", "eval.generation.max_new_tokens=16",
    ))
    m = summary["metrics"]
    assert m["data/pool_rows"] == 16 and m["select/count"] == 4
    assert 0.2 < m["eval/heldout/loss"] < 4  # an instruction-tuned model on Alpaca answers
    assert m["eval/gsm8k/n"] == 2 and m["eval/gsm8k/flexible_acc"] in (0.0, 0.5, 1.0)
    rows = [json.loads(x) for x in Path(summary["artifacts"]["scores"]).read_text().splitlines()]
    # The reference was fine-tuned on this very pool: on average it fits it better.
    assert sum(r["score"] for r in rows) / len(rows) > 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_cuda_asked_without_cuda_fails_before_anything_is_built(make_cfg, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only failure")
    with pytest.raises(Exception, match="model.device=cpu"):
        run(make_cfg(*TINY, "model.device=cuda"))
    assert not (tmp_path / "artifacts").exists()
    assert (tmp_path / "run" / "error.txt").is_file()
