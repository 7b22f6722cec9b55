import json
from pathlib import Path

import pytest

from lobass.config import package_data
from lobass.data import DataError, example_id, read_examples


def test_shipped_alpaca_pool_reads_in_file_order_with_stable_ids():
    path = package_data("alpaca/alpaca_pool_1k.json")
    examples, stats = read_examples(path, "alpaca", max_rows=50)
    raw = json.loads(Path(path).read_text())[:50]
    assert stats.rows == 50 and len(examples) == 50
    for example, row in zip(examples, raw, strict=True):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        assert example.messages == ({"role": "user", "content": user},
                                    {"role": "assistant", "content": row["output"]})
        assert example.raw == row and example.source == "alpaca"
    again, _ = read_examples(path, "alpaca", max_rows=50, source="other")
    assert [e.id for e in again] == [e.id for e in examples]  # ids hash content, not source


def test_gsm8k_and_dolly_and_chat_readers(tmp_path):
    gsm, _ = read_examples(package_data("gsm8k/gsm8k_train_300.jsonl"), "gsm8k", max_rows=3)
    assert gsm[0].messages[1]["content"].rstrip().split("#### ")[-1].strip().lstrip("-").isdigit()
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Who?", "context": "Ctx", "response": "Me.",
                                 "category": "open_qa"}) + "\n")
    (row,), _ = read_examples(dolly, "dolly")
    assert row.messages[0]["content"] == "Who?\n\nCtx" and row.messages[1]["content"] == "Me."
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}) + "\n"
        + json.dumps({"instruction": "Add 2 and 2", "input": "", "output": "4"}) + "\n")
    rows, _ = read_examples(chat, "jsonl")
    assert [len(r.messages) for r in rows] == [3, 2]
    # The same content gives the same id whichever reader produced it.
    assert rows[1].id == example_id([{"role": "user", "content": "Add 2 and 2"},
                                     {"role": "assistant", "content": "4"}])


@pytest.mark.parametrize(("text", "line", "needle"), [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n', 2, "empty"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"\n', 2, "invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": 3, "output": "b"}\n', 3, "string"),
    ('{"instruction": "a", "output": "b"}\n{"prompt": "x", "output": "y"}\n', 2, "missing"),
])
def test_bad_row_names_file_and_line(tmp_path, text, line, needle):
    path = tmp_path / "pool.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_examples(path, "jsonl")
    assert f"{path}:{line}:" in str(err.value) and needle in str(err.value)
    rows, stats = read_examples(path, "jsonl", on_bad_row="skip")
    assert len(rows) == 1 and stats.skipped["bad_row"] == 1


def test_json_array_error_names_the_line_of_the_element(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(4)]
    rows[2]["output"] = "   "
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(rows, indent=1))
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == " {"]
    expected = starts[2]  # the line where element 2 begins
    with pytest.raises(DataError, match=rf"{path}:{expected}: field 'output' is empty"):
        read_examples(path, "alpaca")


def test_bom_crlf_duplicates_and_empty_file(tmp_path):
    path = tmp_path / "pool.jsonl"
    row = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path.write_bytes(b"\xef\xbb\xbf" + f"{row}\r\n{row}\r\n".encode())
    rows, stats = read_examples(path, "alpaca")
    assert len(rows) == 1 and stats.skipped["duplicate"] == 1
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_examples(empty, "alpaca")
    with pytest.raises(DataError, match="cannot read"):
        read_examples(tmp_path / "missing.json", "alpaca")
    with pytest.raises(DataError, match="choose one of"):
        read_examples(path, "parquet")
