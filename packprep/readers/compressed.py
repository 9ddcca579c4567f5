"""Compressed inputs (.gz .zst .bz2 .xz around any text format): detection, streams, and where a file may be cut.

    codec("a.jsonl.zst")                  # 'zstd' (the magic bytes decide; a suffix that lies is refused)
    stream(raw, "zstd")                   # a NativeFile decompressing `raw` as it is read (never to disk)
    members("a.jsonl.zst")                # [(offset, compressed size, decompressed size or None), ...] or None

Decompression streams through pyarrow's codecs (gzip, bz2, zstd; xz through Python's lzma), so memory holds one
block, never the file. A compressed file is one task unless it is made of independent members, each decodable on its
own: zstd frames (pzstd, seekable zstd, writers that flush a frame per chunk) and bgzip blocks (`bgzip`, BGZF). Then
JSON lines files are cut between members whose decompressed data ends with a newline, into tasks of >= chunk_bytes
of decompressed data. Finding members walks the frame and block headers (a few bytes per 128 KB block); checking a
cut decompresses the one member before it. Both are done for local files; a remote compressed file is one task.
"""

from __future__ import annotations

import functools
import lzma
import os

import pyarrow as pa

from packprep import storage

MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bgz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2",
            ".xz": "xz"}
_ZSTD_FRAME, _ZSTD_SKIP = 0xFD2FB528, 0x184D2A50


def inner_name(name: str) -> str:
    """'a.jsonl.zst' -> 'a.jsonl' (the name whose suffix says the format inside)."""
    for s in SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


@functools.lru_cache(maxsize=4096)
def codec(path: str) -> str | None:
    """The file's compression from its first bytes; a compression suffix over other data is refused."""
    head = _head(path)
    found = next((c for magic, c in MAGIC.items() if head.startswith(magic)), None)
    named = next((c for s, c in SUFFIXES.items() if path.lower().endswith(s)), None)
    if named and found is None and head:
        raise ValueError(f"{path}: the name says {named} but the data is not {named}-compressed "
                         f"(first bytes {head[:4].hex()}); rename the file or recompress it")
    return found


def _head(path: str) -> bytes:
    if storage.is_remote(path):
        fs, p = storage.filesystem(path)
        with fs.open(p, "rb", block_size=1 << 16) as f:
            return f.read(6)
    with open(path, "rb") as f:
        return f.read(6)


def stream(raw: pa.NativeFile, name: str) -> pa.NativeFile:
    """An unseekable NativeFile over the decompressed bytes of `raw`."""
    if name == "xz":  # pyarrow has no xz codec: Python's lzma in pyarrow's transform stream (what transcoding uses)
        d = lzma.LZMADecompressor()
        return pa.lib.TransformInputStream(raw, lambda buf: pa.py_buffer(b"" if d.eof else
                                                                         d.decompress(buf.to_pybytes())))
    return pa.CompressedInputStream(raw, name)


def members(path: str) -> list[tuple[int, int, int | None]] | None:
    """The independent members of a local zstd or bgzip file (None: one member, or not such a file)."""
    if storage.is_remote(path):
        return None
    name = codec(path)
    with pa.memory_map(path, "r") as mm:
        data = memoryview(mm.read_buffer())
        try:
            found = _zstd_frames(data) if name == "zstd" else _bgzf_blocks(data) if name == "gzip" else None
        except (IndexError, ValueError):  # a truncated or unusual header: decode as one stream
            found = None
        del data
    return found if found and len(found) > 1 else None


def _u(data, pos: int, n: int) -> int:
    if pos + n > len(data):
        raise IndexError(pos)
    return int.from_bytes(data[pos : pos + n], "little")


def _zstd_frames(data) -> list[tuple[int, int, int | None]]:
    """Walk zstd frame and block headers: frame header (magic, descriptor, window, dictionary id, content size),
    then blocks of (3-byte header: last flag, type, size), then an optional 4-byte checksum."""
    frames, pos = [], 0
    while pos < len(data):
        magic = _u(data, pos, 4)
        if magic & 0xFFFFFFF0 == _ZSTD_SKIP:  # a skippable frame: belongs to the member before it
            end = pos + 8 + _u(data, pos + 4, 4)
            if frames:
                off, _, size = frames[-1]
                frames[-1] = (off, end - off, size)
            pos = end
            continue
        if magic != _ZSTD_FRAME:
            raise ValueError("not a zstd frame")
        fhd = data[pos + 4]
        single, checksum = (fhd >> 5) & 1, (fhd >> 2) & 1
        fcs_bytes = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        p = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        size = _u(data, p, fcs_bytes) + (256 if fcs_bytes == 2 else 0) if fcs_bytes else None
        p += fcs_bytes
        while True:
            header = _u(data, p, 3)
            p += 3 + (1 if (header >> 1) & 3 == 1 else header >> 3)  # an RLE block stores one byte
            if header & 1:
                break
        p += 4 * checksum
        frames.append((pos, p - pos, size))
        pos = p
    return frames


def _bgzf_blocks(data) -> list[tuple[int, int, int | None]] | None:
    """BGZF: gzip members whose extra field 'BC' holds the member's size; ISIZE (last 4 bytes) its data size."""
    blocks, pos = [], 0
    while pos < len(data):
        if bytes(data[pos : pos + 4]) != b"\x1f\x8b\x08\x04":
            return None  # plain gzip (no extra field): one stream
        xlen, x, bsize = _u(data, pos + 10, 2), pos + 12, None
        while x < pos + 12 + xlen:
            if bytes(data[x : x + 2]) == b"BC":
                bsize = _u(data, x + 4, 2) + 1
            x += 4 + _u(data, x + 2, 2)
        if bsize is None:
            return None
        blocks.append((pos, bsize, _u(data, pos + bsize - 4, 4)))
        pos += bsize
    return blocks


def line_ranges(path: str, chunk_bytes: int, opener) -> list[tuple[int, int]]:
    """Compressed byte ranges of whole members, each holding whole lines and >= chunk_bytes of data (decompressed
    sizes where the headers give them, else compressed sizes); [(0, file size)] when the file cannot be cut."""
    found = members(path)  # None for a remote file
    if found is None:
        if storage.is_remote(path):
            fs, p = storage.filesystem(path)
            return [(0, fs.size(p))]
        return [(0, os.path.getsize(path))]
    size = os.path.getsize(path)
    cuts, acc = [0], 0
    for off, csize, dsize in found:
        acc += dsize if dsize is not None else csize
        end = off + csize
        if acc >= chunk_bytes and end < size and _ends_line(opener, off, end):
            cuts.append(end)
            acc = 0
    return list(zip(cuts, cuts[1:] + [size]))


def _ends_line(opener, start: int, stop: int) -> bool:
    """Does the member at [start, stop) decompress to data ending with a newline? (decodes that one member)"""
    with opener(start, stop) as f:
        tail = b""
        while block := f.read(1 << 20):
            tail = block
    return tail.endswith(b"\n")
