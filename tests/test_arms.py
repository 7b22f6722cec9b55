"""Study arms through the real pipeline on the tiny model: per-source selection, bottom-k, a token
budget matched to another selection, and the initial model evaluated as a point of its own."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from lobass.pipeline import run

SELECT = [*TINY, "scorer=loss", "stages=[select]"]  # L_init only: no reference needed


def _selected(summary: dict) -> list[dict]:
    return [json.loads(x) for x in Path(summary["artifacts"]["selected"]).read_text().splitlines()]


def _scores(summary: dict) -> dict[str, dict]:
    rows = Path(summary["artifacts"]["scores"]).read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, rows)}


@pytest.mark.slow
def test_paper_mix_ranks_alpaca_alone_and_keeps_all_gsm8k(make_cfg, tmp_path):
    summary = run(make_cfg(*SELECT, "selection.ratio=0.25", "selection.by_source=true",
                           "selection.keep_sources=[gsm8k]"))
    chosen = _selected(summary)
    scores = _scores(summary)
    alpaca = sorted((r for r in scores.values() if r["source"] == "alpaca"),
                    key=lambda r: (-r["score"], r["id"]))
    assert [r["id"] for r in chosen if r["source"] == "alpaca"] == [r["id"] for r in alpaca[:6]]
    assert sum(r["source"] == "gsm8k" for r in chosen) == 8  # every GSM8K row, unranked
    m = summary["metrics"]
    assert m["select/count"] == 14 and m["select/alpaca/rows"] == 6 and m["select/gsm8k/rows"] == 8
    tokens = sum(scores[r["id"]]["n_response_tokens"] for r in chosen)
    assert m["select/response_tokens"] == tokens
    assert summary["point"]["selection"] == {
        "mode": "ratio", "ratio": 0.25, "count": None, "tokens": None, "band": None,
        "order": "top", "by_source": True, "keep_sources": ["gsm8k"], "listed": None}
    meta = json.loads((Path(summary["artifacts"]["selected"]).parent / "meta.json").read_text())
    assert meta["composition"]["gsm8k"]["rows"] == 8 and meta["rule"]["by_source"] is True


@pytest.mark.slow
def test_bottom_k_and_a_random_arm_matched_in_response_tokens(make_cfg, tmp_path):
    top = run(make_cfg(*SELECT, "selection.ratio=null", "selection.count=5"))
    bottom = run(make_cfg(*SELECT, "selection.ratio=null", "selection.count=5",
                          "selection.order=bottom"))
    scores = _scores(top)
    ranked = sorted(scores.values(), key=lambda r: (r["score"], r["id"]))
    assert [r["id"] for r in _selected(bottom)] == [r["id"] for r in ranked[:5]]
    assert bottom["point"]["selection"]["order"] == "bottom"

    # its own run dir: a run removes the summary.json it finds in its own at its start
    matched = run(make_cfg(*TINY, "scorer=random", "stages=[select]", "selection.budget=tokens",
                           f"selection.match_tokens={tmp_path / 'run'}",
                           f"output_dir={tmp_path / 'matched'}"))
    budget = bottom["metrics"]["select/response_tokens"]  # the last run in tmp_path/run
    got = matched["metrics"]["select/response_tokens"]
    assert matched["point"]["selection"]["tokens"] == budget
    random_scores = _scores(matched)
    order = sorted(random_scores.values(), key=lambda r: (-r["score"], r["id"]))
    taken = len(_selected(matched))
    # a prefix of the random order: the one whose token total comes closest to the budget
    assert [r["id"] for r in _selected(matched)] == [r["id"] for r in order[:taken]]
    totals = np.cumsum([r["n_response_tokens"] for r in order])
    distances = np.abs(totals - budget)
    assert taken == int(np.argmin(distances)) + 1 and got == totals[taken - 1]


@pytest.mark.slow
def test_initial_model_is_a_point(make_cfg, tmp_path):
    summary = run(make_cfg(*TINY, "train=none", "eval.gsm8k.enabled=false",
                           "eval.generation.enabled=false"))
    assert list(summary["stages"]) == ["eval"]
    point = summary["point"]  # the pool and the model: content keys, "<name>-<16 hex>"
    assert re.fullmatch(r"alpaca_gsm8k_cpu-[0-9a-f]{16}", point.pop("pool"))
    assert re.fullmatch(r"tiny_random-[0-9a-f]{16}", point.pop("model"))
    assert re.fullmatch(r"eval-[0-9a-f]{16}", point.pop("eval"))
    assert point.pop("recipe") is None  # nothing is trained
    assert point == {"scorer": None, "selection": None, "train": None, "seed": 0,
                     "reference_seed": None}
    assert not (tmp_path / "artifacts" / "finetune").exists()
    assert 5 < summary["metrics"]["eval/heldout/loss"] < 15  # random init: about ln(49152)


def test_listed_arm_keeps_exactly_the_pool_rows_a_peer_selected(make_cfg, tmp_path):
    from lobass.config import package_data

    # A peer's "filtered" file: 5 of the pool's Alpaca rows (re-ordered) and 2 rows not in it.
    pool = json.loads(Path(package_data("alpaca/alpaca_pool_1k.json")).read_text())
    peer = [pool[7], pool[2], pool[20], pool[11], pool[0], pool[500], pool[900]]
    listed = tmp_path / "peer.json"
    listed.write_text(json.dumps(peer))
    summary = run(make_cfg(*SELECT, f"selection.listed={listed}"))
    chosen = {r["id"] for r in _selected(summary)}
    from lobass.data import read_examples

    expected = {e.id for e in read_examples(listed, "alpaca")[0][:5]}  # the 5 in the 24-row pool
    assert chosen == expected and summary["metrics"]["select/count"] == 5
    # counted before any model loads, not silently dropped (issue 27)
    assert (summary["metrics"]["selection/listed/matched"],
            summary["metrics"]["selection/listed/unmatched"]) == (5, 2)
    assert summary["point"]["selection"]["mode"] == "listed"
    assert summary["point"]["selection"]["listed"].startswith("peer.json@")


def test_scores_without_the_end_token_are_a_point_of_their_own(make_cfg):
    plain = run(make_cfg(*SELECT))
    no_eos = run(make_cfg(*SELECT, "score.exclude_eos=true"))
    unaffected = run(make_cfg(*TINY, "scorer=random", "stages=[select]", "score.exclude_eos=true"))
    assert plain["point"]["scorer"] == "loss"
    assert no_eos["point"]["scorer"] == "loss (EOS excluded)"
    assert unaffected["point"]["scorer"] == "random"  # reads no loss: nothing changed
    assert no_eos["point"]["selection"] == plain["point"]["selection"]
