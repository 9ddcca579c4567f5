"""Parquet files: one task per group of row groups (>= chunk_bytes of uncompressed data, or the file's rest).

Planning reads the footer only. A task decodes its row groups, only the columns its record format needs, with
pyarrow's C++ reader (one thread: tasks run in parallel processes); rejects are located by 0-based row.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from packprep.readers.base import Part, group


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    pf = pq.ParquetFile(f)
    meta = pf.metadata
    return pf.schema_arrow, group([meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)],
                                  chunk_bytes)


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    pf = pq.ParquetFile(f)
    have = [c for c in task.format.fields if c in pf.schema_arrow.names]
    row = sum(pf.metadata.row_group(i).num_rows for i in range(task.start))
    for rg in range(task.start, task.stop):
        table = pf.read_row_group(rg, columns=have, use_threads=False)
        yield Part(table, lambda i, r=row: ("row", r + i, None))
        row += table.num_rows
