"""The layout stage: record lengths -> long-document policy -> pieces -> packing plan -> row order, and its files.

    lay, counts, stats = plan(lengths, config)      # lengths: int32 per record (0 empty, -1 rejected)
    save(folder, lay, task_tokens, counts, stats)   # OUT/.packprep-work/layout/*.npy, then done.json (last)
    lay = load(folder)                              # the arrays, memory-mapped, for the write tasks

A piece is (document, first token, length): a whole document, its first seq_len tokens (truncate) or one of its
seq_len-token slices (split). `lay` holds, per piece in plan order, its document ("doc"), its spool position
("pos", as if the spool were one array) and its length ("len"); per row, "row_offsets" into the pieces; "order", the
rows in output order (a seeded permutation unless --no-shuffle); "task_token_base", the spool position of each
task's first token; with --pad-docs-to-multiple N, "len" is the padded slot's length and "real" its real tokens
(the slot is the piece's tokens, then pad tokens). In a mixture "doc" holds doc ids (source, repeat, record:
`packprep.mixture`). Cost: a few numpy passes over the length array plus `pack` (numba); ~40 bytes per piece on
disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from packprep.config import BuildConfig
from packprep.shards import write_json_atomic
from packprep.spool import save_npy

ARRAYS = ("row_offsets", "order", "doc", "pos", "len", "task_token_base")
_STATS = ("efficiency", "lower_bound", "rows_over_lb", "docs_per_row_mean", "docs_per_row_max", "padding_tokens",
          "padding_tokens_saved", "rows_saved", "steps_reduction")


def plan(lengths: np.ndarray, config: BuildConfig, select=None) -> tuple[dict, dict, dict]:
    """Long-doc policy, packing and row order: the arrays the write tasks gather by, plus counts and stats.
    `select` (a mixture's `packprep.mixture.Selection`): the document copies to pack, each with its pieces; the
    counts of the long-doc policy stay over the input records."""
    from packprep.pack import pack
    from packprep.stats import plan_stats

    seq_len = config.seq_len
    rejected = lengths < 0  # -1: a record set aside by --on-error skip (it keeps its document index, no tokens)
    lengths = np.maximum(lengths, 0)
    doc_start = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])  # spool position of each doc
    empty, long = lengths == 0, lengths > seq_len
    if config.long_docs == "split":
        docs = np.flatnonzero(~empty)
        n_pieces = -(-lengths[docs].astype(np.int64) // seq_len)  # 9000 tokens, seq_len 4096 -> 3 pieces
        piece_doc = np.repeat(docs, n_pieces)
        first = np.concatenate([[0], np.cumsum(n_pieces)[:-1]])
        piece_start = (np.arange(len(piece_doc)) - np.repeat(first, n_pieces)) * seq_len
        piece_len = np.minimum(lengths[piece_doc].astype(np.int64) - piece_start, seq_len)
    else:
        keep = ~empty & ~long if config.long_docs == "drop" else ~empty
        piece_doc = np.flatnonzero(keep)
        piece_start = np.zeros(len(piece_doc), np.int64)
        piece_len = np.minimum(lengths[piece_doc], seq_len)
    piece_id = piece_doc
    if select is not None:  # a mixture: every selected copy of a document brings its pieces, under its own doc id
        piece_doc, piece_start, piece_len, piece_id = select.pieces(piece_doc, piece_start, piece_len)
    n_long = int(long.sum())
    counts = {
        "input_docs": int(len(lengths)),
        "packed": int((~empty & ~long).sum()),
        "truncated": n_long if config.long_docs == "truncate" else 0,
        "split": n_long if config.long_docs == "split" else 0,
        "dropped": {"empty": int((empty & ~rejected).sum()), "too_long": n_long if config.long_docs == "drop" else 0},
        "rejected": int(rejected.sum()),
        "truncated_tokens": int((lengths[long] - seq_len).sum()) if config.long_docs == "truncate" else 0,
    }
    mult = config.pad_docs_to_multiple
    slot_len = -(-piece_len // mult) * mult  # --pad-docs-to-multiple 4: pieces [5, 8, 3] -> slots [8, 8, 4]
    packed = pack(slot_len.astype(np.int32), seq_len, config.strategy, config.seed)
    stats = plan_stats(packed, seq_len)
    order = (np.random.default_rng(config.seed).permutation(packed.num_rows) if config.shuffle
             else np.arange(packed.num_rows))
    lay = {
        "row_offsets": packed.row_offsets,
        "order": order.astype(np.int64),
        "doc": piece_id[packed.doc].astype(np.int64),
        "pos": doc_start[piece_doc[packed.doc]] + piece_start[packed.doc] + packed.start,
        "len": packed.length.astype(np.int32),
    }
    counts.update(pieces=packed.num_pieces, rows=packed.num_rows, tokens=packed.num_tokens)
    if mult > 1:  # the real tokens of each packed slot; `random` cuts slots at multiples of N, so never 0
        lay["real"] = np.clip(piece_len[packed.doc] - packed.start, 0, packed.length).astype(np.int32)
        assert (lay["real"] > 0).all(), "a padded slot without real tokens"
        counts["pad_tokens"] = int(packed.num_tokens - lay["real"].sum(dtype=np.int64))
    return lay, counts, {k: stats[k] for k in _STATS}


def padding(config: BuildConfig, tok) -> dict | None:
    """A padded build's manifest record {"multiple", "pad_id", "pad_token", "from"}: the tokenizer's pad token, else
    its EOS (from "eos_token"; every packprep tokenizer has one). None without --pad-docs-to-multiple."""
    if config.pad_docs_to_multiple == 1:
        return None
    pad = tok.special["pad_token"]
    pad_id = tok.rust.token_to_id(pad) if pad else None
    source = "pad_token" if pad_id is not None else "eos_token"
    if pad_id is None:
        pad, pad_id = tok.special["eos_token"], tok.eos_id
    return {"multiple": config.pad_docs_to_multiple, "pad_id": int(pad_id), "pad_token": pad, "from": source}


def save(folder: Path, lay: dict, task_tokens: np.ndarray, counts: dict, stats: dict) -> None:
    """The plan's arrays, then done.json (counts and stats) last: a folder without it is planned again."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.concatenate([[0], np.cumsum(task_tokens)])
    for name, arr in {**lay, "task_token_base": base}.items():
        save_npy(folder / f"{name}.npy", arr)
    write_json_atomic(folder / "done.json", {"counts": counts, "stats": stats})


def saved(folder: Path) -> tuple[dict, dict] | None:
    """(counts, stats) of a saved plan, or None when there is none."""
    done = folder / "done.json"
    if not done.is_file():
        return None
    summary = json.loads(done.read_text())
    return summary["counts"], summary["stats"]


def load(folder: Path) -> dict[str, np.ndarray]:
    """The plan's arrays, memory-mapped; "real" (each slot's real tokens) only in a padded build's plan."""
    return {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in (*ARRAYS, "real")
            if k in ARRAYS or (folder / f"{k}.npy").exists()}
