"""JSON data files -> ``(line, row)`` pairs, streamed.

A JSON Lines file is read line by line and a JSON array element by element, so reading holds one
row (plus a chunk) whatever the file's size, and every row comes with the line where it starts,
for error messages that name it. Rows that cannot be read are yielded as :class:`InvalidJSON`
(the caller may skip them); a file that cannot be trusted as a whole raises :class:`DataError`.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
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
            head = handle.read(4)
        except OSError as err:
            raise DataError(f"{path}: cannot read data file ({err.strerror})") from err
        for bom, name in _WIDE_BOMS.items():
            if head.startswith(bom):
                raise DataError(f"{path}:1: the file is {name} encoded (byte-order mark "
                                f"{bom.hex(' ')}); re-save it as UTF-8")
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


def _parse_line(line_bytes: bytes) -> Any:
    """One JSON Lines row, or :class:`InvalidJSON` saying why it cannot be read."""
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
    return InvalidJSON(_TOO_DEEP) if _too_deep(row) else row


def _iter_json_lines(path: Path, handle: BinaryIO) -> Iterator[tuple[int, Any]]:
    first = True
    for number, line_bytes in enumerate(handle, start=1):  # binary lines end at b"\n" only
        if not line_bytes.strip():
            continue
        row = _parse_line(line_bytes)
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
        if _too_deep(row):
            row = InvalidJSON(_TOO_DEEP)
        yield buf.line_at(pos), row
        pos = end
    closed = buf.line_at(pos)
    rest = buf.skip(pos + 1, " \t\r\n")
    if rest < len(buf.text):
        raise DataError(f"{path}:{buf.line_at(rest)}: unexpected content after the JSON array "
                        f"that ends on line {closed}; a data file is one JSON array or JSON Lines "
                        "(one object per line), not both, and not several arrays")
