"""Megatron-Core indexed dataset: `PREFIX_text_document.bin` + `.idx`, one document per sequence.

The bytes are what Megatron's `tools/preprocess_data.py` writes through `IndexedDatasetBuilder.add_document` (one
sequence per document, no sentence splitting): the `.bin` holds every document's tokens back to back in
`DType.optimal_dtype(vocab_size)` (uint16 below 65,500 ids, else int32); the `.idx` is the header `MMIDIDX\\0\\0`,
version 1 (<Q), the dtype code (<B), the sequence count and document count (<Q), then int32 sequence lengths,
int64 byte pointers and int64 document indices [0, 1, ..., n]. Documents are packprep's pieces in shard row order
(a document split by `--long-docs split` stays split; a --pad-docs-to-multiple build's documents are their real
tokens, without the padding: Megatron's GPTDataset concatenates documents, so per-document padding means nothing
to it). When the build has a loss mask (prompt/response data), it is
written as a parallel indexed dataset `PREFIX_loss_mask_document` (uint8, the same lengths and documents):
Megatron-Core's `GPTDataset` does not read it (it trains on every token), it is there for SFT datasets that do.
Cost: the ids and mask are file ranges of the shards, copied by the kernel (`exports.append`; uint16 ids are first
cast into a reused buffer, then written); the `.bin` is appended shard by shard (resumable by truncating to the last
recorded size), the `.idx` written at the end.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from packprep.exports import WORK, append, cast_ids, real_tokens, save_array
from packprep.shards import atomic_file, fsync_dir

VERSION = 1
_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4, np.dtype(np.uint16): 8}


def token_dtype(vocab_size: int) -> np.dtype:
    """Megatron's `DType.optimal_dtype(vocab_size)`."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def start(out: Path, info, prefix: str = "packprep") -> dict:
    keys = {"text": str(token_dtype(info.vocab_size))}
    if int(info.counts["loss_tokens"]) < real_tokens(info):
        keys["loss_mask"] = "uint8"
    return {"prefix": prefix, "keys": keys, "bytes": {k: 0 for k in keys}}


def write_part(index: int, batches, out: Path, state: dict, info) -> dict:
    work = out / WORK
    files = {k: open(_partial(work, k), "r+b" if state["bytes"][k] else "wb", buffering=0) for k in state["keys"]}
    lengths, scratch = [], []
    try:
        for k, f in files.items():
            if f.seek(0, os.SEEK_END) > state["bytes"][k]:
                f.truncate(state["bytes"][k])  # drop what an interrupted run appended after the last recorded part
            f.seek(state["bytes"][k])
        for rows in batches:
            append(files["text"], cast_ids(rows.tokens, state["keys"]["text"], scratch), rows.file)
            if "loss_mask" in files:
                append(files["loss_mask"], rows.loss_mask, rows.file)
            lengths.append(rows.doc_lengths)
        for k, f in files.items():
            f.flush()
            if info.fsync:
                os.fsync(f.fileno())
            state["bytes"][k] = f.tell()
    finally:
        for f in files.values():
            f.close()
    lengths = np.concatenate(lengths).astype(np.int32) if lengths else np.zeros(0, np.int32)
    save_array(work / f"lengths-{index:05d}.i32", lengths, info)
    return {"documents": len(lengths), "tokens": int(lengths.sum())}


def finish(out: Path, parts: list[dict], state: dict, info) -> dict:
    work = out / WORK
    lengths = np.concatenate([np.fromfile(work / f"lengths-{i:05d}.i32", dtype=np.int32) for i in range(len(parts))])
    files = []
    for key, dtype in state["keys"].items():
        base = f"{state['prefix']}_{key}_document"
        assert state["bytes"][key] == lengths.sum(dtype=np.int64) * np.dtype(dtype).itemsize
        with atomic_file(out / f"{base}.idx", fsync=info.fsync) as f:
            write_index(f, lengths, np.dtype(dtype))
        os.replace(_partial(work, key), out / f"{base}.bin")
        files += [f"{base}.bin", f"{base}.idx"]
    if info.fsync:
        fsync_dir(out)
    return {"files": files, "prefix": state["prefix"], "token_dtype": state["keys"]["text"],
            "loss_mask": "loss_mask" in state["keys"]}


def write_index(f, lengths: np.ndarray, dtype: np.dtype) -> None:
    """The `.idx` bytes of `_IndexWriter.write` for one sequence per document."""
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    f.write(_HEADER + struct.pack("<Q", 1) + struct.pack("<B", _DTYPE_CODES[dtype]))
    f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
    f.write(lengths.astype(np.int32).tobytes())
    f.write(pointers.tobytes())
    f.write(np.arange(n + 1, dtype=np.int64).tobytes())


def _partial(work: Path, key: str) -> Path:
    return work / f"{key}.bin.partial"
