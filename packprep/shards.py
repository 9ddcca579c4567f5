"""Shard format v1: the one module that owns the schema, the writer and the reader of packprep's output.

An output folder is what `datasets.load_from_disk(out)` opens as is and what `trainer/` memory-maps:
    out/data-00000-of-000NN.arrow   Arrow IPC *stream* files (datasets' on-disk format), uncompressed
    out/state.json, out/dataset_info.json   the Hugging Face datasets metadata for those files
    out/packprep.json               manifest (written last, by build.py; a folder without it is unfinished)
One row per packed sequence; see SCHEMA. Writing costs one pass over the row's bytes (plus sha256);
reading is a zero-copy memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 1
FORMAT_MINOR = 1  # 1.1 added `labels`, as the last column: a reader of 1.0 still reads 1.1
FORMAT_MINOR_PADDED = 2  # 1.2: a --pad-docs-to-multiple build, which adds `doc_offsets_unpadded` as the last column
MANIFEST = "packprep.json"
IGNORE_INDEX = -100  # HF's label for "no loss here"

SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32())),  # the row's tokens, unpadded (len <= seq_len)
        pa.field("doc_offsets", pa.list_(pa.int32())),  # [0, l1, l1+l2, ..., len(input_ids)] (cu_seqlens)
        pa.field("seq_lengths", pa.list_(pa.int32())),  # [l1, l2, ...] (TRL's padding-free collator reads this)
        pa.field("loss_mask", pa.list_(pa.uint8())),  # 1 where the token carries loss
        pa.field("doc_ids", pa.list_(pa.int64())),  # source << 48 | repeat << 32 | record (mixture.py)
        pa.field("labels", pa.list_(pa.int32())),  # HF unshifted: token where loss_mask, else -100; -100 at doc starts
    ]
)
# --pad-docs-to-multiple N: every document is a slot of its real tokens then pad tokens (loss_mask 0, labels -100),
# slot lengths multiples of N. doc_offsets / seq_lengths are the slots (positions in the row: TransformerEngine's
# cu_seqlens_q_padded); doc_offsets_unpadded the real tokens' running sum [0, r1, r1+r2, ...] (its cu_seqlens_q),
# so document i's real tokens are input_ids[doc_offsets[i] : doc_offsets[i] + r_i].
SCHEMA_PADDED = SCHEMA.append(pa.field("doc_offsets_unpadded", pa.list_(pa.int32())))

# datasets' Features for SCHEMA, as dataset_info.json spells them (datasets >= 4 writes "List").
_HF_FEATURES = {
    "input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "doc_offsets": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "seq_lengths": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "loss_mask": {"feature": {"dtype": "uint8", "_type": "Value"}, "_type": "List"},
    "doc_ids": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "List"},
    "labels": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
}
_HF_FEATURES_PADDED = {**_HF_FEATURES, "doc_offsets_unpadded": _HF_FEATURES["doc_offsets"]}


def shard_name(index: int, num_shards: int) -> str:
    """`data-00003-of-00010.arrow`, the names datasets' save_to_disk uses."""
    return f"data-{index:05d}-of-{num_shards:05d}.arrow"


def make_batch(
    tokens: np.ndarray,
    row_offsets: np.ndarray,
    piece_lengths: np.ndarray,
    row_piece_offsets: np.ndarray,
    doc_ids: np.ndarray,
    loss_mask: np.ndarray | None = None,
    real_lengths: np.ndarray | None = None,
) -> pa.RecordBatch:
    """Build a record batch of rows from flat arrays (no Python loop over rows).

    tokens[row_offsets[r]:row_offsets[r+1]] are row r's tokens; piece_lengths / doc_ids hold one entry per piece,
    row r owning pieces row_piece_offsets[r]:row_piece_offsets[r+1]. loss_mask (uint8, like tokens) or None (all 1).
    Example: rows [[a a a b b], [c c c c]] -> piece_lengths [3, 2, 4], row_piece_offsets [0, 2, 3],
    doc_offsets [[0, 3, 5], [0, 4]]. real_lengths (one per piece, padded builds): the real tokens at the start of
    each piece, the rest being padding; adds doc_offsets_unpadded (SCHEMA_PADDED).
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    row_offsets = np.asarray(row_offsets, dtype=np.int64)
    piece_lengths = np.asarray(piece_lengths, dtype=np.int32)
    row_piece_offsets = np.asarray(row_piece_offsets, dtype=np.int64)
    base = row_offsets[0]
    tok_off = (row_offsets - base).astype(np.int32)
    tokens = tokens[base : row_offsets[-1]]  # a view; tokens and mask are sliced alike
    if loss_mask is None:
        loss_mask = np.ones(len(tokens), dtype=np.uint8)
    else:
        loss_mask = np.ascontiguousarray(loss_mask[base : row_offsets[-1]], dtype=np.uint8)
    p0 = row_piece_offsets[0]
    piece_off = (row_piece_offsets - p0).astype(np.int32)
    pl = piece_lengths[p0 : row_piece_offsets[-1]]
    global_cum = np.concatenate([[0], np.cumsum(pl, dtype=np.int64)])
    entry_off, doc_offsets = _row_offsets(pl, piece_off)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)[p0 : row_piece_offsets[-1]]
    # labels: tokens [5 6 7 | 8 9], mask [1 1 1 | 0 1] -> [-100 6 7 | -100 9] (no prediction crosses a boundary)
    labels = np.where(loss_mask != 0, tokens, np.int32(IGNORE_INDEX)).astype(np.int32)
    starts = global_cum[:-1]
    labels[starts[starts < len(labels)]] = IGNORE_INDEX
    arrays = [
        pa.ListArray.from_arrays(_arrow(tok_off), _arrow(tokens)),
        pa.ListArray.from_arrays(_arrow(entry_off), _arrow(doc_offsets)),
        pa.ListArray.from_arrays(_arrow(piece_off), _arrow(pl)),
        pa.ListArray.from_arrays(_arrow(tok_off), _arrow(loss_mask)),
        pa.ListArray.from_arrays(_arrow(piece_off), _arrow(doc_ids)),
        pa.ListArray.from_arrays(_arrow(tok_off), _arrow(labels)),
    ]
    if real_lengths is None:
        return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)
    real = np.asarray(real_lengths, dtype=np.int32)[p0 : row_piece_offsets[-1]]
    arrays.append(pa.ListArray.from_arrays(_arrow(entry_off), _arrow(_row_offsets(real, piece_off)[1])))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA_PADDED)


def _row_offsets(lengths: np.ndarray, piece_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the running sum of its pieces' lengths with a leading 0 (one extra entry per row), as list offsets
    and values: lengths [3, 2, 4], piece_off [0, 2, 3] -> ([0, 3, 5], [0, 3, 5, 0, 4])."""
    rows = len(piece_off) - 1
    global_cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    idx = np.arange(len(lengths) + rows, dtype=np.int64)
    row_of_entry = np.repeat(np.arange(rows), np.diff(piece_off) + 1)
    entry_off = (piece_off + np.arange(rows + 1)).astype(np.int32)
    local = idx - entry_off[:-1][row_of_entry]  # position of the entry inside its row: 0..npieces
    piece_at = piece_off[:-1][row_of_entry] + local  # index into global_cum
    return entry_off, (global_cum[piece_at] - global_cum[piece_off[:-1]][row_of_entry]).astype(np.int32)


