"""The packing engine: turn a document-length array into a plan of fixed-capacity rows (`pack`).

Strategies (`STRATEGIES`), all deterministic for a given seed, numba kernels in `packprep._kernels`:
    ffd     first-fit-decreasing (default): rows filled one by one with the largest unpacked document that fits
            (FFD's rows exactly). Counting sort O(N + seq_len), a flag tree over lengths, O(N log seq_len).
    bfd     best-fit-decreasing, a tree over free-space values, O(N log seq_len); same rows as TRL's `_pack_bfd`.
    greedy  the Packing Analysis paper's baseline: sort descending, fill the current row, close it at the first
            document that does not fit. O(N + seq_len).
    random  seeded shuffle, concatenate, cut every seq_len tokens (a cut document becomes two pieces). O(N).
    none    one document per row: the padding baseline. O(N).
    b2f     ffd, then best-two-fit repair: a row left with free space swaps one of its smallest documents for two
            unpacked ones that fill it exactly. Within a few rows of the lower bound where ffd is not (real SFT
            mixes at seq_len <= 2048, >= 1M documents: ffd +0.03-0.13%, b2f <= +0.002%). O(N log seq_len).
Every token of every document lands in exactly one piece, no row holds more than seq_len tokens, no row is empty.
Documents longer than seq_len are rejected: truncating, splitting or dropping them is the build pipeline's policy.

Memory: plans are int32 (row_offsets int64 only past 2^31 pieces, `offsets_dtype`), `start` is a zero-stride
view where no document is cut, and the kernels write the plan in place: with int32 lengths in, the peak of
ffd / b2f / bfd / greedy is lengths + 8 bytes/document + 4 bytes/row (+ O(seq_len)): at most 16 bytes/document,
~12.4 on a real SFT mix at seq_len 4096 (26 documents/row); random and none ~16-17 (benchmarks/bench_billion.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from packprep import _kernels
from packprep.config import STRATEGIES  # declared once, as the Literal type of BuildConfig.strategy

B2F_REPAIR_TRIES = 3  # b2f: how many of a row's smallest documents may be swapped for an exact-fit pair
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, eq=False)
class Plan:
    """Which pieces of which documents go into which row.

    Row r holds pieces `row_offsets[r]:row_offsets[r + 1]`; piece p is tokens
    `start[p] : start[p] + length[p]` of document `doc[p]` (an index into the `lengths` given to `pack`).
    """

    row_offsets: np.ndarray  # int32[rows + 1]; int64 when there are more than 2^31 - 1 pieces (offsets_dtype)
    doc: np.ndarray  # int32[pieces]
    start: np.ndarray  # int32[pieces]; 0 unless a document was cut (strategy "random"), then a read-only view
    length: np.ndarray  # int32[pieces]
    seq_len: int
    strategy: str
    num_docs: int

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets.size - 1)

    @property
    def num_pieces(self) -> int:
        return int(self.doc.size)

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum(dtype=np.int64))

    def row_tokens(self) -> np.ndarray:
        """Tokens in each row, int64[rows] (rows-sized temporaries only: a row holds at most seq_len tokens)."""
        if self.num_rows == 0:
            return np.zeros(0, np.int64)
        return np.add.reduceat(self.length, self.row_offsets[:-1], dtype=np.int32).astype(np.int64)

    def row(self, r: int) -> slice:
        """The piece indices of row r: `plan.doc[plan.row(r)]`."""
        return slice(int(self.row_offsets[r]), int(self.row_offsets[r + 1]))

    def __repr__(self) -> str:
        return (
            f"Plan(strategy={self.strategy!r}, seq_len={self.seq_len}, docs={self.num_docs}, "
            f"pieces={self.num_pieces}, rows={self.num_rows})"
        )


def offsets_dtype(num_pieces: int) -> type:
    """int32 row offsets while every piece index fits, else int64."""
    return np.int32 if num_pieces <= _INT32_MAX else np.int64


def pack(lengths, seq_len: int = 4096, strategy: str = "ffd", seed: int = 0) -> Plan:
    """Pack documents of the given token `lengths` (1-D ints, each 1..seq_len) into rows of at most `seq_len`.

    `seed` only matters for strategy "random". Raises ValueError, naming what came in and how to fix it, for
    non-integer / non-positive lengths, lengths > seq_len, seq_len < 1 and unknown strategies.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    seq_len = _check_seq_len(seq_len)
    if strategy == "random" and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    lengths32 = _check_lengths(lengths, seq_len)
    num_docs = int(lengths32.size)
    no_cuts = np.broadcast_to(np.int32(0), (num_docs,))  # start: no document is cut, a view of one zero

    if strategy == "none":
        return Plan(np.arange(num_docs + 1, dtype=offsets_dtype(num_docs)), np.arange(num_docs, dtype=np.int32),
                    no_cuts, lengths32.copy(), seq_len, strategy, num_docs)
    if strategy == "random":
        return _pack_random(lengths32, seq_len, seed)
    if num_docs == 0:
        empty = np.zeros(0, np.int32)
        return Plan(np.zeros(1, offsets_dtype(0)), empty, no_cuts, empty, seq_len, strategy, 0)

    run_need, run_size = _length_runs(lengths32, seq_len)
    tokens = int(np.dot(run_need.astype(np.int64), run_size))
    # Any-fit and next-fit leave at most one row half empty or less: rows <= 2 * tokens / seq_len + 1.
    max_rows = min(num_docs, 2 * tokens // seq_len + 1)
    row_offsets = np.zeros(max_rows + 1, offsets_dtype(num_docs))  # pages past the real rows are never touched
    if strategy == "greedy":
        num_rows = _kernels.greedy_rows(run_need, run_size, np.int64(seq_len), row_offsets)
        doc = np.empty(num_docs, np.int32)
        _kernels.sorted_order(lengths32, run_need, run_size, doc)
        length = np.repeat(run_need, run_size)
    else:
        slots = np.empty(num_docs, np.int32)  # the plan slot of each sorted document
        if strategy == "bfd":
            num_rows = _kernels.bfd_assign_rows(run_need, run_size, np.int64(seq_len), slots,
                                                np.empty(max_rows, np.int32))
            _kernels.rows_to_slots(slots, row_offsets[: num_rows + 1])
        else:
            tries = B2F_REPAIR_TRIES if strategy == "b2f" else 0
            num_rows = _kernels.fill_rows(run_need, run_size, np.int64(seq_len), np.int64(tries), slots,
                                          row_offsets)
        doc = np.empty(num_docs, np.int32)
        _kernels.place_docs(lengths32, run_need, run_size, slots, doc)
        _kernels.gather_lengths(lengths32, doc, slots)
        length = slots
    row_offsets.resize(num_rows + 1, refcheck=False)  # in place: no copy
    return Plan(row_offsets, doc, no_cuts, length, seq_len, strategy, num_docs)


def _pack_random(lengths32: np.ndarray, seq_len: int, seed) -> Plan:
    """Shuffle (the permutation numpy's default_rng(seed).permutation gives, as int32), concatenate, cut."""
    num_docs = int(lengths32.size)
    doc_order = np.arange(num_docs, dtype=np.int32)
    np.random.default_rng(seed).shuffle(doc_order)
    num_pieces = int(_kernels.count_stream_pieces(lengths32, doc_order, np.int64(seq_len)))
    num_rows = -(-int(lengths32.sum(dtype=np.int64)) // seq_len)
    doc = np.empty(num_pieces, np.int32)
    doc[num_pieces - num_docs :] = doc_order  # the kernel reads the order from doc's tail while it fills the front
    del doc_order
    start, length = np.empty(num_pieces, np.int32), np.empty(num_pieces, np.int32)
    row_offsets = np.empty(num_rows + 1, offsets_dtype(num_pieces))
    _kernels.cut_stream(lengths32, np.int64(num_docs), np.int64(seq_len), doc, start, length, row_offsets)
    return Plan(row_offsets, doc, start, length, seq_len, "random", num_docs)


def _length_runs(lengths32: np.ndarray, seq_len: int):
    """(run_need, run_size): the lengths sorted descending, as runs. A counting sort, unless seq_len dwarfs the
    number of documents (O(seq_len) counts would cost more than sorting N values)."""
    if seq_len > 8 * lengths32.size + 65536:
        values, counts = np.unique(lengths32, return_counts=True)
        return values[::-1].astype(np.int32), counts[::-1].astype(np.int64)
    return _kernels.length_runs(lengths32, np.int64(seq_len))


def _check_seq_len(seq_len) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)):
        raise ValueError(f"seq_len must be an integer, got {seq_len!r}")
    if not 1 <= seq_len <= _INT32_MAX:
        raise ValueError(f"seq_len must be between 1 and {_INT32_MAX}, got {seq_len}")
    return int(seq_len)


def _check_lengths(lengths, seq_len: int) -> np.ndarray:
    """The lengths as a contiguous int32 array, or a ValueError that says what is wrong and how to fix it."""
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a 1-D array of token counts, got an array of shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int32)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        hint = " (use lengths.astype(np.int64) if they are whole numbers)" if arr.dtype.kind == "f" else ""
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}{hint}")
    if arr.size > _INT32_MAX:
        raise ValueError(f"at most {_INT32_MAX} documents can be packed at once, got {arr.size}")
    if arr.min() <= 0:  # min / max first: no temporary per document unless something is wrong
        too_short = np.flatnonzero(arr <= 0)
        first = int(too_short[0])
        raise ValueError(
            f"{too_short.size} documents have length <= 0 (first: index {first}, length {arr[first]}); "
            "every document needs at least one token, remove the empty ones first"
        )
    if arr.max() > seq_len:
        too_long = np.flatnonzero(arr > seq_len)
        first = int(too_long[0])
        raise ValueError(
            f"{too_long.size} documents exceed seq_len={seq_len} (first: index {first}, length {arr[first]}); "
            "use --long-docs split|truncate|drop, or a larger seq_len"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)
