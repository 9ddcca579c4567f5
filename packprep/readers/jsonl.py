"""JSON lines (.jsonl, .ndjson, and .json files that do not start with '['): newline-aligned byte ranges.

Planning reads the first ~64 KB (the union of the first 100 records' fields) and seeks once per chunk to the next
newline. A task reads its byte range and hands it to pyarrow's JSON reader in one block (~100-300 MB/s per core);
only a range that pyarrow rejects, or whose columns fail the checks, is parsed again line by line with `json.loads`
to find the bad lines (pyarrow fails a whole block on one bad line). Line numbers are counted only for a reject.
A compressed file is read as a stream (`readers.compressed`): a task reads its decompressed data in blocks of
STREAM_BLOCK bytes cut at line ends, one part each, so memory holds one block.
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Iterator

import pyarrow as pa
import pyarrow.json as pjson

from packprep.readers.base import (
    PEEK_BYTES,
    PEEK_LINES,
    Part,
    line_of,
    line_of_text,
    open_input,
    read_head,
    union_schema,
)
from packprep.records import RAW_PREFIX, BadRecord, RecordError, jtype

STREAM_BLOCK = 4 << 20  # decompressed bytes parsed at once from a compressed file


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    """The union schema of the first lines (None: blank lines only) and newline-aligned ranges of ~chunk_bytes."""
    schema = _peek(f, path)
    if schema is None or not f.seekable():  # a stream: its ranges are the compressed file's (inputs.plan_tasks)
        return schema, [(0, 0)] if schema is not None else []
    return schema, line_cuts(f, 0, f.size(), chunk_bytes, path)


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    if not f.seekable():
        yield from _read_stream(f, task)
        return
    f.seek(task.start)
    yield _part(f.read(task.stop - task.start), _Lines(b"", task.path, task.start))


def _part(buf: bytes, lines: _Lines) -> Part:
    lines.buf = buf
    try:
        table = _parse(buf)
    except pa.ArrowInvalid:  # pyarrow fails the whole chunk on one bad line
        return Part([json_line(raw) for _, raw in lines.lines], lines.locate)
    if not _one_per_line(table.num_rows, buf):  # pyarrow reads `{...}{...}` on one line as two records: line by
        # line, that line is a reject
        return Part([json_line(raw) for _, raw in lines.lines], lines.locate)
    return Part(table, lines.locate, fallback=lambda: [json_line(raw) for _, raw in lines.lines])


def _read_stream(f: pa.NativeFile, task) -> Iterator[Part]:
    """A compressed task's lines, block by block; line numbers (rejects only) count the lines before the task."""
    carry, lines_before = b"", _LinesBefore(task)
    while True:
        block = f.read(STREAM_BLOCK)
        buf = carry + block
        end = buf.rfind(b"\n") + 1 if block else len(buf)
        if end:
            yield _part(buf[:end], _Lines(b"", task.path, 0, first=lines_before.at(buf[:end])))
        carry = buf[end:]
        if not block:
            return


def _one_per_line(rows: int, buf: bytes) -> bool:
    """pyarrow read one record per non-blank line (a newline count first; lines split only when blank lines exist)."""
    if rows == buf.count(b"\n") + (not buf.endswith(b"\n")) and not _BLANK.search(buf):
        return True
    return rows == sum(1 for x in buf.split(b"\n") if x.strip())


_BLANK = re.compile(rb"(?:^|\n)[ \t\r]*\n|\n[ \t\r]+\Z")


def line_cuts(f: pa.NativeFile, start: int, stop: int, chunk_bytes: int, path=None) -> list[tuple[int, int]]:
    """Newline-aligned byte ranges of ~chunk_bytes covering [start, stop) (start is a line start). For a remote
    `path`, the bytes after every ~chunk_bytes are fetched first, all at once (the store's concurrent ranged reads),
    so finding the cuts costs one round trip instead of one per cut; the cuts are the same."""
    cuts = [start]
    blocks = _prefetch(path, start, stop, chunk_bytes) if path is not None else None
    while cuts[-1] + chunk_bytes < stop:
        cut = _line_end(f, cuts[-1] + chunk_bytes - 1, blocks)  # the line holding byte (cut - 1) ends this chunk
        if cut >= stop:
            break
        cuts.append(cut)
    return list(zip(cuts, cuts[1:] + [stop]))


PREFETCH = 1 << 16  # bytes fetched after each grid point of a remote file: a cut lands past its grid point by at most
# the line lengths met so far, so a miss (a long line) only falls back to reading through the file


