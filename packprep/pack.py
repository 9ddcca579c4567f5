"""The packing engine: turn a document-length array into a plan of fixed-capacity rows (`pack`).

Strategies (`STRATEGIES`), all deterministic for a given seed, numba kernels in `packprep._kernels`:
    ffd     first-fit-decreasing (default). Counting sort O(N + seq_len), a max-tree over rows' free space,
            O(N log rows). 10M documents in ~0.7 s on one core, ~26 bytes/document peak (benchmarks/bench_pack.py).
    bfd     best-fit-decreasing, a tree over free-space values, O(N log seq_len); same rows as TRL's `_pack_bfd`.
    greedy  the Packing Analysis paper's baseline: sort descending, fill the current row, close it at the first
            document that does not fit. O(N + seq_len).
    random  seeded shuffle, concatenate, cut every seq_len tokens (a cut document becomes two pieces). O(N).
    none    one document per row: the padding baseline. O(N).
    b2f     ffd, then best-two-fit repair: a row left with free space swaps one of its smallest documents for two
            unpacked ones that fill it exactly. Within a few rows of the lower bound where ffd is not (real SFT
            mixes at seq_len <= 2048, >= 1M documents: ffd +0.03-0.13%, b2f <= +0.002%). O(N log seq_len), ~0.35 s
            for 10M documents (rows filled one by one with the largest document that fits: FFD's rows, no gather).
Every token of every document lands in exactly one piece, no row holds more than seq_len tokens, no row is empty.
Documents longer than seq_len are rejected: truncating, splitting or dropping them is the build pipeline's policy.
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

    row_offsets: np.ndarray  # int64[rows + 1]
    doc: np.ndarray  # int64[pieces]
    start: np.ndarray  # int64[pieces]; 0 unless a document was cut (strategy "random")
    length: np.ndarray  # int64[pieces]
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
        return int(self.length.sum())

    def row_tokens(self) -> np.ndarray:
        """Tokens in each row, int64[rows]."""
        cumulative = np.concatenate([[0], np.cumsum(self.length)])
        return np.diff(cumulative[self.row_offsets])

    def row(self, r: int) -> slice:
        """The piece indices of row r: `plan.doc[plan.row(r)]`."""
        return slice(int(self.row_offsets[r]), int(self.row_offsets[r + 1]))

    def __repr__(self) -> str:
        return (
            f"Plan(strategy={self.strategy!r}, seq_len={self.seq_len}, docs={self.num_docs}, "
            f"pieces={self.num_pieces}, rows={self.num_rows})"
        )


def pack(lengths, seq_len: int = 4096, strategy: str = "ffd", seed: int = 0) -> Plan:
    """Pack documents of the given token `lengths` (1-D ints, each 1..seq_len) into rows of at most `seq_len`.

    `seed` only matters for strategy "random". Raises ValueError, naming what came in and how to fix it, for
    non-integer / non-positive lengths, lengths > seq_len, seq_len < 1 and unknown strategies.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    seq_len = _check_seq_len(seq_len)
    lengths32 = _check_lengths(lengths, seq_len)
    num_docs = int(lengths32.size)

    if strategy == "none":
        doc = np.arange(num_docs, dtype=np.int64)
        return Plan(np.arange(num_docs + 1, dtype=np.int64), doc, np.zeros(num_docs, np.int64),
                    lengths32.astype(np.int64), seq_len, strategy, num_docs)
    if strategy == "random":
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        doc_order = np.random.default_rng(seed).permutation(num_docs)
        row_offsets, doc, start, length = _kernels.cut_stream(lengths32, doc_order, np.int64(seq_len))
        return Plan(row_offsets, doc, start, length, seq_len, strategy, num_docs)

    if strategy == "b2f":
        order, run_need, run_size = _sort_descending(lengths32, seq_len)
        row_offsets, doc, length = _kernels.b2f_pack(order, run_need, run_size, np.int64(seq_len),
                                                     np.int64(B2F_REPAIR_TRIES))
        del order
        return Plan(row_offsets, doc, np.zeros(num_docs, np.int64), length, seq_len, strategy, num_docs)

    # Sorted strategies. Each temporary is dropped as soon as it is used: the peak is 4 (order) + 4 (row_of_sorted)
    # + 16 (doc, length) bytes/document, then 24 bytes/document for the plan (+ 4 if lengths were not int32).
    order, run_need, run_size = _sort_descending(lengths32, seq_len)
    assign = {"ffd": _kernels.ffd_assign_rows, "bfd": _kernels.bfd_assign_rows,
              "greedy": _kernels.greedy_assign_rows}[strategy]
    row_of_sorted, num_rows = assign(run_need, run_size, np.int32(seq_len))
    row_offsets, doc, length = _kernels.gather_rows(order, row_of_sorted, num_rows, run_need, run_size)
    del order, row_of_sorted
    return Plan(row_offsets, doc, np.zeros(num_docs, np.int64), length, seq_len, strategy, num_docs)


def _sort_descending(lengths32: np.ndarray, seq_len: int):
    """(order, run_need, run_size): indices by length descending, ties by index ascending, and the sorted lengths
    as runs. A counting sort, unless seq_len dwarfs the number of documents."""
    if seq_len > 8 * lengths32.size + 65536:  # O(seq_len) counts would cost more than sorting N values
        order = np.argsort(-lengths32, kind="stable").astype(np.int32)
        sorted_lengths = lengths32[order]
        run_start = np.flatnonzero(np.diff(sorted_lengths, prepend=-1))
        run_size = np.diff(np.append(run_start, sorted_lengths.size)).astype(np.int64)
        return order, sorted_lengths[run_start], run_size
    return _kernels.counting_sort_descending(lengths32, np.int64(seq_len))


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
    too_short = np.flatnonzero(arr <= 0)
    if too_short.size:
        first = int(too_short[0])
        raise ValueError(
            f"{too_short.size} documents have length <= 0 (first: index {first}, length {arr[first]}); "
            "every document needs at least one token, remove the empty ones first"
        )
    too_long = np.flatnonzero(arr > seq_len)
    if too_long.size:
        first = int(too_long[0])
        raise ValueError(
            f"{too_long.size} documents exceed seq_len={seq_len} (first: index {first}, length {arr[first]}); "
            "use --long-docs split|truncate|drop, or a larger seq_len"
        )
    return np.ascontiguousarray(arr, dtype=np.int32)
