"""MosaicML streaming (MDS): one sample per packed row, the bytes `streaming.MDSWriter` writes for the columns
{"doc_offsets", "input_ids", "labels": "ndarray:int32", "loss_mask": "ndarray:uint8"}.

A sample is input_ids (the row's tokens), labels (Hugging Face's unshifted labels: the token where it carries loss,
else -100, and -100 at every document's first token), doc_offsets (the row's cu_seqlens [0, l1, l1+l2, ..., len])
and loss_mask (0/1 per token, so the mask round-trips even at document starts). Files: `shard.00000.mds` (uint32
sample count, uint32 offsets, the writer's config JSON, the samples; each sample is uint32 byte sizes of its columns
then each column as `ndarray` encoding: one byte ndim<<2 | shape dtype, the shape, the values) and `index.json`
(version 2, one entry per shard). Shards close at `size_limit` bytes (MDSWriter's default 64 MiB) and, so that the
export can resume, at the end of every source shard. Cost: a Python loop over rows (tens of µs each) plus one copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from packprep.exports import by_size, row_samples
from packprep.shards import atomic_file

VERSION = 1
COLUMNS = {"doc_offsets": "ndarray:int32", "input_ids": "ndarray:int32", "labels": "ndarray:int32",
           "loss_mask": "ndarray:uint8"}
_SHAPE_DTYPES = ((1 << 8, np.uint8, 0), (1 << 16, np.uint16, 1), (1 << 32, np.uint32, 2))


def config(size_limit: int) -> dict:
    names = sorted(COLUMNS)
    return {"version": 2, "format": "mds", "compression": None, "hashes": [], "size_limit": size_limit,
            "column_names": names, "column_encodings": [COLUMNS[n] for n in names], "column_sizes": [None] * len(names)}


def start(out: Path, info, size_limit: int = 1 << 26) -> dict:
    if not 0 < size_limit < 1 << 32:
        raise ValueError(f"size_limit={size_limit} must be in (0, 2**32), as MDSWriter requires")
    return {"size_limit": size_limit, "shards": 0}


def encode_ndarray(a: np.ndarray) -> bytes:
    """MDS `ndarray:<dtype>` (static dtype, dynamic shape) of a 1-D array."""
    for bound, shape_dtype, code in _SHAPE_DTYPES:
        if len(a) < bound:
            return bytes([(1 << 2) | code]) + np.array([len(a)], shape_dtype).tobytes() + a.tobytes()
    return bytes([(1 << 2) | 3]) + np.array([len(a)], np.uint64).tobytes() + a.tobytes()


def encode_sample(sample: dict) -> bytes:
    parts = [encode_ndarray(sample[name]) for name in sorted(COLUMNS)]
    return np.array([len(p) for p in parts], np.uint32).tobytes() + b"".join(parts)


def write_part(index: int, batches, out: Path, state: dict, info) -> dict:
    config_data = json.dumps(config(state["size_limit"]), sort_keys=True).encode()
    entries = []
    samples = (encode_sample(s) for s in row_samples(batches))
    # MDSWriter's accounting: 8 bytes + the config per shard, 4 bytes (its offset) per sample
    for group in by_size(samples, state["size_limit"], base=8 + len(config_data), overhead=4):
        name = f"shard.{state['shards']:05d}.mds"
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in group])]).astype(np.uint32)
        offsets += 4 + len(offsets) * 4 + len(config_data)
        with atomic_file(out / name, fsync=info.fsync) as f:
            f.write(np.uint32(len(group)).tobytes() + offsets.tobytes() + config_data + b"".join(group))
            nbytes = f.tell()
        entries.append({"samples": len(group), "raw_data": {"basename": name, "bytes": nbytes, "hashes": {}},
                        "zip_data": None, **config(state["size_limit"])})
        state["shards"] += 1
    return {"shards": entries}


def finish(out: Path, parts: list[dict], state: dict, info) -> dict:
    shards = [s for p in parts for s in p["shards"]]
    with atomic_file(out / "index.json", "w", fsync=info.fsync) as f:
        json.dump({"version": 2, "shards": shards}, f, sort_keys=True)
    return {"files": [s["raw_data"]["basename"] for s in shards] + ["index.json"], "columns": COLUMNS}

