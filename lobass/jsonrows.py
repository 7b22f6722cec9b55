"""JSON data files -> ``(line, row)`` pairs, streamed; and the one JSON Lines writer and reader.

A JSON Lines file is read line by line and a JSON array element by element, so reading holds one
row (plus a chunk) whatever the file's size, and every row comes with the line where it starts,
for error messages that name it. Rows that cannot be read are yielded as :class:`InvalidJSON`
(the caller may skip them); a file that cannot be trusted as a whole raises :class:`DataError`.

Every JSON Lines file lobass writes (generations, judge verdicts, scores, losses, selections) is
written with :func:`jsonl_line` / :func:`jsonl_text` and read back with :func:`iter_jsonl` /
:func:`read_jsonl`, which split on line feeds only: non-ASCII text is written as it is, and
U+2028/U+2029 (which ``str.splitlines`` takes for line ends) may sit raw inside a string.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


class DataError(ValueError):
    """A row or file that cannot be turned into an example; the message names file and line."""


class InvalidJSON(str):
    """Stands in for a JSON Lines row that cannot be read (its text says why: JSON, UTF-8)."""


# UTF-16/32 files open with these marks; decoding them as UTF-8 would fail on the first byte with
# an unhelpful message. (UTF-32-LE starts with the UTF-16-LE mark, so one check covers both.)
_WIDE_BOMS = {codecs.BOM_UTF16_LE: "UTF-16/32-LE", codecs.BOM_UTF16_BE: "UTF-16-BE",
              codecs.BOM_UTF32_BE: "UTF-32-BE"}


# Compressed files, by their magic bytes: read as text they give "not valid UTF-8" at byte 2.
_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"BZh": ("bzip2", "bunzip2"),
               b"\xfd7zXZ\x00": ("xz", "unxz"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd"),
               b"PK\x03\x04": ("zip", "unzip")}


def _check_encoding(path: Path, head: bytes) -> None:
    """Refuse a UTF-16/32 or compressed file with a message that says how to fix it.

    Raises:
        DataError: a wide byte-order mark, compression magic bytes, or NUL bytes at the start
            (UTF-16/32 without a byte-order mark: UTF-8 JSON never holds a raw NUL).

    """
    for bom, name in _WIDE_BOMS.items():
        if head.startswith(bom):
            raise DataError(f"{path}:1: the file is {name} encoded (byte-order mark "
                            f"{bom.hex(' ')}); re-save it as UTF-8")
    for magic, (name, tool) in _COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(f"{path}: the file is {name}-compressed; decompress it first "
                            f"(e.g. `{tool} {path}`) and point lobass at the result")
    if b"\x00" in head:
        raise DataError(f"{path}:1: the file holds NUL bytes at its start: it looks UTF-16 or "
                        "UTF-32 encoded without a byte-order mark; re-save it as UTF-8")


# Bytes read at a time. A JSON Lines file is read line by line and a JSON array element by
# element, so reading holds one row (plus this much) whatever the file's size.
_CHUNK = 1 << 20
# Rows nested deeper than this are bad rows. Python's JSON parser gives up near 1,000 levels with
# a RecursionError that names no file; real SFT rows nest 3 or 4 levels.
MAX_DEPTH = 100
_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
_BLANK = b" \t\r\n\x0b\x0c"  # what bytes.strip() removes: such lines count but hold no row
# A pretty-printed single object is read whole only to say so; above this it is "invalid JSON".
_SINGLE_OBJECT_LIMIT = 64 << 20


def iter_json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, row)`` from a JSON array file or a JSON Lines file, streaming.

    A UTF-8 byte-order mark is ignored and CRLF line ends are accepted. JSON Lines are split on
    line feeds only (not ``str.splitlines``, which also splits inside strings at U+2028 and other
    Unicode separators that JSON allows unescaped), and each line is decoded on its own, so a
    line that is not UTF-8 or not JSON, or a row nested more than ``MAX_DEPTH`` levels deep, is
    yielded as :class:`InvalidJSON` and the caller may skip it. In a JSON array nothing after a
    syntax error can be trusted, so that raises, and so does anything but whitespace after the
    array's closing bracket (a second array, JSON Lines after it), which would otherwise be lost.

    Raises:
        DataError: unreadable, empty or UTF-16 file; invalid UTF-8 or JSON in an array; content
            after an array; a single pretty-printed JSON object. The message names the file and,
            where known, the line.

    """
    try:
        handle = open(path, "rb")  # noqa: SIM115  (closed below; the generator may stop early)
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror})") from err
    with handle:
        try:
            head = handle.read(64)
        except OSError as err:
            raise DataError(f"{path}: cannot read data file ({err.strerror})") from err
        _check_encoding(path, head)
        start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
        handle.seek(start)
        first = _first_content_byte(handle)
        if first is None:
            raise DataError(f"{path}: the file is empty")
        handle.seek(start)
        if first == b"[":
            yield from _iter_json_array(path, handle)
        else:
            yield from _iter_json_lines(path, handle)


