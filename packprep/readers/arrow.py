"""Arrow IPC files and streams (.arrow, .feather, .ipc; the data files of HF save_to_disk folders).

A task is a byte range of whole record batch messages (>= chunk_bytes of bodies). Planning walks the messages'
headers only: each message is `<0xFFFFFFFF><int32 metadata length><Message flatbuffer><body>`, and the flatbuffer
gives the body's length and the batch's rows, so the walk reads ~100 bytes per batch and seeks past the bodies (the
IPC file format is the same messages after an 8-byte magic, followed by a footer). A task then reads its own
batches, one message at a time, into memory (copying reads, never a memory map: a file truncated under a reader is
a short read, reported as an unreadable or changed input, not a SIGBUS). Memory: one record batch. A schema with
dictionary-encoded fields also reads the dictionary messages before the task's range. Rejects are located by 0-based
row (the error path walks the headers before the task to count them).
"""

from __future__ import annotations

import struct
from typing import Iterator, NamedTuple

import pyarrow as pa

from packprep.readers.base import Part, group, open_input

MAGIC = b"ARROW1"
SCHEMA, DICTIONARY, RECORD_BATCH = 1, 2, 3  # flatbuffer MessageHeader union tags


class Message(NamedTuple):
    start: int  # byte offset of the message's prefix
    end: int  # byte offset after its body
    kind: int  # SCHEMA | DICTIONARY | RECORD_BATCH | ...
    rows: int  # a record batch's rows (0 otherwise)


def plan(f: pa.NativeFile, path, chunk_bytes: int) -> tuple[pa.Schema | None, list[tuple[int, int]]]:
    messages = list(_messages(f))
    schema = _schema(f, messages[0] if messages else None)
    batches = [m for m in messages if m.kind == RECORD_BATCH]
    if not batches:
        return schema, [(0, 0)]
    ranges = group([m.end - m.start for m in batches], chunk_bytes)
    return schema, [(batches[a].start, batches[b - 1].end) for a, b in ranges]


def read(f: pa.NativeFile, task) -> Iterator[Part]:
    schema = _schema(f, next(_messages(f), None))
    dictionaries = _has_dictionaries(schema)  # then the dictionary messages before the range are read too
    before, rows = b"", _RowsBefore(task)
    for m in _messages(f, start=None if dictionaries else task.start, stop=task.stop):
        if dictionaries and m.kind in (SCHEMA, DICTIONARY):
            before += _bytes(f, m).to_pybytes()  # a stream prefix that decodes the batches after it
        if m.kind != RECORD_BATCH or m.start < task.start:
            continue
        data = _bytes(f, m)
        if dictionaries:
            batch = pa.ipc.open_stream(pa.py_buffer(before + data.to_pybytes())).read_next_batch()
        else:
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(data), schema)
        yield Part(pa.Table.from_batches([batch]), lambda i, at=rows.seen: ("row", rows() + at + i, None))
        rows.seen += batch.num_rows


class _RowsBefore:
    """The rows before a task (for rejects: the error path walks the headers before it on a handle of its own) and
    the task's rows read so far."""

    def __init__(self, task):
        self.task, self.seen, self.before = task, 0, None

    def __call__(self) -> int:
        if self.before is None:
            with open_input(self.task.path) as g:
                self.before = sum(m.rows for m in _messages(g, stop=self.task.start) if m.kind == RECORD_BATCH)
        return self.before


def _bytes(f: pa.NativeFile, m: Message) -> pa.Buffer:
    f.seek(m.start)
    data = f.read_buffer(m.end - m.start)
    if data.size != m.end - m.start:
        raise pa.ArrowInvalid(f"record batch at byte {m.start} is cut short ({data.size} of {m.end - m.start} "
                              "bytes): the file was truncated")
    return data


def _schema(f: pa.NativeFile, first: Message | None) -> pa.Schema:
    if first is None or first.kind != SCHEMA:
        raise pa.ArrowInvalid("not an Arrow IPC file or stream (no schema message first)")
    return pa.ipc.read_schema(pa.ipc.read_message(_bytes(f, first)))


def _has_dictionaries(schema: pa.Schema) -> bool:
    def has(t: pa.DataType) -> bool:
        return pa.types.is_dictionary(t) or any(has(t.field(i).type) for i in range(t.num_fields))

    return any(has(field.type) for field in schema)


def _messages(f: pa.NativeFile, start: int | None = None, stop: int | None = None) -> Iterator[Message]:
    """The IPC messages of the file (from byte `start`, a message's offset; else from the schema), read from their
    headers, up to the end-of-stream marker, the footer of the IPC file format, or byte `stop`."""
    size = f.size()
    f.seek(0)
    pos, end = 0, size
    if f.read(8)[:6] == MAGIC:  # file format: magic, padding, the stream, footer, int32 footer length, magic
        f.seek(max(0, size - 10))
        tail = f.read(10)
        if tail[4:] != MAGIC:
            raise pa.ArrowInvalid("an Arrow IPC file without its footer (truncated?)")
        pos, end = 8, size - 10 - struct.unpack("<i", tail[:4])[0]
    pos, end = start if start is not None else pos, min(end, stop if stop is not None else end)
    while pos < end:
        f.seek(pos)
        prefix, skip, length, meta, kind, body, rows = f.read(8), 8, -1, b"", -1, -1, 0
        try:
            skip, length = (8, struct.unpack_from("<i", prefix, 4)[0]) if prefix[:4] == b"\xff\xff\xff\xff" else (
                4, struct.unpack_from("<i", prefix)[0])  # before Arrow 0.15: no continuation marker
            if length == 0:
                return  # end-of-stream marker
            f.seek(pos + skip)
            meta = f.read(length) if length > 0 else b""
            kind, body, rows = _header(meta)
        except (struct.error, IndexError):  # a short prefix, or metadata that is not a flatbuffer Message
            pass
        if length < 0 or body < 0 or len(meta) < length or pos + skip + length + body > size:
            raise pa.ArrowInvalid(f"the message at byte {pos} is cut short or not Arrow IPC (a truncated file?)")
        yield Message(pos, pos + skip + length + body, kind, rows)
        pos += skip + length + body


def _header(meta: bytes) -> tuple[int, int, int]:
    """(header kind, body length, rows) from a Message flatbuffer: Message {version: short, header_type: ubyte,
    header: union, bodyLength: long, ...}; RecordBatch {length: long, ...}."""
    msg = struct.unpack_from("<I", meta)[0]
    kind = _field(meta, msg, 1, "<B") or 0
    body = _field(meta, msg, 3, "<q") or 0
    rows = 0
    if kind == RECORD_BATCH:
        at = _slot(meta, msg, 2)
        rows = (_field(meta, at + struct.unpack_from("<I", meta, at)[0], 0, "<q") or 0) if at else 0
    return kind, body, rows


def _slot(buf: bytes, table: int, field: int) -> int:
    """Byte offset of a flatbuffer table's field (0: absent, its default)."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    if 4 + 2 * field >= struct.unpack_from("<H", buf, vtable)[0]:
        return 0
    off = struct.unpack_from("<H", buf, vtable + 4 + 2 * field)[0]
    return table + off if off else 0


def _field(buf: bytes, table: int, field: int, fmt: str) -> int | None:
    at = _slot(buf, table, field)
    return struct.unpack_from(fmt, buf, at)[0] if at else None