_ARROW_TYPES = {np.dtype(np.int32): pa.int32(), np.dtype(np.int64): pa.int64(), np.dtype(np.uint8): pa.uint8()}


def _arrow(a: np.ndarray) -> pa.Array:
    """A numpy array as an Arrow array without a copy. Not `pa.array`: its first call imports pandas (~0.25 s per
    process) just to check whether `a` is a pandas object."""
    a = np.ascontiguousarray(a)
    return pa.Array.from_buffers(_ARROW_TYPES[a.dtype], len(a), [None, pa.py_buffer(a)])


def write_shard(path: str | Path, batches, fsync: bool = True, schema: pa.Schema = SCHEMA) -> dict:
    """Write record batches as one Arrow IPC stream file (pyarrow's stream writer: the bytes datasets writes),
    atomically (`atomic_file`: temp name, fsync, rename).

    Returns {"file", "rows", "tokens", "bytes", "sha256"} for the manifest. A crash leaves only a `.tmp` file,
    which no reader takes for a shard. The sha256 is computed from the bytes as they are written, on a second
    thread, so it costs no second pass over the file.
    """
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    rows = tokens = 0
    digest = hashlib.sha256()
    with atomic_file(path, fsync=fsync) as f, ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        with pa.ipc.new_stream(_HashingSink(f, digest, hasher), schema) as writer:
            for batch in batches:
                if not batch.schema.equals(schema):
                    raise ValueError(f"record batch schema {batch.schema} is not shard format v1's")
                rows += batch.num_rows
                tokens += len(batch.column(0).values)
                writer.write_batch(batch)
    return {"file": path.name, "rows": rows, "tokens": tokens, "bytes": path.stat().st_size,
            "sha256": digest.hexdigest()}


class _HashingSink:
    """A binary file that also feeds what is written to a sha256, in order, on the `hasher` thread (the submitted
    task keeps the buffer alive until it is hashed)."""

    def __init__(self, f, digest, hasher):
        self.f, self.digest, self.hasher, self.closed = f, digest, hasher, False

    def write(self, data) -> int:
        self.hasher.submit(self.digest.update, data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:  # the stream writer's close() leaves the file to atomic_file
        self.closed = True


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_shard(path: str | Path) -> pa.Table:
    """Memory-map one shard as a pyarrow Table (zero copy: pages are read on access)."""
    with pa.memory_map(str(path), "r") as source:
        return pa.ipc.open_stream(source).read_all()


def shard_files(out: str | Path) -> list[Path]:
    """The shard files of an output folder, in order, from state.json (what datasets reads)."""
    out = Path(out)
    state = out / "state.json"
    if not state.exists():
        raise FileNotFoundError(f"{out} is not a packprep output folder (no state.json); run `packprep build` first")
    files = [out / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: {len(missing)} shard(s) listed in state.json are missing: {missing[:3]}")
    return files


def write_hf_metadata(out: str | Path, files: list[str], fingerprint: str, description: str = "",
                      padded: bool = False) -> None:
    """state.json and dataset_info.json exactly as datasets' save_to_disk lays them out."""
    out = Path(out)
    state = {
        "_data_files": [{"filename": f} for f in files],
        "_fingerprint": fingerprint[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    features = _HF_FEATURES_PADDED if padded else _HF_FEATURES
    info = {"citation": "", "description": description, "features": features, "homepage": "", "license": ""}
    write_json_atomic(out / "dataset_info.json", info)
    write_json_atomic(out / "state.json", state)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", fsync: bool = True):
    """Write `path` all or nothing: a temporary file beside it that is fsynced, renamed into place and its folder
    fsynced on success, and removed on error (a kill -9 may leave one `.tmp*`, which a resumed build deletes).
    fsync=False (test fixtures) skips both fsyncs: atomic against a killed process, not against a power loss."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def fsync_dir(folder: str | Path) -> None:
    """Make the renames into `folder` durable (a completion marker written after its data survives a power loss
    only with them). Filesystems that cannot fsync a folder (some network ones) are skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