def _first_content_byte(handle: BinaryIO) -> bytes | None:
    """The first byte that is not blank, or ``None`` for a blank file."""
    while chunk := handle.read(_CHUNK):
        content = chunk.lstrip(_BLANK)
        if content:
            return content[:1]
    return None


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests containers more than ``MAX_DEPTH`` levels (iteratively)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


# Characters no text field should hold: C0 controls but tab, line feed and carriage return, DEL,
# and lone surrogates (JSON may escape one, "\\ud800"; it cannot be encoded as UTF-8, so it kills
# whatever writes or tokenises the row later, far from its file and line).
_BAD_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _bad_text(row: Any) -> str | None:
    """Why a row's text is unusable, or ``None``.

    Every key and string is checked, read by lobass or not (an unread field is still written
    back by the export), iteratively: rows up to ``MAX_DEPTH`` levels are allowed here.
    """
    stack: list[tuple[Any, str]] = [(row, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                if (found := _BAD_CHAR.search(key)) is not None:
                    return _describe(found, f"the key {name!r}")
                stack.append((item, name))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str) and (found := _BAD_CHAR.search(value)) is not None:
            return _describe(found, f"field {where!r}" if where else "the row")
    return None


def _describe(found: re.Match[str], where: str) -> str:
    char = found.group()
    kind = "an unpaired surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return (f"{where} holds {kind} U+{ord(char):04X} at character {found.start()}; "
            "remove it from the file")


def _checked(row: Any) -> Any:
    """The row, or :class:`InvalidJSON` when it nests too deep or holds unusable characters."""
    if isinstance(row, InvalidJSON):
        return row
    if _too_deep(row):
        return InvalidJSON(_TOO_DEEP)
    problem = _bad_text(row)
    return InvalidJSON(problem) if problem else row


