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


# ---------------------------------------------------------------------------------------------
# The bad-input matrix (issue 8): every reader x every fault, on real shipped rows. Each fault
# either raises DataError naming file and line (and the skip switch) or, with on_bad_row=skip,
# drops exactly that row and counts it.

def _alpaca_rows() -> list[dict]:
    return json.loads(Path(package_data("alpaca/alpaca_pool_1k.json")).read_text())[:3]


def _gsm8k_rows() -> list[dict]:
    lines = Path(package_data("gsm8k/gsm8k_train_300.jsonl")).read_text().splitlines()[:3]
    return [json.loads(x) for x in lines]


# reader -> (three real rows in its format, path to the instruction, path to the response)
READERS = {
    "alpaca": (_alpaca_rows, ("instruction",), ("output",)),
    "dolly": (lambda: [{"instruction": r["instruction"], "context": r["input"],
                        "response": r["output"], "category": "open_qa"} for r in _alpaca_rows()],
              ("instruction",), ("response",)),
    "gsm8k": (_gsm8k_rows, ("question",), ("answer",)),
    "jsonl": (lambda: [{"messages": [{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["output"]}]}
                       for r in _alpaca_rows()],
              ("messages", 0, "content"), ("messages", 1, "content")),
}


def _set(row: dict, path: tuple, value=None, *, delete: bool = False) -> dict:
    target = row
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return row


# fault -> (how line 2 of a 3-row JSON Lines file is spoiled, text the error must contain)
FAULTS = {
    "invalid_json": (lambda row, ins, res: json.dumps(row).encode()[:-1], "invalid JSON"),
    "missing_response": (lambda row, ins, res: json.dumps(_set(row, res, delete=True)).encode(),
                         "missing field"),
    "wrong_type": (lambda row, ins, res: json.dumps(_set(row, res, 3)).encode(),
                   "must be a string, got int"),
    "empty_instruction": (lambda row, ins, res: json.dumps(_set(row, ins, " \t")).encode(),
                          "is empty"),
    "empty_response": (lambda row, ins, res: json.dumps(_set(row, res, "")).encode(), "is empty"),
    "non_utf8": (lambda row, ins, res: json.dumps(_set(row, res, "caf@")).encode()
                 .replace(b"@", b"\xe9"), "not valid UTF-8"),  # Latin-1 'é'
    "lone_surrogate": (lambda row, ins, res: json.dumps(_set(row, res, "x\ud800y")).encode(),
                       "unpaired surrogate"),
    "not_an_object": (lambda row, ins, res: json.dumps([row]).encode(), "expected a JSON object"),
}


