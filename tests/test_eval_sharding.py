"""The eval stage sharded over ``torchrun`` ranks gives a one-process run's artifact.

The split and gather helpers against the plain computation; generation resuming from the work
files of killed ranks; and two gloo ranks on CPU against one process (slow).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, TINY
from lobass.config import package_data
from lobass.distributed import map_shards, on_main, shard, solo, unshard
from lobass.evaluation.generation import generate_responses, rank_batches, rank_work_file
from lobass.evaluation.prompts import read_prompts
from lobass.jsonrows import jsonl_text


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 6, 13])
def test_strided_shares_cover_every_item_once_and_unshard_restores_the_order(n, world):
    items = [f"row{i}" for i in range(n)]
    shares = [shard(items, rank, world) for rank in range(world)]
    assert sorted(sum(shares, [])) == sorted(items)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert shares[0][:2] == items[0:world + 1:world][:2]  # rank 0: rows 0, world, ...
    # Each rank maps its own share; the gathered results are the one-process results in order.
    assert unshard([[s.upper() for s in share] for share in shares]) == [s.upper() for s in items]


def test_unshard_refuses_shares_no_strided_split_gives():
    with pytest.raises(ValueError, match=r"shares of sizes \[1, 2\] are not a strided split "
                                         r"of 3 items over 2 ranks"):
        unshard([["a"], ["b", "c"]])


def test_map_shards_on_one_process_is_the_plain_call_and_solo_is_one_rank():
    values = [3.0, 1.0, 2.0]
    assert map_shards(lambda share: [v * 2 for v in share], values) == [6.0, 2.0, 4.0]
    with solo():  # rank 0 working alone for a group: its own helpers never wait for the others
        assert on_main(lambda: map_shards(lambda s: s[::-1], [1, 2])) == [2, 1]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_answer_the_one_process_batches_unchanged(world):
    prompts = [f"p{i}" for i in range(7)]  # sorted longest first by the caller
    alone, n = rank_batches(prompts, 2, 0, 1)
    assert alone == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"], ["p6"]] and n == 4
    shares = [rank_batches(prompts, 2, rank, world)[0] for rank in range(world)]
    # every one-process batch, with the same prompts in it, on exactly one rank
    assert sorted(sum(shares, [])) == alone and unshard(shares) == alone


def test_generation_resumes_from_killed_ranks_work_files(tiny, tmp_path):
    """A two-rank run killed mid-set: rank 0's file holds one batch and a torn line, rank 1's a
    batch; a resumed run (one process here) merges them and answers the rest, as a fresh run."""
    model, tokenizer = tiny
    prompts = read_prompts(package_data("vicuna_eval/question.jsonl"), "fastchat", max_rows=5)
    kwargs = {"template": "chat", "max_new_tokens": 6, "batch_size": 2, "set_name": "vicuna"}
    fresh = generate_responses(model, tokenizer, prompts, tmp_path / "fresh" / "v.jsonl", **kwargs)
    path = tmp_path / "killed" / "v.jsonl"
    path.parent.mkdir()
    by_id = {r["id"]: r for r in fresh}
    rank_work_file(path, 0).write_text(jsonl_text([by_id["1"], by_id["4"]]) + '{"id": "2", "ou')
    rank_work_file(path, 1).write_text(jsonl_text([by_id["3"]]))
    path.write_text(jsonl_text([by_id["5"]]))  # merged by an earlier resume
    resumed = generate_responses(model, tokenizer, prompts, path, **kwargs)
    assert resumed == fresh
    assert path.read_text() == (tmp_path / "fresh" / "v.jsonl").read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.jsonl"]  # work files merged


# Every eval part sharded or waited for: four reference-loss sets (one trimmed), GSM8K, IFEval
# and the judge on rank 0, and two prompt sets in batches of 2 (vicuna: 5 prompts in batches of
# 2, 2 and 1: rank 0 answers batches 0 and 2, rank 1 batch 1; padded batches, so their
# composition matters).
EVAL_2R = [*TINY, "train=none", "stages=[eval]", "eval.generation.batch_size=2",
           "eval.generation.sets.vicuna.max_rows=5", "eval.generation.sets.alpaca_eval.max_rows=3",
           "eval.heldout.max_rows=7"]
TIMING = ("eval/generate_seconds", "eval/benchmarks_seconds")


def _run(tmp_path: Path, name: str, models_dir: Path, ranks: int,
         baseline: Path) -> tuple[Path, str]:
    artifacts, run_dir = tmp_path / name / "artifacts", tmp_path / name / "run"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable])
    cmd = [*launcher, str(ROOT / "run.py"), *EVAL_2R, f"eval.judge.baseline={baseline}",
           f"artifacts_dir={artifacts}",
           f"models_dir={models_dir}", f"output_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return artifacts, out.stdout + out.stderr


@pytest.mark.slow
def test_two_ranks_write_the_one_process_eval_artifact(tmp_path, models_dir, tiny):
    # the answers vicuna's are judged against (the run's initial model judges, on rank 0)
    baseline = tmp_path / "baseline.jsonl"
    baseline.write_text(jsonl_text({"set": "vicuna", "id": str(i), "output": f"Answer {i}."}
                                   for i in range(1, 6)))
    (one, _), (two, log) = (_run(tmp_path, name, models_dir, ranks, baseline)
                            for name, ranks in (("one", 1), ("two", 2)))
    # both ranks did a share: 7 held-out rows split 4 + 3, vicuna's 3 batches 2 + 1
    assert "rank 0 of 2 scores 4 of 7 rows" in log and "rank 1 of 2 scores 3 of 7 rows" in log
    assert "rank 0 of 2 answers 2 of 3 batches of vicuna" in log
    assert "rank 1 of 2 answers 1 of 3 batches of vicuna" in log
    [eval_one], [eval_two] = ([p for p in (a / "eval").iterdir() if p.is_dir()] for a in (one, two))
    assert eval_one.name == eval_two.name and not eval_one.name.endswith(".partial")  # one key
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (eval_one, eval_two))
    assert m1.keys() == m2.keys() and {"eval/heldout/loss", "eval/gsm8k/strict_acc",
                                       "eval/vicuna/gen_len_tokens",
                                       "eval/vicuna/win_rate"} <= m1.keys()
    for key in m1.keys() - set(TIMING):
        if "loss" in key:  # held-out losses: the shares are batched apart (float rounding)
            assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
        else:
            assert m2[key] == m1[key], key
    # per-row losses: the same rows in the same order, each within 1e-6
    t1, t2 = (pd.read_csv(d / "per_prompt_losses.csv") for d in (eval_one, eval_two))
    assert (t1["set"] == "heldout").sum() == 7 and len(t1) == len(t2)
    assert (t1[["set", "id"]] == t2[["set", "id"]]).all().all()
    for column in ("loss", "loss_trimmed"):
        np.testing.assert_allclose(t2[column], t1[column], rtol=0, atol=1e-6, equal_nan=True)
    for name in sorted(p.name for p in (eval_one / "losses").iterdir()):
        r1, r2 = ((eval / "losses" / name).read_text().splitlines() for eval in (eval_one,
                                                                                  eval_two))
        assert [json.loads(x)["id"] for x in r1] == [json.loads(x)["id"] for x in r2]
    # answers: each set's artifact has the same key and byte-identical files, and no work files
    g1, g2 = (json.loads((d / "generations.json").read_text()) for d in (eval_one, eval_two))
    assert g1.keys() == {"vicuna", "alpaca_eval"}
    for name in g1:
        a, b = Path(g1[name]), Path(g2[name])
        assert a.parent.name == b.parent.name
        assert sorted(p.name for p in b.parent.iterdir()) == sorted(
            p.name for p in a.parent.iterdir())
        assert b.read_text() == a.read_text() and len(a.read_text().splitlines()) in (3, 5)
    # the judge's raw verdicts (rank 0 alone in both) on the same answers: the same records
    verdicts = [(d / "judge" / "vicuna.jsonl").read_text() for d in (eval_one, eval_two)]
    assert verdicts[0] == verdicts[1] and len(verdicts[0].splitlines()) == 5
