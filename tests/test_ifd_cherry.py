"""Cherry LLM's IFD, exactly: ``scorer=ifd`` against the values Cherry's own code gives.

How ``tests/data/ifd_cherry.json`` was made (once, outside the project tree, in /tmp/cherry):

- Code: Cherry LLM, https://github.com/MingLiiii/Cherry_LLM at commit
  ad15ef5e6fa3219afa6d22dc00779a232e929cda: ``cherry_seletion/data_analysis.py`` (``main`` with
  ``--mod cherry``, which calls ``get_perplexity_and_embedding_part_text`` for the answer alone and
  for the whole text) and ``cherry_seletion/data_by_IFD.py`` (``main`` and its
  ``get_loss_part_text``: the means over the answer's token losses, IFD = mean_2 / mean_1, its
  filters and the top ``--sample_number`` rows).
- Data: rows 0-47 of ``lobass/resources/data/alpaca/alpaca_pool_1k.json`` (18 with an input),
  written unchanged to ``alpaca48.json``.
- Model: the embedded SmolLM2-135M-Instruct as lobass converts it (``resolve_model_path`` with the
  default config: ``artifacts/models/smollm2_135m-e05faa1d78ae7152``, float32 safetensors).
- Commands (HF_HUB_OFFLINE=1, CPU, torch 2.13.0, transformers 5.24.0), for ``L`` in 512 (Cherry's
  setting) and 96 (so that rows are truncated and Cherry's length checks fire)::

    python data_analysis.py --data_path alpaca48.json --save_path alpaca48_cherry_$L.pt \\
        --model_name_or_path $M --max_length $L --prompt alpaca --mod cherry
    python data_by_IFD.py --pt_data_path alpaca48_cherry_$L.pt --json_data_path alpaca48.json \\
        --json_save_path alpaca48_cherry_sel_$L.json --model_name_or_path $M --max_length $L \\
        --sample_number 8 --prompt alpaca

- Changed to run it: ``LlamaTokenizer`` -> ``AutoTokenizer`` in both files (transformers 5's
  ``LlamaTokenizer`` re-tokenises SmolLM2's byte-level BPE vocabulary with LLaMA's rules: 50 of 50
  rows came out different); nothing else (``device_map="auto"`` and ``cache_dir`` kept; CPU is the
  script's own fallback). ``data_by_IFD.py`` also wrote, for every row before its filters,
  ``len_1``, ``len_2``, ``instruct_len``, ``mean_1`` and ``mean_2`` to a side JSON (one appended
  statement; nothing it computes changed).
- In the JSON: ``loss_alone``/``loss_cond`` are ``mean_1``/``mean_2``; ``ppl_*`` are
  ``data_analysis.py``'s ``exp(model loss)`` (NaN -> null where no answer token is left);
  ``ifd = loss_cond / loss_alone``; ``selected_rows`` are the rows ``data_by_IFD.py`` wrote.

Tolerance: 1e-4 relative. Cherry runs one row at a time through ``model(input_ids, labels=...)``
with full logits; lobass batches rows by length (right padding), reuses the shared prompt prefix's
key/value cache and applies the LM head at answer positions only. All float32 on CPU, so the two
differ by summation order only: 2e-6 relative was measured on these rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lobass.config import package_data
from lobass.data import Example, read_examples
from lobass.pipeline import run
from lobass.pool import Pool
from lobass.scoring import SCORERS, compute_response_losses, get_scorer, needed_losses
from lobass.scoring.cherry import (
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    cherry_fields,
    cherry_passes,
    cherry_prompt,
)
from lobass.scoring.runner import flag_nonfinite, loss_inputs, score_rows

GOLDEN = json.loads((Path(__file__).parent / "data" / "ifd_cherry.json").read_text())
RTOL = 1e-4


def _alpaca(n: int) -> list[Example]:
    return read_examples(package_data("alpaca/alpaca_pool_1k.json"), "alpaca", max_rows=n)[0]


def _row(instruction: str, extra: str, output: str, row_id: str = "x") -> Example:
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return Example(row_id, ({"role": "user", "content": user},
                            {"role": "assistant", "content": output}), "alpaca",
                   {"instruction": instruction, "input": extra, "output": output})


def _naive(model, features):
    """Cherry's way, one row at a time: ``model(input_ids, labels=...)``'s own mean loss."""
    with torch.inference_mode():
        return np.array([model(input_ids=torch.tensor([f.input_ids]),
                               labels=torch.tensor([f.labels])).loss.item() for f in features])


def test_cherry_prompt_answer_boundary_and_no_eos(tiny):
    _, tok = tiny
    row = _row("Quote a greeting.", "", '"Hello," she said.')
    assert cherry_prompt("Do it.", "") == PROMPT_NO_INPUT.format(instruction="Do it.")
    assert cherry_prompt("Do it.", "now").endswith("### Input:\nnow\n\n### Response:")
    assert PROMPT_INPUT.count("{input}") == 1
    passes = cherry_passes([row], tok, 512)
    cond, alone = passes.cond[0], passes.alone[0]
    prompt = cherry_prompt(*cherry_fields(row)[:2])
    assert cond.input_ids == tok(prompt + '"Hello," she said.')["input_ids"]
    # SmolLM2's BPE merges ':"' into one token: like Cherry, the answer starts after the prompt's
    # own token count, so that token (half prompt, half answer) is not scored.
    assert cond.n_prompt == len(tok(prompt)["input_ids"])
    assert tok.decode(cond.input_ids[cond.n_prompt - 1]) == ':"'
    assert tok.decode(cond.input_ids[cond.n_prompt:]) == 'Hello," she said.'  # no EOS
    assert tok.decode(alone.input_ids) == '### Response:"Hello," she said.'
    assert alone.n_prompt == 3 and alone.labels[3:] == alone.input_ids[3:]
    assert alone.input_ids[alone.n_prompt:] == cond.input_ids[cond.n_prompt:]
    assert passes.fits.tolist() == [True]


def test_fields_of_other_sources_and_multi_turn_rows():
    gsm = Example("g", ({"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}), "gsm8k", {"question": "2+2?"})
    assert cherry_fields(gsm) == ("2+2?", "", "4")
    dolly = Example("d", gsm.messages, "dolly", {"instruction": "Q", "context": "C"})
    assert cherry_fields(dolly) == ("Q", "C", "4")
    chat = Example("c", ({"role": "system", "content": "s"}, *gsm.messages), "chat", {})
    turns = r"turns \['system', 'user', 'assistant'\]"
    with pytest.raises(ValueError, match=rf"row c .*{turns}.*ifd_chat"):
        cherry_fields(chat)


def test_length_checks_truncation_and_expected_nan(tiny):
    """Cherry's max_length: truncation of each pass, and the rows data_by_IFD.py skips."""
    _, tok = tiny
    long_prompt = _row("word " * 80, "", "Short answer.", "long")
    long_answer = _row("Say a lot.", "", "many words " * 40, "cut")
    short = _row("Say hi.", "", "Hi there.", "ok")
    passes = cherry_passes([long_prompt, long_answer, short], tok, 64)
    assert passes.cond[0].n_response == 0  # the prompt fills max_length: no answer token
    assert len(passes.cond[1].input_ids) == 64 and passes.cond[1].truncated
    prompt_len = len(tok(cherry_prompt("Say a lot.", ""))["input_ids"])
    # The answer-alone pass may run to max_length - prompt + 4 tokens: with "### Response:" only
    # 3 tokens here, it keeps one answer token more than fits after the prompt, and
    # data_by_IFD.py skips the row (prompt + answer-alone tokens > max_length).
    assert len(passes.alone[1].input_ids) == 64 - prompt_len + 4
    assert passes.alone[1].n_response == 64 - prompt_len + 1
    assert passes.fits.tolist() == [False, False, True]
    pool = Pool([long_prompt, long_answer, short], [], {"template": "alpaca", "max_length": 64})
    inputs = loss_inputs(pool, ["ifd_cond", "ifd_alone"], tok)
    assert inputs.expected_nan("ifd_cond").tolist() == [True, False, False]
    losses = {"ifd_cond": np.array([np.nan, 2.0, 1.0]), "ifd_alone": np.array([3.0, 4.0, 2.0])}
    # A NaN by construction is not a fault; the ifd scorer leaves the row unscored.
    flagged = flag_nonfinite(losses, pool.ids, "error",
                             {k: inputs.expected_nan(k) for k in losses})
    assert not flagged.any()
    rows = score_rows(pool.ids, ["alpaca"] * 3, passes.cond, losses, [SCORERS["ifd"]], flagged, 0,
                      inputs.facts)
    assert [r["score"] for r in rows] == [None, None, 0.5]
    assert rows[1]["loss_ifd_cond"] == 2.0 and rows[1]["loss_ifd_alone"] == 4.0
    with pytest.raises(ValueError, match="1 rows have a non-finite loss"):
        flag_nonfinite(losses, pool.ids, "error")  # the same NaN, unexplained, is an error


