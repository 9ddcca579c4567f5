"""Synthetic packprep output folders for the trainer tests (random tokens, random document lengths, first-fit rows,
a packprep.json manifest with what the trainer reads: seq_len, tokenizer, shard sizes and sha256)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from packprep.shards import MANIFEST, make_batch, shard_name, write_hf_metadata, write_shard


def first_fit_rows(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Documents (indices) per row, first-fit in the given order (a test stand-in for packprep.pack)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths.tolist()):
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    return rows


def write_packed(out: str | Path, lengths: np.ndarray, seq_len: int, *, vocab: int = 1000, seed: int = 0,
                 num_shards: int = 2, rows_per_batch: int = 7, prompt_frac: float = 0.3,
                 rows: list[list[int]] | None = None, tokenizer_sha256: str | None = None,
                 token_high: int | None = None) -> dict:
    """Write a shard folder holding the documents of `lengths` (random tokens) packed into rows of <= seq_len.

    Tokens are drawn from [1, token_high) (default: the whole vocabulary; a few ids make a corpus a model can
    learn quickly). Each document gets a random prompt prefix with loss_mask 0 (up to prompt_frac of it). Returns
    the documents' tokens and masks (lists by document index) and the rows, for the tests to compare against.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    docs = [rng.integers(1, token_high or vocab, n).astype(np.int32) for n in lengths.tolist()]
    masks = []
    for n in lengths.tolist():
        m = np.ones(n, dtype=np.uint8)
        m[: int(rng.integers(0, int(n * prompt_frac) + 1))] = 0
        masks.append(m)
    rows = rows if rows is not None else first_fit_rows(lengths, seq_len)
    per_shard = np.array_split(np.arange(len(rows)), num_shards)
    names, infos = [], []
    for s, row_ids in enumerate(per_shard):
        batches = []
        for start in range(0, len(row_ids), rows_per_batch):
            chunk = [rows[r] for r in row_ids[start : start + rows_per_batch]]
            pieces = [d for row in chunk for d in row]
            tokens = np.concatenate([docs[d] for d in pieces])
            mask = np.concatenate([masks[d] for d in pieces])
            row_len = [sum(int(lengths[d]) for d in row) for row in chunk]
            batches.append(make_batch(tokens, np.concatenate([[0], np.cumsum(row_len)]), lengths[pieces],
                                      np.concatenate([[0], np.cumsum([len(r) for r in chunk])]),
                                      np.asarray(pieces), mask))
        name = shard_name(s, num_shards)
        infos.append(write_shard(out / name, batches, fsync=False))
        names.append(name)
    write_hf_metadata(out, names, fingerprint="test" * 4)
    manifest = {"format_version": 1, "seq_len": seq_len, "shards": infos,
                "tokenizer": {"name": "synthetic", "sha256": tokenizer_sha256, "vocab_size": vocab, "eos_id": 0}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return {"docs": docs, "masks": masks, "rows": rows, "lengths": lengths}


def random_lengths(n: int, seq_len: int, seed: int = 0, low: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(low, seq_len // 2, n)


def one_torch_thread():
    """A pytest fixture body: tiny models run ~100x faster on one thread than on threads that contend for shared
    cores (seen: 14 s -> 0.14 s for 8 steps on a loaded 2-core CI box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
