"""JSON lines (.jsonl, .ndjson, and .json files that do not start with '['): newline-aligned byte ranges.

Planning reads the first ~64 KB (the union of the first 100 records' fields) and seeks once per chunk to the next
newline. A task reads its byte range and hands it to pyarrow's JSON reader in one block (~100-300 MB/s per core);
only a range that pyarrow rejects, or whose columns fail the checks, is parsed again line by line with `json.loads`
to find the bad lines (pyarrow fails a whole block on one bad line). Line numbers are counted only for a reject.
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.json as pjson

from packprep.readers.base import PEEK_BYTES, PEEK_LINES, Part, line_of, line_of_text, union_schema
from packprep.records import RAW_PREFIX, BadRecord, RecordError, jtype


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    """The union schema of the first lines (None: blank lines only) and newline-aligned ranges of ~chunk_bytes."""
    schema = _peek(f, path)
    return schema, (line_cuts(f, 0, f.size(), chunk_bytes) if schema is not None else [])


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    f.seek(task.start)
    buf = f.read(task.stop - task.start)
    lines = _Lines(buf, task.path, task.start)
    try:
        table = _parse(buf)
    except pa.ArrowInvalid:  # pyarrow fails the whole chunk on one bad line
        yield Part([json_line(raw) for _, raw in lines.lines], lines.locate)
        return
    yield Part(table, lines.locate, fallback=lambda: [json_line(raw) for _, raw in lines.lines])


def line_cuts(f: pa.NativeFile, start: int, stop: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Newline-aligned byte ranges of ~chunk_bytes covering [start, stop) (start is a line start)."""
    cuts = [start]
    while cuts[-1] + chunk_bytes < stop:
        cut = _line_end(f, cuts[-1] + chunk_bytes - 1)  # the line holding byte (cut - 1) ends this chunk
        if cut >= stop:
            break
        cuts.append(cut)
    return list(zip(cuts, cuts[1:] + [stop]))


def _line_end(f: pa.NativeFile, pos: int) -> int:
    """The position just after the first newline at or after pos (the end of the file if there is none)."""
    f.seek(pos)
    while True:
        block = f.read(1 << 16)
        k = block.find(b"\n")
        if k >= 0:
            return pos + k + 1
        if not block:
            return pos
        pos += len(block)


def json_line(raw: bytes):
    """One JSONL line -> a Python record, or a BadRecord saying why it is not one."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
    except json.JSONDecodeError as e:
        return BadRecord("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})")


def _peek(f: pa.NativeFile, path) -> pa.Schema | None:
    f.seek(0)
    head = f.read(PEEK_BYTES)
    end = _line_end(f, len(head))  # whole lines only (the first may be tens of MB)
    f.seek(len(head))
    head += f.read(end - len(head))
    lines = [x for x in head.split(b"\n") if x.strip()][:PEEK_LINES]
    schemas, first_bad = [], None
    for raw in lines:
        rec = json_line(raw)
        if isinstance(rec, dict):
            try:
                schemas.append(_parse(raw).schema)
            except pa.ArrowInvalid:  # valid JSON that pyarrow does not take (the read reports it)
                continue
        elif first_bad is None:
            first_bad = rec if isinstance(rec, BadRecord) else BadRecord("wrong_type",
                                                                         f"expected an object, got {jtype(rec)}")
    if lines and not schemas:  # no record to tell the format from: the first line's problem
        line = line_of_text(path, lines[0].rstrip(b"\r").decode("utf-8", "replace"))
        raise RecordError(f"{path} line {line}: {first_bad.reason if first_bad else 'no JSON object'}")
    return union_schema(schemas) if schemas else None


def _parse(buf: bytes) -> pa.Table:
    """pyarrow's JSON reader over a whole chunk (block_size >= the chunk, so a record of any size fits)."""
    return pjson.read_json(pa.BufferReader(buf),
                           read_options=pjson.ReadOptions(use_threads=False, block_size=max(len(buf), 1 << 16)))


class _Lines:
    """The non-blank lines of a JSONL chunk with their 1-based line numbers (computed only when asked)."""

    def __init__(self, buf: bytes, path: str, start: int):
        self.buf, self.path, self.start, self._lines = buf, path, start, None

    @property
    def lines(self) -> list[tuple[int, bytes]]:
        if self._lines is None:
            first = line_of(self.path, self.start)
            self._lines = [(first + k, x) for k, x in enumerate(self.buf.split(b"\n")) if x.strip()]
        return self._lines

    def locate(self, i: int) -> tuple[str, int, str]:
        line, raw = self.lines[i]
        return "line", line, raw.decode("utf-8", "replace")[:RAW_PREFIX]