def _write_jsonl(path: Path, lines: list[bytes], newline: bytes = b"\n") -> Path:
    path.write_bytes(newline.join(lines) + newline)
    return path


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("reader", sorted(READERS))
def test_bad_row_matrix_errors_with_file_and_line_or_skips_and_counts(tmp_path, reader, fault):
    make, ins, res = READERS[reader]
    rows = make()
    spoil, needle = FAULTS[fault]
    lines = [json.dumps(rows[0]).encode(), spoil(rows[1], ins, res), json.dumps(rows[2]).encode()]
    path = _write_jsonl(tmp_path / "pool.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_examples(path, reader)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and needle in message, message
    assert "data.on_bad_row=skip" in message
    kept, stats = read_examples(path, reader, on_bad_row="skip")
    assert stats.rows == 2 and dict(stats.skipped) == {"bad_row": 1}
    clean, _ = read_examples(_write_jsonl(tmp_path / "clean.jsonl", [lines[0], lines[2]]), reader)
    assert [e.id for e in kept] == [e.id for e in clean]
    assert stats.as_metrics("data/x") == {"data/x/rows": 2.0, "data/x/skipped_bad_row": 1.0}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_bom_crlf_and_unicode_separators_read_like_a_clean_file(tmp_path, reader):
    make, _, res = READERS[reader]
    rows = make()
    # U+2028 is legal unescaped inside a JSON string; it must not split the row in two.
    _set(rows[1], res, "first part\u2028second part\u0085third")
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    clean, _ = read_examples(_write_jsonl(tmp_path / "clean.jsonl", lines), reader)
    assert len(clean) == 3
    assert clean[1].messages[-1]["content"] == "first part\u2028second part\u0085third"
    variants = {
        "bom": b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n",
        "crlf": b"\r\n".join(lines) + b"\r\n",
        "bom_crlf_blank_lines": b"\xef\xbb\xbf\r\n" + b"\r\n\r\n".join(lines),
    }
    for name, blob in variants.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(blob)
        got, stats = read_examples(path, reader)
        assert [e.id for e in got] == [e.id for e in clean], name
        assert [e.messages for e in got] == [e.messages for e in clean], name
        assert not stats.skipped, name
    # Line numbers still count every physical line (the blank ones too) after a BOM and CRLF.
    spoiled = b"\xef\xbb\xbf\r\n" + b"\r\n\r\n".join([lines[0], lines[1][:-1], lines[2]])
    (tmp_path / "bad.jsonl").write_bytes(spoiled)
    with pytest.raises(DataError, match=r"bad\.jsonl:4: invalid JSON"):
        read_examples(tmp_path / "bad.jsonl", reader)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_duplicate_rows_are_dropped_and_counted(tmp_path, reader, caplog):
    make, _, _ = READERS[reader]
    rows = make()
    lines = [json.dumps(r).encode() for r in [*rows, rows[0], rows[0]]]
    got, stats = read_examples(_write_jsonl(tmp_path / "pool.jsonl", lines), reader)
    assert len(got) == 3 and stats.rows == 3 and dict(stats.skipped) == {"duplicate": 2}
    assert "pool.jsonl:4, a duplicate of line 1" in caplog.text
    # The same rows as a JSON array: duplicates counted the same way.
    (tmp_path / "pool.json").write_text(json.dumps([*rows, rows[0]], indent=2))
    got, stats = read_examples(tmp_path / "pool.json", reader)
    assert len(got) == 3 and dict(stats.skipped) == {"duplicate": 1}


@pytest.mark.parametrize("fault", ["missing_response", "wrong_type", "empty_response",
                                   "lone_surrogate", "not_an_object"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_bad_element_in_a_json_array_names_its_line(tmp_path, reader, fault):
    make, ins, res = READERS[reader]
    rows = make()
    spoil, needle = FAULTS[fault]
    elements = [rows[0], json.loads(spoil(rows[1], ins, res)), rows[2]]
    path = tmp_path / "pool.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in elements) + "\n]\n")
    with pytest.raises(DataError, match=rf"pool\.json:3: .*{needle}"):
        read_examples(path, reader)
    got, stats = read_examples(path, reader, on_bad_row="skip")
    assert len(got) == 2 and dict(stats.skipped) == {"bad_row": 1}


@pytest.mark.parametrize(("blob", "needle"), [
    (b'[\n{"instruction": "a", "output": "b"},\n{"instruction": \n', "pool.json:3: invalid"),
    (b'[\n{"instruction": "a", "output": "b"},\n', "pool.json:3: invalid JSON (unterminated"),
    (b'[\n{"instruction": "a", "output": "b\xff"}]\n', "pool.json:2: not valid UTF-8"),
    (b"[]", "pool.json: no usable rows (skipped: none)"),
    (b"", "pool.json: the file is empty"),
    (b" \r\n\n\t\n", "pool.json: the file is empty"),
    (b"\xef\xbb\xbf", "pool.json: the file is empty"),
    ("[{\"instruction\": \"a\", \"output\": \"b\"}]".encode("utf-16"), "pool.json:1: the file is "
     "UTF-16/32-LE encoded (byte-order mark ff fe); re-save it as UTF-8"),
    (b'{\n  "instruction": "a",\n  "output": "b"\n}\n', "pool.json:1: the file is one JSON"),
])
def test_unusable_files_raise_even_when_skipping(tmp_path, blob, needle):
    # A syntax error inside a JSON array leaves nothing after it trustworthy, and an empty or
    # wrongly encoded file has no row to skip: these raise whatever data.on_bad_row says.
    path = tmp_path / "pool.json"
    path.write_bytes(blob)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as err:
            read_examples(path, "alpaca", on_bad_row=mode)
        assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_file_directory_and_all_rows_bad(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read data file \(No such file"):
        read_examples(tmp_path / "missing.jsonl", "alpaca")
    with pytest.raises(DataError, match=r"cannot read data file \(Is a directory\)"):
        read_examples(tmp_path, "alpaca")
    path = _write_jsonl(tmp_path / "bad.jsonl", [b'{"instruction": "a"}', b"not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable rows \(skipped: 2 bad_row\)"):
        read_examples(path, "alpaca", on_bad_row="skip")
    with pytest.raises(DataError, match="data.on_bad_row must be 'error' or 'skip'"):
        read_examples(path, "alpaca", on_bad_row="ignore")


# ---------------------------------------------------------------------------------------------
# Issue 15: nothing after a complete JSON array is dropped silently, and a row nested too deeply
# for Python's JSON parser is a bad row like any other (file, line, skippable).

def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(start, n)]


@pytest.mark.parametrize(("name", "blob", "line"), [
    # two arrays, one after the other (line 5 is where the second one starts)
    ("two_arrays", json.dumps(_rows(3), indent=None).replace("}, ", "},\n") + "\n\n"
     + json.dumps(_rows(6, 3)) + "\n", 5),
    # an array, then JSON Lines
    ("array_then_jsonl", json.dumps(_rows(2)) + "\n"
     + "\n".join(json.dumps(r) for r in _rows(5, 2)) + "\n", 2),
    # JSON Lines whose lines are arrays
    ("jsonl_of_arrays", "\n".join(json.dumps(_rows(i + 2, i)) for i in range(0, 6, 2)) + "\n", 2),
    # stray text after the closing bracket, on the same line
    ("trailing_text", json.dumps(_rows(2)) + " ]\n", 1),
])
def test_content_after_a_json_array_is_an_error_naming_its_line(tmp_path, name, blob, line):
    path = tmp_path / "pool.json"
    path.write_text(blob)
    for mode in ("error", "skip"):  # not a bad row: the file's structure is wrong
        with pytest.raises(DataError) as err:
            read_examples(path, "alpaca", on_bad_row=mode)
        assert str(err.value).startswith(f"{path}:{line}: unexpected content after the JSON "
                                         "array"), str(err.value)
    # whitespace (and a final newline) after the array is fine
    path.write_text(json.dumps(_rows(3)) + "\n \n\t\n")
    rows, _ = read_examples(path, "alpaca")
    assert len(rows) == 3


def _deep(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [1_500, 101])
@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_deeply_nested_field_is_a_bad_row_with_file_and_line(tmp_path, suffix, depth):
    rows = _rows(3)
    text = json.dumps(rows[1])[:-1] + ', "meta": ' + "[" * depth + '"x"' + "]" * depth + "}"
    lines = [json.dumps(rows[0]), text, json.dumps(rows[2])]
    path = tmp_path / f"pool.{suffix}"
    path.write_text("\n".join(lines) + "\n" if suffix == "jsonl"
                    else "[\n" + ",\n".join(lines) + "\n]\n")
    line = 2 if suffix == "jsonl" else 3
    with pytest.raises(DataError) as err:
        read_examples(path, "alpaca")
    assert str(err.value).startswith(f"{path}:{line}: nested more than 100 levels deep"), \
        str(err.value)
    got, stats = read_examples(path, "alpaca", on_bad_row="skip")
    assert [e.raw for e in got] == [rows[0], rows[2]] and dict(stats.skipped) == {"bad_row": 1}
    # 100 levels is allowed, and the row is kept whole (its raw row is exported as it was)
    path.write_text(json.dumps({**rows[1], "meta": _deep(99)}) + "\n")
    (row,), _ = read_examples(path, "alpaca")
    assert row.raw["meta"] == _deep(99)


# --------------------------------------------------------------------------------------------
# GSM8K calculator annotations (data.gsm8k.keep_calculator)

# The first shipped GSM8K training row's answer, annotations removed by hand.
CARL_STRIPPED = (
    "The number of words that Carl can type per hour is 50 * 60 = 3000 words.\n"
    "The number of words that Carl can type in 4 hours is 3000 * 4 = 12000 words.\n"
    "The number of words that Carl can type in 7 days is 12000 * 7 = 84000 words.\n"
    "#### 84000"
)


def test_gsm8k_calculator_annotations_are_stripped_unless_kept():
    path = package_data("gsm8k/gsm8k_train_300.jsonl")
    raw = json.loads(Path(path).read_text().splitlines()[0])
    assert "= <<50*60=3000>>3000 words" in raw["answer"]  # the shipped file keeps them
    (stripped,), _ = read_examples(path, "gsm8k", max_rows=1)
    assert stripped.messages[1]["content"] == CARL_STRIPPED
    assert stripped.messages[0]["content"] == raw["question"] and stripped.raw == raw
    (kept,), _ = read_examples(path, "gsm8k", max_rows=1, options={"keep_calculator": True})
    assert kept.messages[1]["content"] == raw["answer"]
    assert kept.id != stripped.id  # ids hash the content the model sees
    rows, _ = read_examples(path, "gsm8k")
    assert len(rows) == 300 and not any("<<" in r.messages[1]["content"] for r in rows)


@pytest.mark.parametrize("keep", [False, True])
def test_data_gsm8k_option_reaches_the_mixed_gsm8k_source(make_cfg, keep):
    from lobass.pool import read_pool

    cfg = make_cfg("data.max_rows=4", "data.mix.gsm8k.max_rows=5",
                   f"data.gsm8k.keep_calculator={str(keep).lower()}")
    examples, _ = read_pool(cfg.data)
    gsm = [e for e in examples if e.source == "gsm8k"]
    assert len(gsm) == 5 and sum(e.source == "alpaca" for e in examples) == 4
    assert all(("<<" in e.messages[1]["content"]) is keep for e in gsm)
    assert (gsm[0].messages[1]["content"] == CARL_STRIPPED) is not keep
