"""Arrow IPC files and streams (.arrow, .feather, .ipc; the data files of HF save_to_disk folders).

One task per group of record batches (>= chunk_bytes). The input is memory-mapped, so a task reads only its own
batches' pages: for the IPC file format it jumps to them through the footer; for a stream (what `datasets`
writes) it walks the batch headers before them. Rejects are located by 0-based row.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from packprep.readers.base import Part, group


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    reader = _open(f)
    return reader.schema, group([b.nbytes for b in _batches(reader)], chunk_bytes)


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    batches = list(_batches(_open(f)))
    row = sum(b.num_rows for b in batches[: task.start])
    for batch in batches[task.start : task.stop]:
        yield Part(pa.Table.from_batches([batch]), lambda i, r=row: ("row", r + i, None))
        row += batch.num_rows


def _open(f: pa.NativeFile):
    f.seek(0)
    try:
        return pa.ipc.open_file(f)
    except pa.ArrowInvalid:  # not the file format: a stream
        f.seek(0)
        return pa.ipc.open_stream(f)


def _batches(reader):
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)
