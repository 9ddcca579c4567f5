"""Megatron-Bridge / NeMo packed SFT: packprep's rows as packed sequences, plus `packing_metadata.json`.

Each row is what Megatron-Bridge's `fill_packing_strategy` produces for one bin: `input_ids` (the documents back
to back), `seq_start_id` (each document's start in the row) and `loss_mask` already shifted by one to align with the
labels: loss_mask[j] says whether token j+1 carries loss, and the last position of each document is 0 (their
`x[1:] + [False]`). Their loader drops the last token of every document from the inputs and the first from the
labels, so a row of documents [l1, l2, ...] trains on sum(l_i - 1) positions with cu_seqlens [0, l1-1, ...].

Containers (`container=`):
- "parquet" (default, current Megatron-Bridge's `GPTSFTPackedParquetDataset`): `packed-00000.idx.parquet`, one per
  source shard, columns input_ids list<int32>, seq_start_id list<int32>, loss_mask list<int8>, row groups of 500
  (their `write_packed_parquet`'s layout; snappy, no dictionary on the ids).
- "npy" (Megatron-Bridge <= 0.3 and NeMo 2's `GPTSFTPackedDataset`, deprecated upstream): one `packed.npy`, a
  pickled object array of {"input_ids", "loss_mask", "seq_start_id"} dicts of Python lists, which their loader
  `np.load`s whole (so it is built in memory: for modest datasets only).
`packing_metadata.json` is their list of one dict per dataset: dataset_max_seqlen, max_samples_per_bin,
packing_factor, packing_efficiency (as they compute it, on l_i - 1), pack_size (the build's seq_len),
min_packed_seqlen.

A --pad-docs-to-multiple N build is written as Megatron-Bridge 0.3's own context-parallel preparation writes it
(`prepare_packed_sequence_data(pad_seq_to_mult=N)`: each document padded with EOS to ceil(l, N) + 1 tokens, the
+1 because their loader drops each document's last token; newer releases pad to ceil(l - 1, N) + 1, and their
loader reads either, needing only segments of multiples of N): every packprep slot (its real tokens, then padding)
with its padding turned into EOS, plus one EOS, loss 0 on all of them. Their loader (`GPTSFTPackedDataset`,
`pad_seq_to_mult=N`) then trains on segments of exactly the slot lengths: `cu_seqlens` (`cu_seqlens_padded` in
newer releases) = packprep's doc_offsets, and the real lengths it finds at each segment's last non-EOS token
(`cu_seqlens_unpadded`). export.json records `pad_seq_to_mult`.
Cost: one pass building Arrow list arrays from the shard's buffers plus the Parquet encode.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from packprep.exports import WORK, write_json
from packprep.shards import atomic_file

VERSION = 1
CONTAINERS = ("parquet", "npy")
PADDED = True  # a padded build's rows arrive with their padding (packprep.exports.iter_rows)


def start(out: Path, info, container: str = "parquet") -> dict:
    if container not in CONTAINERS:
        raise ValueError(f"unknown nemo container {container!r}; choose one of: {', '.join(CONTAINERS)}")
    return {"container": container}


def eos_padded(rows, eos_id: int):
    """A padded build's rows as their CP preparation lays documents out: padding -> EOS, one more EOS per document,
    loss 0 on every pad. Example (EOS 0): slots [a b p p | c p] (real 2, 1) -> [a b 0 0 0 | c 0 0]."""
    if rows.real_lengths is None:
        return rows
    pad = np.ones(len(rows.tokens), bool)
    pad[rows.real_positions()] = False
    ends = rows.doc_starts + rows.doc_lengths
    tokens = np.insert(np.where(pad, np.int32(eos_id), rows.tokens), ends, np.int32(eos_id))
    mask = np.insert(np.where(pad, np.uint8(0), rows.loss_mask), ends, np.uint8(0))
    return type(rows)(tokens, mask, rows.row_offsets + rows.row_docs, rows.doc_lengths + 1, rows.row_docs)


def target_aligned(rows) -> np.ndarray:
    """loss_mask shifted left by one within each document, 0 at each document's last token (int8).
    Example: documents [3, 2], mask [0 1 1 | 0 1] -> [1 1 0 | 1 0]."""
    shifted = np.zeros(len(rows.loss_mask), dtype=np.int8)
    shifted[:-1] = rows.loss_mask[1:]
    shifted[rows.doc_starts + rows.doc_lengths - 1] = 0
    return shifted


def seq_start_ids(rows) -> np.ndarray:
    """Each document's start inside its row (int32), rows' entries at rows.row_docs."""
    row_of_doc = np.repeat(np.arange(len(rows.row_docs) - 1), np.diff(rows.row_docs))
    return (rows.doc_starts - rows.row_offsets[row_of_doc]).astype(np.int32)


def write_part(index: int, batches, out: Path, state: dict, info) -> dict:
    tables, stats = [], []
    for rows in batches:
        rows = eos_padded(rows, info.eos_id)
        row_offsets = pa.array(rows.row_offsets.astype(np.int32))
        tables.append(pa.table({
            "input_ids": pa.ListArray.from_arrays(row_offsets, pa.array(rows.tokens)),
            "loss_mask": pa.ListArray.from_arrays(row_offsets, pa.array(target_aligned(rows))),
            "seq_start_id": pa.ListArray.from_arrays(pa.array(rows.row_docs.astype(np.int32)),
                                                     pa.array(seq_start_ids(rows))),
        }))
        stats.append(_stats(rows))
    table = pa.concat_tables(tables) if tables else None
    if state["container"] == "parquet":
        name = f"packed-{index:05d}.idx.parquet"
        with atomic_file(out / name, fsync=info.fsync) as f:
            # dictionary encoding only for the 0/1 mask: on token ids it is ~4x slower to write
            pq.write_table(table, f, row_group_size=500, use_dictionary=["loss_mask"])
        files = [name]
    else:  # rows kept as a pickled list in the work folder until finish() joins the parts into one .npy
        with atomic_file(out / WORK / f"rows-{index:05d}.pkl", fsync=info.fsync) as f:
            pickle.dump(table.to_pylist() if table is not None else [], f, protocol=pickle.HIGHEST_PROTOCOL)
        files = []
    return {"files": files, **_merge(stats)}


def finish(out: Path, parts: list[dict], state: dict, info) -> dict:
    files = [f for p in parts for f in p["files"]]
    if state["container"] == "npy":
        rows = []
        for i in range(len(parts)):
            with open(out / WORK / f"rows-{i:05d}.pkl", "rb") as f:
                rows += pickle.load(f)
        array = np.empty(len(rows), dtype=object)
        array[:] = rows
        with atomic_file(out / "packed.npy", fsync=info.fsync) as f:
            np.save(f, array, allow_pickle=True)
        files = ["packed.npy"]
    s = _merge(parts)
    metadata = {
        "dataset_max_seqlen": s["max_seqlen"],
        "max_samples_per_bin": s["max_docs"],
        "packing_factor": round(s["docs"] / max(s["rows"], 1), 2),
        "packing_efficiency": round(s["tokens"] / max(s["rows"], 1) / info.seq_len * 100, 2),
        "pack_size": info.seq_len,
        "min_packed_seqlen": s["min_row"],
    }
    write_json(out / "packing_metadata.json", [metadata], info)
    padded = {"pad_seq_to_mult": info.padding["multiple"]} if info.padding else {}
    return {"files": [*files, "packing_metadata.json"], "container": state["container"], "packing": metadata,
            **padded}


def _stats(rows) -> dict:
    """Their packing statistics on l - 1 tokens per document (the positions each document trains on)."""
    per_row = np.add.reduceat(rows.doc_lengths - 1, rows.row_docs[:-1]) if len(rows.doc_lengths) else np.zeros(0)
    return {"rows": len(rows.row_docs) - 1, "docs": len(rows.doc_lengths),
            "tokens": int((rows.doc_lengths - 1).sum()), "max_seqlen": int(rows.doc_lengths.max(initial=1) - 1),
            "max_docs": int(np.diff(rows.row_docs).max(initial=0)), "min_row": int(per_row.min(initial=1 << 62))}


def _merge(stats: list[dict]) -> dict:
    keys = {"rows": sum, "docs": sum, "tokens": sum, "max_seqlen": max, "max_docs": max, "min_row": min}
    return {k: int(f([s[k] for s in stats])) if stats else 0 for k, f in keys.items()}
