"""What every reader shares: the opener, the `Part` a reader yields, and the error-path helpers.

A reader (one module per file format, listed in `packprep.readers.READERS`) is two functions over an opened input:

    schema, ranges = plan(f, path, chunk_bytes)   # the first records' schema (None: no records) and the file's
                                                  # task ranges: [(start, stop), ...] in the reader's own unit
    for part in read(f, task): ...                # Part(records, locate, fallback) for task.start..task.stop

`f` comes from `open_input(path)`, the one place a path becomes bytes: a seekable pyarrow NativeFile (a local file,
read by copying into memory, never memory-mapped: a file truncated under a reader gives short reads, caught as a
changed input, never a SIGBUS; `pa.PythonFile` around an fsspec file for a URL, read ahead in blocks), or for a
compressed file an unseekable stream of the decompressed bytes (`readers.compressed`), which a reader plans as one
whole-stream range. A compressed JSON lines file made of independent members (zstd frames, bgzip blocks) is cut
between them: its task's range is then a compressed byte range, and `open_task` opens just those members. Error-path
helpers take the path and open their own handle, so they never move a reader's position.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from packprep import storage
from packprep.readers import compressed

PEEK_BYTES, PEEK_LINES = 1 << 16, 100  # format detection reads the union of the first records' fields


def open_input(path, start: int = 0, stop: int | None = None, *, seekable: bool = False) -> pa.NativeFile:
    """A readable byte stream over one input file: seekable, unless the file is compressed (then the decompressed
    bytes of its members in compressed bytes [start, stop), or of all of it). seekable=True decompresses a
    compressed file into memory (JSON arrays and the error path, which must seek)."""
    path = str(path)
    name = compressed.codec(path)
    raw = _open_raw(path, 8 << 20 if name else 256 << 10)
    if name is None:
        return raw
    if start or stop is not None:
        raw.seek(start)
        raw = pa.BufferReader(raw.read_buffer((stop if stop is not None else raw.size()) - start))
    f = compressed.stream(raw, name)
    if seekable:
        with f:
            return pa.BufferReader(f.read_buffer())
    return f


def _open_raw(path: str, read_ahead: int) -> pa.NativeFile:
    """A local file (copying reads), or a remote file read ahead by `read_ahead` bytes past each request (a task's
    range is one request; a decompressing stream's many small reads need a large read-ahead)."""
    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        return pa.PythonFile(fs.open(p, "rb", block_size=read_ahead, cache_type="readahead"), mode="r")
    return pa.OSFile(path, "r")


def open_task(task) -> pa.NativeFile:
    """The file of a read task; for a cut compressed JSON lines file, only the task's members."""
    if task.kind == "jsonl" and compressed.codec(task.path) is not None:
        return open_input(task.path, task.start, task.stop)
    return open_input(task.path)


def read_head(f: pa.NativeFile, size: int = PEEK_BYTES) -> bytes:
    """The first `size` bytes and the rest of the line they end in (whole lines; the first may be tens of MB)."""
    if f.seekable():
        f.seek(0)
    head = f.read(size)
    while head and not head.endswith(b"\n"):
        block = f.read(1 << 16)
        if not block:
            break
        k = block.find(b"\n")
        head += block if k < 0 else block[: k + 1]
        if k >= 0:
            break
    return head


@dataclass
class Part:
    """A piece of a task's records, in file order.

    records: a pyarrow Table (the fast path: its columns are checked at once) or a list of Python records (a
    `packprep.records.BadRecord` in place of one that cannot be parsed). locate(i) -> (where, at, raw or None)
    places record i for a reject ('line', 17, the line's text). fallback() -> the same records as a Python list,
    parsed one by one, for a table that fails the column checks (None: the table's own rows, `table.to_pylist()`).
    """

    records: pa.Table | list
    locate: Callable[[int], tuple[str, int | None, str | None]]
    fallback: Callable[[], list] | None = None


def union_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """Fields of all schemas in first-seen order; a field's type from the first schema where it is not null."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in fields or pa.types.is_null(fields[f.name].type):
                fields[f.name] = f
    return pa.schema(list(fields.values()))


def group(sizes: list[int], chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive items into groups of >= chunk_bytes: sizes [5, 5, 5] with 8 -> [(0, 2), (2, 3)]."""
    groups, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= chunk_bytes:
            groups.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes) or not groups:
        groups.append((start, len(sizes)))
    return groups


def line_of(path, byte_pos: int) -> int:
    """1-based line number of byte_pos (only on the error path: reads the file prefix)."""
    with open_input(path, seekable=True) as f:
        return f.read(byte_pos).count(b"\n") + 1


def line_of_text(path, text: str) -> int | None:
    """1-based line of the first line equal to `text` (a line a parser could not take; error path only)."""
    with open_input(path) as f:
        lines = io.StringIO(f.read().decode("utf-8", "replace"), newline=None)  # text mode's universal newlines
    return next((k for k, x in enumerate(lines, 1) if x.rstrip("\r\n") == text), None)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