def test_ifd_needs_the_alpaca_template(tiny):
    _, tok = tiny
    pool = Pool([_row("a", "", "b")], [], {"template": "chat", "max_length": 64})
    with pytest.raises(ValueError, match=r"model.template=chat.*model.template=alpaca.*ifd_chat"):
        loss_inputs(pool, needed_losses([SCORERS["ifd"]]), tok)


def test_ifd_and_ifd_chat_scorers_on_known_losses():
    losses = {"ifd_cond": np.array([1.0, 2.0, 3.0, 1.5]),
              "ifd_alone": np.array([2.0, 2.0, 2.0, 3.0]),
              "init": np.array([2.0, 1.0, 4.0, 0.5]), "uncond": np.array([4.0, 1.0, 2.0, 0.25]),
              "ifd_fits": np.array([True, True, True, False])}
    n = np.array([1, 2, 3, 4])
    # IFD above 1 (row 2) and a row that fails the length checks (row 3) get no score.
    np.testing.assert_allclose(get_scorer("ifd").compute(losses, n, 0), [0.5, 1.0, np.nan, np.nan])
    np.testing.assert_allclose(get_scorer("ifd_chat").compute(losses, n, 0), [0.5, 1.0, 2.0, 2.0])
    assert SCORERS["ifd"].needs == ("ifd_cond", "ifd_alone")
    assert SCORERS["ifd_chat"].needs == ("init", "uncond")


