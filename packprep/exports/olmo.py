"""OLMo-core numpy memmaps, the layout of open-instruct's `convert_sft_data_for_olmocore.py`, one part per shard:

    token_ids_part_0000.npy     token ids, headerless (np.memmap), uint16 when every id fits (vocab <= 65,536)
                                else uint32
    labels_mask_part_0000.npy   bool, one per token: True where the token carries loss (packprep's loss_mask)
    token_ids_part_0000.csv.gz  the document boundaries, one `start,end` line per document

OLMo-core's `NumpyPackedFSLDataset` (and `iter_document_indices`) read the `.csv.gz` boundaries instead of searching
the tokens for EOS when `use_array_if_local=False` (or `OLMO_DATA_PREP_USE_ARRAY_IF_LOCAL=false`), so a text that
contains the EOS token is not split. Documents are packprep's pieces in shard row order; OLMo-core packs them into
its own instances (OBFD). Cost: the ids (uint32) and mask are file ranges of the shards, copied by the kernel
(`exports.append`; uint16 ids are cast into a reused buffer first), plus the boundaries' text (about 10 bytes per
document, stored gzip).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from packprep._kernels import boundaries_csv
from packprep.exports import append, cast_ids
from packprep.shards import atomic_file

VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def names(index: int) -> tuple[str, str, str]:
    return (f"token_ids_part_{index:04d}.npy", f"labels_mask_part_{index:04d}.npy",
            f"token_ids_part_{index:04d}.csv.gz")


def start(out: Path, info) -> dict:
    return {"dtype": str(token_dtype(info.vocab_size))}


def write_part(index: int, batches, out: Path, state: dict, info) -> dict:
    ids_name, mask_name, csv_name = names(index)
    lengths, tokens, scratch = [], 0, []
    with atomic_file(out / ids_name, fsync=info.fsync) as ids, atomic_file(out / mask_name, fsync=info.fsync) as mask:
        for rows in batches:
            append(ids, cast_ids(rows.tokens, state["dtype"], scratch), rows.file)
            append(mask, rows.loss_mask, rows.file)  # 0/1 bytes are numpy's bool layout
            lengths.append(rows.doc_lengths)
            tokens += len(rows.tokens)
    lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
    text = np.empty(42 * len(lengths), np.uint8)
    text = text[: boundaries_csv(lengths, text)]
    with atomic_file(out / csv_name, fsync=info.fsync) as f:
        # level 0 (stored): a valid gzip member at memory-copy speed; level 1 would cost more than the tokens' copy
        f.write(gzip.compress(memoryview(text), compresslevel=0, mtime=0))
    return {"files": [ids_name, mask_name, csv_name], "documents": len(lengths), "tokens": tokens}


def finish(out: Path, parts: list[dict], state: dict, info) -> dict:
    return {"files": [f for p in parts for f in p["files"]], "token_dtype": state["dtype"],
            "eos_token_id": info.eos_id, "vocab_size": info.vocab_size}
