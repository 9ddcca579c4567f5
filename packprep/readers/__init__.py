"""Readers: one module per file format, behind one signature (see `packprep.readers.base`), and `read_task`.

    for docs in read_task(task, rejects=rejects): ...      # one ReadTask -> Docs batches, in file order

| suffix                    | kind    | module          | a task is                                   |
|---------------------------|---------|-----------------|---------------------------------------------|
| .jsonl .ndjson (.json)    | jsonl   | jsonl.py        | a newline-aligned byte range                |
| .json starting with '['   | json    | json_array.py   | a byte range of whole array elements        |
| .parquet                  | parquet | parquet.py      | row groups                                  |
| .arrow .feather .ipc      | arrow   | arrow.py        | record batches (also HF save_to_disk files) |
| .csv .tsv                 | csv     | csv.py          | the whole file                              |
HF save_to_disk folders are listed by hf.py and read by arrow.py. Adding a format adds a module and a row here.
Text formats may be compressed (.gz .zst .bz2 .xz after the suffix, or detected by magic bytes): compressed.py.

`read_task` opens the task's file once, runs the reader, and checks each part's columns at once
(`records.table_ok`); only a part that fails goes record by record through Python (`records.to_docs`).
"""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa

from packprep.readers import arrow, csv, json_array, jsonl, parquet
from packprep.readers.base import first_line, open_task
from packprep.records import Docs, Reject, table_ok, table_records, to_docs

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
            ".feather": "arrow", ".ipc": "arrow", ".csv": "csv", ".tsv": "csv"}
READERS = {"jsonl": jsonl, "json": json_array, "parquet": parquet, "arrow": arrow, "csv": csv}
_UNREADABLE = (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError)  # a file its reader cannot parse


def read_task(task, batch_rows: int = 2048, rejects: list[Reject] | None = None, render=None) -> Iterator[Docs]:
    """The task's documents, in file order, in batches of at most batch_rows.

    A bad record raises RecordError (file, line/row, reason); given a `rejects` list, it is appended there and
    reading goes on. Fast path: the reader's table is checked column by column (types, nulls, UTF-8); only a part
    that fails those checks is read again record by record, in Python, to find the bad ones. `render`: see
    `records.to_docs` (chats through the template, record by record).
    """
    seen = 0  # records of this task so far
    with open_task(task) as f:
        for records, locate in _checked_parts(f, task):
            n = records.num_rows if isinstance(records, pa.Table) else len(records)
            for off in range(0, n, batch_rows):
                yield to_docs(records[off : off + batch_rows], task, seen + off, lambda i, o=off: locate(o + i),
                              rejects, render)
            seen += n


def _checked_parts(f: pa.NativeFile, task):
    """(a table whose columns passed the checks, or a list of Python records, and locate) per part of the task."""
    try:
        for part in READERS[task.kind].read(f, task):
            records = part.records
            if isinstance(records, pa.Table) and not table_ok(records, task.format):
                records = part.fallback() if part.fallback else table_records(records)
            yield records, part.locate
    except _UNREADABLE as e:
        raise ValueError(f"{task.path}: cannot read as {task.kind}: {first_line(e)}") from None
