"""Whole-batch token work of the tokenize stage: flat ids, EOS, loss masks, and the tiktoken backend's offsets.

    flat, lens = flatten(ids)                                   # per-document id lists -> one array + lengths
    ids, mask, lengths = finish(flat, lens, mask, eos_id, eos)  # EOS appended unless last (the contract)
    batch = tiktoken_batch(tt, texts, add_special_tokens)       # ids + each token's UTF-8 byte start, per batch

A tokenizer hands back one list of ids per document; everything after that is a few numpy passes over the whole
batch, never a numpy call per document (a dozen calls of ~1 us each per document cost more than tiktoken's encode).

Offsets of the tiktoken backend are byte offsets: a token's start byte is the sum of the byte sizes of the tokens
before it in its document (`TiktokenBackend.token_sizes`). Character offsets (HF's) follow from them through the
byte -> character map, which is monotone, so "the first token at or after character len(prompt)" is "the first token
whose start byte >= len(prompt.encode())", and a token overlaps the characters [a, b) exactly when it overlaps their
bytes. A document whose token sizes do not add up to its UTF-8 length (NFC changed the text, an added token's
lstrip/rstrip took spaces) has no such map: `tiktoken_batch` flags it and the caller asks HF for its offsets.

Cost: ~40 ns per token to copy the ids into numpy, then ~10 numpy passes over the batch's tokens; per document, a
length and a UTF-8 length in Python.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from itertools import chain

import numpy as np


def flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document id lists -> (flat int32 ids, int64 lengths): [[5, 6], [], [7]] -> [5, 6, 7], [2, 0, 1]."""
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(chain.from_iterable(ids), np.int32, int(lens.sum())), lens


def finish(flat: np.ndarray, lens: np.ndarray, mask: np.ndarray | None, eos_id: int,
           eos: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32, mask uint8, lengths int32) of documents back to back. mask: per token (None: all 1). eos: EOS
    appended to each non-empty document whose last token is not EOS; it carries loss."""
    # flat [5, 6, 7, 2], lens [2, 0, 2], eos_id 2 -> ids [5, 6, 2, 7, 2], lengths [3, 0, 2]
    mask = np.ones(len(flat), np.uint8) if mask is None else mask.astype(np.uint8, copy=False)
    if eos and len(flat):
        ends = np.cumsum(lens)
        add = (lens > 0) & (flat[np.maximum(ends - 1, 0)] != eos_id)
        at = ends[add]  # inserted before these positions: after each document's last token
        flat, mask, lens = np.insert(flat, at, eos_id), np.insert(mask, at, 1), lens + add
    return flat.astype(np.int32, copy=False), mask, lens.astype(np.int32)


def drop_empty(flat: np.ndarray, lens: np.ndarray, mask: np.ndarray, texts: list[str]):
    """(flat, lens, mask) with the documents of empty texts emptied (a template's BOS alone is no document)."""
    empty = np.fromiter((not t for t in texts), bool, len(texts))
    if not empty.any():
        return flat, lens, mask
    keep = ~np.repeat(empty, lens)
    return flat[keep], np.where(empty, 0, lens), mask[keep]


def replace_docs(flat: np.ndarray, lens: np.ndarray, mask: np.ndarray, docs: dict[int, tuple]):
    """(flat, lens, mask) with document i's ids and mask replaced by docs[i] = (ids, mask)."""
    cuts = np.cumsum(lens)[:-1]
    ids, masks = np.split(flat, cuts), np.split(mask, cuts)
    for i, (x, m) in docs.items():
        ids[i], masks[i] = np.asarray(x, np.int32), np.asarray(m, np.uint8)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.concatenate(ids), lens, np.concatenate(masks)


def utf8_lengths(texts: list[str]) -> np.ndarray:
    return np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts), np.int64, len(texts))


def mask_from(lens: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per-token loss mask: 1 from token first[i] of document i on. lens [3, 2], first [1, 0] -> [0, 1, 1, 1, 1]."""
    starts = np.cumsum(lens) - lens
    return (np.arange(int(lens.sum())) >= np.repeat(starts + first, lens)).astype(np.uint8)


@dataclass
class Batch:
    """A batch encoded by the tiktoken backend: flat ids and lengths, each token's start byte and byte size in its
    document (template tokens: size 0, start 0 before the text, the text's length after it), which tokens the
    post-processor's template added (pre before the text, suf after it; None: none), and which documents' offsets
    are exact (token sizes add up to the text's UTF-8 length, and NFC did not change it)."""

    flat: np.ndarray  # int32, per token
    lens: np.ndarray  # int64, per document
    start: np.ndarray  # int64, per token
    size: np.ndarray  # int64, per token
    added: np.ndarray | None  # bool, per token
    pre: int
    suf: int
    exact: np.ndarray  # bool, per document

    @property
    def doc(self) -> np.ndarray:
        """The document of each token."""
        return np.repeat(np.arange(len(self.lens)), self.lens)


def tiktoken_batch(tt, texts: list[str], add_special_tokens: bool) -> Batch:
    """Encode `texts` with a `TiktokenBackend` and derive every token's byte offsets (module docstring)."""
    flat, lens = flatten(tt.encode_batch(texts, add_special_tokens=add_special_tokens))
    size = tt.token_sizes[flat]
    pre, suf = (len(tt._template[0]), len(tt._template[1])) if add_special_tokens and tt._template else (0, 0)
    starts = np.cumsum(lens) - lens
    added = None
    if pre or suf:
        pos = np.arange(len(flat)) - np.repeat(starts, lens)
        added = (pos < pre) | (pos >= np.repeat(lens - suf, lens))
        size[added] = 0
    end = np.cumsum(size)
    before = np.concatenate([[0], end])  # bytes of the batch before each token (and after the last)
    doc_bytes = before[starts + lens] - before[starts]
    start = end - size - np.repeat(before[starts], lens)
    exact = doc_bytes == utf8_lengths(texts)
    if tt._nfc:
        exact &= np.fromiter((t.isascii() or unicodedata.is_normalized("NFC", t) for t in texts), bool, len(texts))
    return Batch(flat, lens, start, size, added, pre, suf, exact)


def loss_starts(batch: Batch, prompt_bytes: np.ndarray) -> np.ndarray:
    """Per document, the first token not added by the template whose start byte >= prompt_bytes[i]; where there is
    none, the token after the text's last token (0 when the text has no tokens)."""
    lens, doc = batch.lens, batch.doc
    starts = np.cumsum(lens) - lens
    first = np.where(lens - batch.pre - batch.suf > 0, lens - batch.suf, 0)
    ok = batch.start >= prompt_bytes[doc]
    if batch.added is not None:
        ok &= ~batch.added
    at = np.flatnonzero(ok)
    lead = np.ones(len(at), bool)  # the first qualifying token of each document
    lead[1:] = doc[at[1:]] != doc[at[:-1]]
    at = at[lead]
    first[doc[at]] = at - starts[doc[at]]
    return first


def span_mask(batch: Batch, spans: list[list[tuple[int, int]]]) -> np.ndarray:
    """Per-token mask: 1 on every token that overlaps one of its document's byte spans [a, b)."""
    mask = np.zeros(len(batch.flat), np.uint8)
    ends = np.cumsum(batch.lens)
    for i, doc_spans in enumerate(spans):
        lo, hi = ends[i] - batch.lens[i], ends[i]
        start = batch.start[lo:hi]
        end, m = start + batch.size[lo:hi], mask[lo:hi]
        for a, b in doc_spans:
            m[(start < b) & (end > a)] = 1
    return mask