def _parse_line(line_bytes: bytes) -> Any:
    """One JSON Lines row, or :class:`InvalidJSON` saying why it cannot be parsed."""
    try:
        row_text = line_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        return InvalidJSON(f"not valid UTF-8 ({err.reason}, byte "
                           f"{line_bytes[err.start]:#04x} at column {err.start + 1})")
    try:
        row = json.loads(row_text)
    except json.JSONDecodeError as err:
        return InvalidJSON(f"invalid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return InvalidJSON(_TOO_DEEP)
    return row


def _iter_json_lines(path: Path, handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    first = True
    for number, line_bytes in enumerate(handle, start=1):  # binary lines end at b"\n" only
        if not line_bytes.strip():
            continue
        row = _checked(_parse_line(line_bytes))
        if first and isinstance(row, InvalidJSON) and row.startswith("invalid JSON") \
                and line_bytes.lstrip().startswith(b"{"):
            _reject_single_object(path, handle)
        first = False
        del line_bytes  # a long row is not held twice while the caller works on it
        yield number, row


def _reject_single_object(path: Path, handle: BinaryIO) -> None:
    """Raise a clear error for a pretty-printed JSON object (neither JSON Lines nor an array)."""
    if path.stat().st_size > _SINGLE_OBJECT_LIMIT:
        return
    position = handle.tell()
    handle.seek(0)
    raw_bytes = handle.read().removeprefix(codecs.BOM_UTF8)
    handle.seek(position)
    try:
        whole = json.loads(raw_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return  # not a single object either: report the first line as invalid JSON
    if isinstance(whole, dict):
        raise DataError(f"{path}:1: the file is one JSON object spread over lines; a data file "
                        "is JSON Lines (one object per line) or a JSON array of objects")


# One JSON string (possibly cut at the end of the buffer) or one bracket: enough to find where a
# value ends without parsing it, for an element too deep for the recursive parser.
_SCAN = re.compile(r'"(?:[^"\\]+|\\.)*"?|[\[\]{}]')


def _value_end(text: str, pos: int) -> int | None:
    """Where the container starting at ``text[pos]`` ends, or ``None`` if it does not end there."""
    depth = 0
    for match in _SCAN.finditer(text, pos):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


class _TextBuffer:
    """Decoded text of a binary file read in chunks, with line numbers for any offset in it."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle = path, handle
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.eof = False
        self.line = 1  # the line number at text[self.counted]
        self.counted = 0
        self.column = 0  # the column of text[0] (0-based): text is cut where an element starts
        self.lines_read = 0  # line feeds decoded so far (to place an undecodable byte)

    def line_at(self, offset: int) -> int:
        """Line number of ``text[offset]`` (offsets only move forward)."""
        self.line += self.text.count("\n", self.counted, offset)
        self.counted = offset
        return self.line

    def more(self, keep_from: int) -> bool:
        """Drop ``text[:keep_from]`` and read more; False at the end of the file.

        Reads at least as much as is kept, so a long element is parsed O(log n) times, not O(n).
        """
        if self.eof:
            return False
        self.line_at(keep_from)
        chunk = self.handle.read(max(_CHUNK, len(self.text) - keep_from))
        self.eof = not chunk
        try:
            new = self.utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError as err:
            line = self.lines_read + err.object[: err.start].count(b"\n") + 1
            raise DataError(f"{self.path}:{line}: not valid UTF-8 ({err.reason}, byte "
                            f"{err.object[err.start]:#04x})") from err
        self.lines_read += new.count("\n")
        newline = self.text.rfind("\n", 0, keep_from)
        self.column = keep_from - newline - 1 if newline >= 0 else self.column + keep_from
        self.text = self.text[keep_from:] + new
        self.counted = 0
        return True

    def skip(self, pos: int, chars: str) -> int:
        """The first offset from ``pos`` not in ``chars``, reading on as needed.

        Reading may move the text, so callers use the offset returned (``len(text)`` at the end).
        """
        while True:
            while pos < len(self.text) and self.text[pos] in chars:
                pos += 1
            if pos < len(self.text) or not self.more(pos):
                return pos
            pos = 0


def _iter_json_array(path: Path, handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    buf = _TextBuffer(path, handle)
    pos = buf.skip(0, " \t\r\n") + 1  # past the opening bracket
    while True:
        pos = buf.skip(pos, " \t\r\n,")
        if pos >= len(buf.text):
            raise DataError(f"{path}:{buf.line_at(pos)}: invalid JSON (unterminated array)")
        if buf.text[pos] == "]":
            break
        try:
            row, end = decoder.raw_decode(buf.text, pos)
        except json.JSONDecodeError as err:
            # The element may just continue past what was read so far: the parser stopped at
            # the end of the text, or in a string that runs to it.
            cut = err.pos >= len(buf.text) - 8 or err.msg.startswith("Unterminated string")
            if cut and buf.more(pos):
                pos = 0
                continue
            # Name the line where the broken element starts (the row to fix) and where the
            # parser gave up, which can be far below it (an unclosed string, a missing brace).
            line = buf.line_at(pos)
            first_line = line - buf.text.count("\n", 0, pos)  # the line of text[0]
            column = err.colno + (buf.column if err.lineno == 1 else 0)
            raise DataError(f"{path}:{line}: invalid JSON ({err.msg} at line "
                            f"{first_line + err.lineno - 1} column {column})") from err
        except RecursionError:
            end_or_none = _value_end(buf.text, pos)
            if end_or_none is None:
                if buf.more(pos):
                    pos = 0
                    continue
                raise DataError(f"{path}:{buf.line_at(pos)}: invalid JSON (unterminated "
                                "element)") from None
            row, end = InvalidJSON(_TOO_DEEP), end_or_none
        if end == len(buf.text) and buf.more(pos):  # a number may continue in the next chunk
            pos = 0
            continue
        yield buf.line_at(pos), _checked(row)
        pos = end
    closed = buf.line_at(pos)
    rest = buf.skip(pos + 1, " \t\r\n")
    if rest < len(buf.text):
        raise DataError(f"{path}:{buf.line_at(rest)}: unexpected content after the JSON array "
                        f"that ends on line {closed}; a data file is one JSON array or JSON Lines "
                        "(one object per line), not both, and not several arrays")


# ---------------------------------------------------------------------------------------------
# The JSON Lines files lobass writes and reads back.


def jsonl_line(row: Any) -> str:
    """One JSON Lines row, ended by a line feed; non-ASCII text kept as it is.

    JSON escapes every control character inside a string, so the row's only line feed is its
    end; U+2028/U+2029 stay raw, which is why the readers here split on line feeds only.
    """
    return json.dumps(row, ensure_ascii=False) + "\n"


def jsonl_text(rows: Iterable[Any]) -> str:
    """The JSON Lines text of ``rows`` (for ``atomic_write_text``)."""
    return "".join(map(jsonl_line, rows))


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line_number, row)`` of a JSON Lines file; an unreadable line is an :class:`InvalidJSON`.

    Lines are split on line feeds only; blank lines hold no row. An empty file yields nothing.
    """
    with open(path, "rb") as handle:
        for number, line_bytes in enumerate(handle, start=1):  # binary lines end at b"\n" only
            if line_bytes.strip():
                yield number, _parse_line(line_bytes)


def read_jsonl(path: Path) -> list[Any]:
    """Every row of a JSON Lines file lobass wrote.

    Raises:
        DataError: a line that is not valid UTF-8 JSON, naming the file and line.

    """
    rows = []
    for number, row in iter_jsonl(path):
        if isinstance(row, InvalidJSON):
            raise DataError(f"{path}:{number}: {row}")
        rows.append(row)
    return rows
