"""CSV and TSV files (a header row, then records; values may hold quoted newlines): one task per file.

pyarrow's streaming CSV reader parses the file in blocks (every column read as text); a row with the wrong number
of columns is set aside by pyarrow and reported after the batch it was in, located by searching the file for its
text (error path only). A compressed CSV is parsed from the decompressing stream as it comes. Rejects are
located by 1-based line (exact unless a value holds a newline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pcsv

from packprep.readers.base import Part, line_of_text
from packprep.readers.compressed import inner_name
from packprep.records import RAW_PREFIX, BadRecord


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    parse = _parse_options(path)
    parse.invalid_row_handler = lambda row: "skip"  # the read reports bad rows
    if f.seekable():
        f.seek(0)
    return pcsv.open_csv(f, parse_options=parse).schema, [(0, 1)]


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    """Good rows and bad rows in file order: a bad row keeps its place (pyarrow numbers every row, header = 1), so
    the rows after it keep their record indices (doc_ids)."""
    bad: list = []
    parse = _parse_options(task.path)
    parse.invalid_row_handler = lambda r: bad.append(r) or "skip"
    as_text = pcsv.ConvertOptions(column_types={c: pa.string() for c in task.format.fields})
    if f.seekable():
        f.seek(0)
    reader = pcsv.open_csv(f, read_options=pcsv.ReadOptions(use_threads=False), parse_options=parse,
                           convert_options=as_text)
    row = 2  # the next record's row number (1-based, the header is row 1)
    for batch in reader:
        table, taken = pa.Table.from_batches([batch]), 0
        while taken < table.num_rows:
            while bad and bad[0].number == row:
                yield _bad_row(bad.pop(0), task.path)
                row += 1
            upto = bad[0].number if bad and bad[0].number is not None else row + table.num_rows
            n = min(table.num_rows - taken, max(upto - row, 1))
            yield Part(table.slice(taken, n), lambda i, b=row: ("line", b + i, None))
            taken, row = taken + n, row + n
    for r in bad:  # bad rows after the last good one
        yield _bad_row(r, task.path)


def _bad_row(r, path) -> Part:
    def locate(i):
        return "line", line_of_text(path, r.text) or r.number, r.text[:RAW_PREFIX]

    return Part([BadRecord("bad_row", f"expected {r.expected_columns} columns, got {r.actual_columns}")], locate)


def _parse_options(path) -> pcsv.ParseOptions:
    tsv = Path(inner_name(str(path))).suffix.lower() == ".tsv"
    return pcsv.ParseOptions(delimiter="\t" if tsv else ",", newlines_in_values=True)
