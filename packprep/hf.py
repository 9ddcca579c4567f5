"""A data collator that feeds packprep's packed rows to `transformers.Trainer` (or any loop over HF models).

Owns the mapping from shard rows (input_ids, doc_offsets, and labels or loss_mask: DESIGN.md's shard format) to
one flat batch that keeps documents apart:
    rows [[a a a b b], [c c c c]] with doc_offsets [0 3 5], [0 4]
    -> input_ids [[a a a b b c c c c]], position_ids [[0 1 2 0 1 0 1 2 3]],
       labels [[-100 a a -100 b -100 c c c]] (and -100 where loss_mask is 0),
       cu_seq_lens_q = cu_seq_lens_k = [0 3 5 9], max_length_q = max_length_k = 4, use_cache False.
transformers' flash-attention paths read cu_seq_lens/max_length; its sdpa and eager paths (CPU included) build a
per-document causal mask from position_ids that restart at 0, but only without attention_mask and without a KV
cache: a model whose config says use_cache=True builds one even in training, so the batch says use_cache=False.

Not `DataCollatorWithFlattening`: it treats each packed row as one sequence (position_ids 0..len-1 over the whole
row), so attention and position ids cross the documents packed in it.

With `transformers.Trainer`, set `TrainingArguments(remove_unused_columns=False)`: otherwise the Trainer drops
doc_offsets and loss_mask (not arguments of the model's forward) before the collator sees them.

A --pad-docs-to-multiple build (shard format 1.2) needs nothing else: its doc_offsets are the padded slots, so
position ids and cu_seq_lens restart per slot, and the pads (labels -100) sit after each document's real tokens,
where causal attention keeps them from changing any real token's logits.

Cost: one concatenation per batch on the host; no padding, so no compute is spent on pad tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100


def _array(row: Mapping, key: str, dtype) -> np.ndarray | None:
    value = row.get(key)
    if value is None:
        return None
    if hasattr(value, "numpy"):  # a torch tensor
        value = value.numpy()
    return np.asarray(value, dtype=dtype)


def row_labels(input_ids: np.ndarray, doc_offsets: np.ndarray, loss_mask: np.ndarray | None = None,
               labels: np.ndarray | None = None) -> np.ndarray:
    """HF's unshifted labels for one row: `labels` if given, else the token where loss_mask is 1 (every token when
    there is no mask) and -100 elsewhere; -100 at every document's first token either way (no prediction crosses
    a document boundary). Example: tokens [5 6 7 8], offsets [0 2 4], mask [1 1 0 1] -> [-100 6 -100 8]."""
    if labels is None:
        labels = input_ids.astype(np.int64) if loss_mask is None else np.where(loss_mask != 0, input_ids, IGNORE_INDEX)
    out = np.array(labels, dtype=np.int64)
    out[doc_offsets[:-1][doc_offsets[:-1] < len(out)]] = IGNORE_INDEX
    return out


def flat_batch(rows: Sequence[Mapping], return_tensors: str = "pt") -> dict:
    """Packed rows -> one flat batch: input_ids, position_ids, labels [1, T] int64, cu_seq_lens_q/k int32 [docs+1],
    max_length_q/k int, use_cache False. Rows need input_ids and doc_offsets; labels are taken from a labels column
    when the rows have one, else derived from loss_mask (see `row_labels`)."""
    if not rows:
        raise ValueError("packprep.hf: empty batch")
    ids, labels, offsets = [], [], [np.zeros(1, dtype=np.int64)]
    total = 0
    for row in rows:
        tokens = _array(row, "input_ids", np.int64)
        doc_offsets = _array(row, "doc_offsets", np.int64)
        if tokens is None or doc_offsets is None:
            raise ValueError(f"packprep.hf: a row without input_ids/doc_offsets (it has {sorted(row)}); with "
                             "transformers.Trainer set TrainingArguments(remove_unused_columns=False)")
        if len(doc_offsets) < 2 or doc_offsets[0] != 0 or doc_offsets[-1] != len(tokens) or np.any(
                np.diff(doc_offsets) <= 0):
            raise ValueError(f"packprep.hf: doc_offsets {doc_offsets[:8].tolist()}... do not cut the row's "
                             f"{len(tokens)} tokens into documents ([0, ..., {len(tokens)}], increasing)")
        ids.append(tokens)
        labels.append(row_labels(tokens, doc_offsets, _array(row, "loss_mask", np.uint8),
                                 _array(row, "labels", np.int64)))
        offsets.append(doc_offsets[1:] + total)
        total += len(tokens)
    input_ids = np.concatenate(ids)
    cu = np.concatenate(offsets)
    lengths = np.diff(cu)
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)  # [0 1 2 0 1 0 1 2 3]
    batch = {"input_ids": input_ids[None], "position_ids": position_ids[None],
             "labels": np.concatenate(labels)[None], "cu_seq_lens_q": cu.astype(np.int32),
             "cu_seq_lens_k": cu.astype(np.int32), "max_length_q": int(lengths.max()),
             "max_length_k": int(lengths.max()), "use_cache": False}
    if return_tensors == "np":
        return batch
    if return_tensors != "pt":
        raise ValueError(f"packprep.hf: return_tensors must be 'pt' or 'np', not {return_tensors!r}")
    try:
        import torch
    except ImportError as e:
        raise ImportError('packprep.hf needs torch: pip install "packprep[train]"') from e
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class PackedCollator:
    """`transformers.Trainer(..., data_collator=PackedCollator())`: packed rows -> one flat varlen batch.

    `flash_attn_kwargs=False` leaves cu_seq_lens/max_length out (for models whose forward rejects unknown kwargs);
    sdpa and eager attention separate the documents from position_ids alone.
    """

    def __init__(self, flash_attn_kwargs: bool = True, return_tensors: str = "pt"):
        self.flash_attn_kwargs = flash_attn_kwargs
        self.return_tensors = return_tensors

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        batch = flat_batch(rows, self.return_tensors)
        if not self.flash_attn_kwargs:
            for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
                del batch[key]
        return batch
