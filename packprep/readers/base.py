"""What every reader shares: the opener, the `Part` a reader yields, and the error-path helpers.

A reader (one module per file format, listed in `packprep.readers.READERS`) is two functions over an opened input:

    schema, ranges = plan(f, path, chunk_bytes)   # the first records' schema (None: no records) and the file's
                                                  # task ranges: [(start, stop), ...] in the reader's own unit
    for part in read(f, task): ...                # Part(records, locate, fallback) for task.start..task.stop

`f` comes from `open_input(path)`, the one place a path becomes bytes: a seekable pyarrow NativeFile (a memory map
a copying reader for a local file; a memory map for Arrow IPC). Compressed and remote
(fsspec) inputs belong here too: a NativeFile over the decompressed stream (`pa.CompressedInputStream`, or
`pa.PythonFile` around an fsspec file), planned by the reader as one whole-file range when it cannot seek.
Error-path helpers take the path and open their own handle, so they never move a reader's position.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

PEEK_BYTES, PEEK_LINES = 1 << 16, 100  # format detection reads the union of the first records' fields


def open_input(path, mmap: bool = False) -> pa.NativeFile:
    """A readable, seekable byte stream over one input file. Reads copy into memory, so a file truncated under a
    reader gives short reads (caught as a changed input), never a SIGBUS that kills the process. mmap=True (Arrow
    IPC streams, whose tasks walk the earlier batches' headers) maps it instead: zero-copy, but a truncation kills
    the worker (reported as a dead worker; the rerun's content hash names the changed file)."""
    return pa.memory_map(str(path), "r") if mmap else pa.OSFile(str(path), "r")


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
    with open_input(path) as f:
        return f.read(byte_pos).count(b"\n") + 1


def line_of_text(path, text: str) -> int | None:
    """1-based line of the first line equal to `text` (a line a parser could not take; error path only)."""
    with open_input(path) as f:
        lines = io.StringIO(f.read().decode("utf-8", "replace"), newline=None)  # text mode's universal newlines
    return next((k for k, x in enumerate(lines, 1) if x.rstrip("\r\n") == text), None)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
