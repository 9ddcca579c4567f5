"""LLaMA-Factory: the rows as packed, as the dataset its `tokenized_path` loads (`datasets.load_from_disk`, used as
is: no re-tokenizing, no re-packing), with the columns its `neat_packing` processor (`PackedSupervisedDatasetProcessor`)
writes, every row padded to the build's seq_len as its processor pads to cutoff_len:

    input_ids       list<int32>  the row's tokens, then padding (the EOS id: padding is masked everywhere)
    attention_mask  list<int32>  the index of each token's document in the row (1, 2, ..., k); 0 on padding
    position_ids    list<int32>  the position inside the document, restarting at 0; 0 on padding
    labels          list<int32>  Hugging Face's unshifted labels (packprep's `labels`): -100 where there is no loss,
                                 at every document's first token and on padding

With `neat_packing: true`, its `SFTDataCollatorWith4DAttentionMask` turns attention_mask into a block-diagonal causal
mask (eager / sdpa), or with flash_attention_2 drops it and transformers finds the documents where position_ids
restart at 0. Rows have one length because that collator pads input_ids and labels but not position_ids.
Files: `data-00000.arrow` (Arrow IPC stream, one per source shard), `dataset_info.json`, `state.json`. Cost: a few
numpy scatters per record batch; 16 bytes written per position of seq_len.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from packprep.exports import IGNORE_INDEX, write_json
from packprep.shards import atomic_file

VERSION = 1
COLUMNS = ("input_ids", "attention_mask", "position_ids", "labels")
SCHEMA = pa.schema([pa.field(c, pa.list_(pa.int32())) for c in COLUMNS])


def start(out: Path, info) -> dict:
    return {"pad_id": int(info.eos_id or 0)}


def padded_columns(rows, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The four columns of one record batch as [rows, seq_len] int32 arrays."""
    # rows [a a a b b] [c c c c], seq_len 6 -> attention_mask [1 1 1 2 2 0] [1 1 1 1 0 0]
    n, t = len(rows.row_offsets) - 1, len(rows.tokens)
    row_len = np.diff(rows.row_offsets)
    at = np.repeat(np.arange(n, dtype=np.int64) * seq_len - rows.row_offsets[:-1], row_len) + np.arange(t)
    docs_in_row = np.diff(rows.row_docs)
    doc_index = np.arange(len(rows.doc_lengths)) - np.repeat(rows.row_docs[:-1], docs_in_row) + 1
    columns = {"input_ids": np.full(n * seq_len, pad_id, np.int32), "attention_mask": np.zeros(n * seq_len, np.int32),
               "position_ids": np.zeros(n * seq_len, np.int32), "labels": np.full(n * seq_len, IGNORE_INDEX, np.int32)}
    columns["input_ids"][at] = rows.tokens
    columns["attention_mask"][at] = np.repeat(doc_index, rows.doc_lengths)
    columns["position_ids"][at] = np.arange(t) - np.repeat(rows.doc_starts, rows.doc_lengths)
    columns["labels"][at] = rows.labels()
    return columns


def write_part(index: int, batches, out: Path, state: dict, info) -> dict:
    name, rows_written = f"data-{index:05d}.arrow", 0
    with atomic_file(out / name, fsync=info.fsync) as f, pa.ipc.new_stream(f, SCHEMA) as writer:
        for rows in batches:
            n = len(rows.row_offsets) - 1
            if int(np.diff(rows.row_offsets).max(initial=0)) > info.seq_len:
                raise ValueError(f"a row of {name} is longer than the build's seq_len={info.seq_len}")
            offsets = pa.array(np.arange(n + 1, dtype=np.int32) * info.seq_len)
            cols = padded_columns(rows, info.seq_len, state["pad_id"])
            writer.write_batch(pa.RecordBatch.from_arrays(
                [pa.ListArray.from_arrays(offsets, pa.array(cols[c])) for c in COLUMNS], schema=SCHEMA))
            rows_written += n
    return {"file": name, "rows": rows_written}


def finish(out: Path, parts: list[dict], state: dict, info) -> dict:
    files = [p["file"] for p in parts]
    feature = {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}  # datasets >= 4's spelling
    write_json(out / "dataset_info.json", {"citation": "", "description": "packprep export for LLaMA-Factory",
                                           "features": {c: feature for c in COLUMNS}, "homepage": "", "license": ""},
               info)
    write_json(out / "state.json", {"_data_files": [{"filename": f} for f in files],
                                    "_fingerprint": info.fingerprint[:16], "_format_columns": None,
                                    "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                                    "_split": None}, info)
    return {"files": [*files, "dataset_info.json", "state.json"], "pad_id": state["pad_id"]}
