"""JSON array files (`[{...}, {...}]`, .json starting with '['): cut into ranges of whole elements by a byte scan.

    array_start, end, cuts, commas = scan(f, path, chunk_bytes)

`[ {"a": "x,]"}, {"a": 2}, 3 ]` is read once, block by block (RSS: one 16 MB block), by `_kernels.json_array_cuts`
(~1 GB/s), which tracks strings (with escapes) and bracket depth; every top-level comma at least `chunk_bytes`
after the previous cut becomes a cut. The ranges (array_start + 1 .. cut0), (cut0 + 1 .. cut1), ...,
(cutN + 1 .. end) each hold whole elements separated by commas, so `json.loads("[" + range + "]")` parses one:
a task costs one `json.loads` of its range into Python objects (slower than pyarrow's JSONL path). The scan does
not validate JSON (a task's parse does, with the file's line and column); it only needs balanced brackets and
strings. A compressed file is one task, decompressed into memory.
"""

from __future__ import annotations

import functools
import json
from typing import Iterator

import numpy as np
import pyarrow as pa

from packprep._kernels import json_array_cuts
from packprep.readers.base import PEEK_LINES, Part, open_input, union_schema
from packprep.readers.jsonl import SURROGATE_ESCAPE, TOO_DEEP, lone_surrogate
from packprep.records import raw_json

BLOCK = 16 << 20
_PARSE_WHOLE_MAX = 256 << 20  # a file that is not one balanced array: parsed whole for the parser's error, up to this


def is_array(f: pa.NativeFile) -> bool:
    """A .json file holds either one array of records or JSON lines: the first non-space byte tells."""
    if f.seekable():
        f.seek(0)
    return f.read(4096).lstrip()[:1] == b"["


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    """The union schema of the first elements (parses only the first range) and ranges of ~chunk_bytes (one range
    for a compressed file: each task would decompress it whole)."""
    if not f.seekable():
        f, chunk_bytes = pa.BufferReader(f.read_buffer()), 1 << 62
    cut = ranges(f, path, chunk_bytes)
    records = [r for r in elements(f, path, *cut[0])[:PEEK_LINES] if isinstance(r, dict)]
    return union_schema([pa.Table.from_pylist([r]).schema for r in records]) if records else None, cut


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    if not f.seekable():  # compressed: decompressed into memory (the elements become Python objects anyway)
        f = pa.BufferReader(f.read_buffer())
    records = elements(f, task.path, task.start, task.stop)
    # the index of the range's first element: computed only if a reject needs it
    first = functools.cache(lambda: _scan_path(task.path, stop_at=task.start)[3])
    yield Part(records, lambda i: ("element", first() + i, raw_json(records[i])))


def elements(f: pa.NativeFile, path, start: int, stop: int, wrapped: bool = True) -> list:
    """The elements in bytes [start, stop) of a JSON array file (a range from plan), as Python values."""
    f.seek(start)
    raw = f.read(stop - start)
    try:
        text = raw.decode("utf-8")
        data = json.loads("[" + text + "]" if wrapped else text)
    except UnicodeDecodeError as e:
        line, col = _position(path, start + e.start, 0, 1)
        raise ValueError(f"{path}: invalid UTF-8 at line {line} column {col}") from None
    except json.JSONDecodeError as e:
        line, col = _position(path, start, e.lineno, e.colno - (wrapped and e.lineno == 1))  # the added '['
        raise ValueError(f"{path}: malformed JSON at line {line} column {col}: {e.msg}") from None
    except RecursionError:
        line, col = _position(path, start, 1, 1)
        raise ValueError(f"{path}: an element between line {line} column {col} and byte {stop:,} is {TOO_DEEP}") \
            from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects (or JSON lines)")
    if SURROGATE_ESCAPE.search(raw):  # a lone "\ud800" parses, but is not text: that element is a reject
        data = [lone_surrogate(x) or x for x in data]
    return data


def ranges(f: pa.NativeFile, path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of whole elements, ~chunk_bytes each; a file that is not one array raises ValueError."""
    try:
        array_start, end, cuts, _ = scan(f, path, chunk_bytes)
    except _NotAnArray as e:  # report the parser's precise error when the file is small enough to parse
        if f.size() <= _PARSE_WHOLE_MAX:
            elements(f, path, 0, f.size(), wrapped=False)
        raise ValueError(f"{e}; expected a JSON array of objects (or JSON lines)") from None
    ranges = list(zip([array_start + 1] + [c + 1 for c in cuts], cuts + [end]))
    if cuts:  # a trailing comma that fell on a cut leaves a blank last range: `[{...},\n]` is not JSON
        f.seek(ranges[-1][0])
        if not f.read(end - ranges[-1][0]).strip():
            line, col = _position(path, end, 1, 1)
            raise ValueError(f"{path}: malformed JSON at line {line} column {col}: Expecting value")
    return ranges


class _NotAnArray(ValueError):
    """The file is not one balanced JSON array (the caller reports the parser's precise error)."""


def scan(f: pa.NativeFile, path, chunk_bytes: int, stop_at: int = -1) -> tuple[int, int, list[int], int]:
    """(array_start, end, cuts, commas): the '[' position, the closing ']' position, the top-level commas that cut
    the array into ranges of >= chunk_bytes, and the number of top-level commas scanned. `stop_at` >= 0 ends the
    scan at that byte (end -1): the commas before a range start are the index of its first element."""
    f.seek(0)
    head = f.read(4096)
    stripped = head.lstrip()
    if stripped[:1] != b"[":
        raise _NotAnArray(f"{path}: not a JSON array")
    array_start = len(head) - len(stripped)
    f.seek(array_start)
    cuts: list[int] = []
    commas, base = 0, array_start
    state = np.array([0, 0, 0, array_start + chunk_bytes], np.int64)  # depth, in string, escaped, next cut
    room = np.empty(BLOCK // max(chunk_bytes, 1) + 2, np.int64)
    buf = bytearray(BLOCK)
    while True:
        n = f.readinto(buf)
        if not n:
            raise _NotAnArray(f"{path}: the JSON array is not closed")
        if 0 <= stop_at < base + n:
            n = max(stop_at - base, 0)
        num_cuts, seen, end = json_array_cuts(np.frombuffer(buf, np.uint8, n), base, state, max(chunk_bytes, 1),
                                              room)
        cuts += room[:num_cuts].tolist()
        commas += seen
        if stop_at >= 0 and base + n >= stop_at:
            return array_start, -1, cuts, commas
        if end >= 0:
            if state[0] < 0:
                raise _NotAnArray(f"{path}: unbalanced brackets in the JSON array")
            f.seek(end + 1)
            if f.read(4096).strip():
                raise _NotAnArray(f"{path}: data after the JSON array")
            return array_start, end, cuts, commas
        base += n


def _scan_path(path, stop_at: int) -> tuple[int, int, list[int], int]:
    with open_input(path, seekable=True) as f:
        return scan(f, path, 1 << 62, stop_at=stop_at)


def _position(path, start: int, lineno: int, colno: int) -> tuple[int, int]:
    """File line and column of (lineno, colno) counted from byte `start` (error path only: reads the prefix)."""
    with open_input(path, seekable=True) as f:
        prefix = f.read(start)
    line = prefix.count(b"\n") + 1
    col = start - (prefix.rfind(b"\n") + 1)  # 0-based column of `start` on its line
    if lineno <= 1:
        return line, col + max(colno, 1)
    return line + lineno - 1, colno
