"""export.jsonl is what was trained: one normalised row per selected example, no null cells."""

import json
from pathlib import Path

import datasets

from conftest import TINY
from lobass.pipeline import run


def test_export_is_the_trained_text_with_id_source_score_and_rank(make_cfg, tmp_path):
    summary = run(make_cfg(*TINY, "stages=[select]", "scorer=length", "selection.ratio=1.0"))
    export = Path(summary["artifacts"]["export"])
    selected = [json.loads(x) for x in Path(summary["artifacts"]["selected"]).read_text()
                .splitlines()]
    rows = [json.loads(x) for x in export.read_text().splitlines()]
    assert [(r["id"], r["source"], r["rank"], r["score"]) for r in rows] == \
        [(s["id"], s["source"], s["rank"], s["score"]) for s in selected]
    assert {r["source"] for r in rows} == {"alpaca", "gsm8k"}
    # the GSM8K answers as trained: calculator annotations stripped, like the training text
    gsm8k = [r for r in rows if r["source"] == "gsm8k"]
    assert gsm8k and not any("<<" in r["output"] for r in gsm8k)
    assert any("#### " in r["output"] for r in gsm8k)
    for row in rows:
        assert row["messages"][-1] == {"role": "assistant", "content": row["output"]}
        assert row["messages"][-2] == {"role": "user", "content": row["instruction"]}
        assert row["input"] == "" and row["history"] == [] and row["system"] == ""

    loaded = datasets.load_dataset("json", data_files=str(export), split="train",
                                   cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == len(rows) == 32
    assert {"id", "source", "score", "rank", "instruction", "input", "output"} <= \
        set(loaded.column_names)
    assert all(cell is not None for column in loaded.column_names for cell in loaded[column])
    # the pool's own format, metadata and all, stays beside it
    raw = export.with_name("export_pool_format.jsonl").read_text().splitlines()
    assert {"question", "answer"} <= set(json.loads(raw[-1])) or "instruction" in raw[-1]