def _prefetch(path, start: int, stop: int, chunk_bytes: int) -> tuple[list[int], list[bytes]] | None:
    """(sorted starts, blocks) of the bytes at start + k * chunk_bytes - 1 of a remote file, fetched concurrently."""
    from packprep import storage

    if not storage.is_remote(str(path)):
        return None
    starts = list(range(start + chunk_bytes - 1, stop, chunk_bytes))
    if len(starts) < 2:
        return None
    fs, p = storage.filesystem(str(path))
    blocks = fs.cat_ranges([p] * len(starts), starts, [min(s + PREFETCH, stop) for s in starts])
    return starts, [b if isinstance(b, bytes) else b"" for b in blocks]


def _line_end(f: pa.NativeFile, pos: int, blocks=None) -> int:
    """The position just after the first newline at or after pos (the end of the file if there is none)."""
    if blocks is not None and (i := bisect.bisect_right(blocks[0], pos) - 1) >= 0:
        at, block = blocks[0][i], blocks[1][i]
        k = block.find(b"\n", pos - at) if pos - at < len(block) else -1
        if k >= 0:
            return at + k + 1
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
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
    except json.JSONDecodeError as e:
        return BadRecord("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        return BadRecord("malformed_json", TOO_DEEP)
    return (lone_surrogate(rec) if SURROGATE_ESCAPE.search(raw) else None) or rec


TOO_DEEP = "JSON nested deeper than Python's parser takes (RecursionError); flatten or drop the record"
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # where the raw bytes have none, no check is needed


def lone_surrogate(rec) -> BadRecord | None:
    """A BadRecord when a string of `rec` holds a lone surrogate ("\\ud800" in the JSON): JSON lets it through, but
    it is not text (it has no UTF-8 form, and tokenizers refuse it)."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return BadRecord("invalid_utf8", f"a lone surrogate escape (\\u{ord(e.object[e.start]):04x}) in a string: not "
                                         "text; fix or drop the record")
    except RecursionError:
        return BadRecord("malformed_json", TOO_DEEP)
    return None


def _peek(f: pa.NativeFile, path) -> pa.Schema | None:
    if f.seekable():
        f.seek(0)
        first = f.read(PEEK_BYTES)
        if b"\n" not in first and re.search(rb"\}[ \t]*\r[ \t\r]*\{", first):  # records ended by CR alone
            raise RecordError(f"{path}: lines end in a lone CR (classic Mac line ends), which JSON lines does not "
                              f"take; convert them: tr '\\r' '\\n' < {path} > fixed.jsonl")
    head = read_head(f)
    if head.count(b"\n") <= 1 and f.seekable():  # one long first line (it may be a bad record): the next ones too
        head = read_head(f, len(head) + PEEK_BYTES)
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
        line = line_of_text(path, lines[0].rstrip(b"\r").decode("utf-8", "replace")) or 1
        raise RecordError(f"{path} line {line}: {first_bad.reason if first_bad else 'no JSON object'}")
    return union_schema(schemas) if schemas else None


def _parse(buf: bytes) -> pa.Table:
    """pyarrow's JSON reader over a whole chunk (block_size >= the chunk, so a record of any size fits)."""
    return pjson.read_json(pa.BufferReader(buf),
                           read_options=pjson.ReadOptions(use_threads=False, block_size=max(len(buf), 1 << 16)))


class _Lines:
    """The non-blank lines of a JSONL chunk with their 1-based line numbers (computed only when asked)."""

    def __init__(self, buf: bytes, path: str, start: int, first=None):
        self.buf, self.path, self.start, self.first, self._lines = buf, path, start, first, None

    @property
    def lines(self) -> list[tuple[int, bytes]]:
        if self._lines is None:
            first = self.first() if self.first else line_of(self.path, self.start)
            self._lines = [(first + k, x) for k, x in enumerate(self.buf.split(b"\n")) if x.strip()]
        return self._lines

    def locate(self, i: int) -> tuple[str, int, str]:
        line, raw = self.lines[i]
        return "line", line, raw.decode("utf-8", "replace")[:RAW_PREFIX]


class _LinesBefore:
    """The 1-based line number of each block's first line in a compressed task (counted only when a reject asks)."""

    def __init__(self, task):
        self.task, self.seen, self._before_task = task, 0, None

    def at(self, block: bytes):
        newlines_before_block, self.seen = self.seen, self.seen + block.count(b"\n")
        return lambda: self._task_start() + newlines_before_block + 1

    def _task_start(self) -> int:
        if self._before_task is None:  # the newlines in the members before this task
            self._before_task = 0
            if self.task.start:
                with open_input(self.task.path, 0, self.task.start) as f:
                    while block := f.read(1 << 22):
                        self._before_task += block.count(b"\n")
        return self._before_task
