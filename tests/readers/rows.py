"""Shared by the row-format readers (mds, litdata): the expected rows from expected.npz, and the npz of rows read."""

import numpy as np

KEYS = ("input_ids", "labels", "doc_offsets", "loss_mask")


def expected_rows(path):
    e = np.load(path)
    rows = []
    for r in range(len(e["row_offsets"]) - 1):
        a, b = e["row_offsets"][r], e["row_offsets"][r + 1]
        c, d = e["row_docs"][r], e["row_docs"][r + 1]
        ends = np.cumsum(e["lengths"][c:d])
        rows.append({"input_ids": e["tokens"][a:b].astype(np.int32), "labels": e["labels"][a:b].astype(np.int32),
                     "doc_offsets": np.concatenate([[0], ends]).astype(np.int32),
                     "loss_mask": e["mask"][a:b].astype(np.uint8)})
    return rows


def by_source_shard(path, rows):
    """`rows` cut at the source shards' boundaries (the exports close an output shard at each)."""
    cut = np.cumsum(np.load(path)["shard_rows"])[:-1]
    return [rows[a:b] for a, b in zip([0, *cut], [*cut, len(rows)])]


def save_rows(path, rows, **extra):
    flat = {k: np.concatenate([np.asarray(r[k]).ravel() for r in rows]) for k in KEYS}
    counts = {f"{k}_counts": np.array([np.asarray(r[k]).size for r in rows]) for k in KEYS}
    dtypes = {f"{k}_dtype": np.asarray(rows[0][k]).dtype.name for k in KEYS}
    np.savez(path, **flat, **counts, **dtypes, **extra)
