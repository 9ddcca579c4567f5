"""litdata: one item per packed row, the bytes litdata's `BinaryWriter` (what `litdata.optimize` uses) writes for
a dict of 1-D numpy arrays {"input_ids", "labels", "doc_offsets": int32, "loss_mask": uint8}.

Columns mean what they mean in the MDS export (labels: Hugging Face's unshifted labels, -100 where no loss and at
each document's first token; doc_offsets: the row's cu_seqlens; loss_mask: 0/1 per token). Files:
`chunk-0-{i}.bin` chunks (uint32 item count, uint32 item offsets, the items; an item is
uint32 byte sizes of its leaves, then each leaf's raw bytes: the `no_header_numpy` serializer) and `index.json`
({"chunks": [...], "config": {...}} with the PyTreeLoader, the leaves' data formats and the dict's tree spec).
Chunks close before the item that would pass `chunk_bytes` (BinaryWriter's rule; 64 MiB by default here) and, so
that the export can resume, at the end of every source shard. Cost: a Python loop over rows plus one copy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from packprep.exports import by_size, row_samples
from packprep.shards import atomic_file

VERSION = 1
KEYS = ("input_ids", "labels", "doc_offsets", "loss_mask")
_FORMATS = {"input_ids": "no_header_numpy:2", "labels": "no_header_numpy:2", "doc_offsets": "no_header_numpy:2",
            "loss_mask": "no_header_numpy:4"}  # litdata's numpy dtype indices: 2 = int32, 4 = uint8


def data_spec() -> str:
    """torch.utils._pytree.treespec_dumps of a dict with KEYS (protocol 1), as BinaryWriter stores it."""
    leaf = {"type": None, "context": None, "children_spec": []}
    return json.dumps([1, {"type": "builtins.dict", "context": json.dumps(list(KEYS)),
                           "children_spec": [leaf] * len(KEYS)}])


def config(chunk_bytes: int) -> dict:
    return {"chunk_bytes": chunk_bytes, "chunk_size": None, "compression": None, "compression_batch_size": None,
            "compression_level": None, "data_format": [_FORMATS[k] for k in KEYS], "data_spec": data_spec(),
            "encryption": None, "ipc_compression": None, "item_loader": "PyTreeLoader",
            "types": {k: "json" for k in KEYS}}


def start(out: Path, info, chunk_bytes: int = 1 << 26) -> dict:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
    return {"chunk_bytes": chunk_bytes, "chunks": 0}


def encode_item(sample: dict) -> bytes:
    leaves = [np.ascontiguousarray(sample[k]).tobytes() for k in KEYS]
    return np.array([len(x) for x in leaves], np.uint32).tobytes() + b"".join(leaves)


def write_part(index: int, batches, out: Path, state: dict, info) -> dict:
    chunks = []
    for items in by_size((encode_item(s) for s in row_samples(batches)), state["chunk_bytes"]):
        name = f"chunk-0-{state['chunks']}.bin"
        offsets = 4 + 4 * (len(items) + 1) + np.concatenate([[0], np.cumsum([len(x) for x in items])])
        with atomic_file(out / name, fsync=info.fsync) as f:
            f.write(np.uint32(len(items)).tobytes() + offsets.astype(np.uint32).tobytes() + b"".join(items))
            nbytes = f.tell()
        chunks.append({"chunk_bytes": nbytes, "chunk_size": len(items), "dim": None, "filename": name})
        state["chunks"] += 1
    return {"chunks": chunks}


def finish(out: Path, parts: list[dict], state: dict, info) -> dict:
    chunks = [c for p in parts for c in p["chunks"]]
    with atomic_file(out / "index.json", "w", fsync=info.fsync) as f:
        json.dump({"chunks": chunks, "config": config(state["chunk_bytes"]), "updated_at": str(time.time())}, f,
                  sort_keys=True)
    return {"files": [c["filename"] for c in chunks] + ["index.json"], "keys": list(KEYS)}