def test_engine_matches_per_row_path_on_cherry_passes(tiny):
    """The batched engine on Cherry's inputs against the per-row forward Cherry itself runs."""
    model, tok = tiny
    rows = [*_alpaca(10), _row("word " * 80, "", "Short.", "long")]
    passes = cherry_passes(rows, tok, 96)
    assert any(f.truncated for f in passes.cond) and passes.cond[-1].n_response == 0
    for features in (passes.cond, passes.alone):
        fast = compute_response_losses(model, features, max_tokens_per_batch=300, pad_token_id=2)
        slow = _naive(model, features)
        assert np.isnan(fast[-1]) == np.isnan(slow[-1])
        np.testing.assert_allclose(fast[:-1], slow[:-1], rtol=RTOL)


def _finite(value: float | None) -> float:
    return math.nan if value is None else value


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [512, 96])
def test_ifd_matches_cherry_code_on_embedded_model(make_cfg, max_length):
    golden = GOLDEN["runs"][str(max_length)]
    summary = run(make_cfg("data=alpaca", "data.max_rows=48", f"data.max_length={max_length}",
                           "model.template=alpaca", "scorer=ifd", "stages=[score]",
                           "logger=none"))
    rows = [json.loads(x) for x in Path(summary["artifacts"]["scores"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == [g["id"] for g in golden["rows"]]
    cond = np.array([_finite(r["loss_ifd_cond"]) for r in rows])
    alone = np.array([_finite(r["loss_ifd_alone"]) for r in rows])
    want_cond = np.array([_finite(g["loss_cond"]) for g in golden["rows"]])
    want_alone = np.array([_finite(g["loss_alone"]) for g in golden["rows"]])
    np.testing.assert_allclose(cond, want_cond, rtol=RTOL)  # NaN where Cherry's is NaN
    np.testing.assert_allclose(alone, want_alone, rtol=RTOL)
    want_ifd = np.array([_finite(g["ifd"]) for g in golden["rows"]])
    np.testing.assert_allclose(cond / alone, want_ifd, rtol=RTOL)
    np.testing.assert_allclose(np.exp(alone), [_finite(g["ppl_alone"]) for g in golden["rows"]],
                               rtol=RTOL)
    # Scored exactly where data_by_IFD.py ranks a row (IFD <= 1, length checks passed) ...
    kept = [g["instruct_len"] < max_length and g["len_alone"] > 0 and g["len_cond"] > 0
            and g["instruct_len"] + g["len_alone"] <= max_length and g["ifd"] <= 1
            for g in golden["rows"]]
    assert [r["score"] is not None for r in rows] == kept
    assert not any(r.get("nonfinite") for r in rows)
    # ... and the top 8 are the 8 rows its --sample_number 8 selected.
    scores = np.array([_finite(r["score"]) for r in rows])
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:8]
    assert sorted(top.tolist()) == golden["selected_rows"]


def test_golden_file_covers_what_it_should():
    runs = GOLDEN["runs"]
    assert len(runs["512"]["rows"]) >= 32
    assert any(g["ifd"] is not None and g["ifd"] > 1 for g in runs["512"]["rows"])
    # The 96-token run exercises Cherry's length checks.
    assert any(g["instruct_len"] + g["len_alone"] > 96 for g in runs["96"]["rows"])

