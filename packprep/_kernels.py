"""Numba kernels of the packing engine: arrays in, arrays out, no validation (that is `packprep.pack`'s job).

ffd, bfd and greedy are split the same way, so the peak memory stays small and each step is easy to check
(b2f fills rows one by one in `b2f_pack`; random cuts a shuffled stream in `cut_stream`):
    order, run_need, run_size = counting_sort_descending(lengths, seq_len)   int32[N], O(N + seq_len)
    row_of_sorted, rows = <strategy>_assign_rows(run_need, run_size, seq_len) int32[N], the row of order[k]
    row_offsets, doc, length = gather_rows(order, row_of_sorted, ...)         int64[rows + 1], int64[N] x2
The sorted lengths travel as runs (length, count), so no pass looks a length up in document order.
Rows are numbered in the order they are opened; inside a row, pieces keep the order they were placed in.
`tests/reference.py` holds the same algorithms in a few lines of plain Python with the same tie-breaking.
Every kernel also runs as plain Python under NUMBA_DISABLE_JIT=1 (slowly; the tests do this in CI).
"""

import numba
import numpy as np

# ---------------------------------------------------------------------------------------------------- sorting


@numba.njit(cache=True)
def counting_sort_descending(lengths, seq_len):
    """Document indices by length descending, ties by index ascending (stable); lengths in 1..seq_len.

    Also returns the sorted lengths as runs, so later passes never look lengths up in document order (a cache
    miss per document): lengths [3, 5, 3, 1] -> order [1, 0, 2, 3], run_need [5, 3, 1], run_size [1, 2, 1].
    O(N + seq_len) time; int32[N] + O(seq_len) memory.
    """
    count_of_length = np.zeros(seq_len + 1, np.int64)
    for i in range(lengths.size):
        count_of_length[lengths[i]] += 1
    next_slot = np.empty(seq_len + 1, np.int64)  # first output slot of each length, longest first
    slots_taken = 0
    num_runs = 0
    for length in range(seq_len, 0, -1):
        next_slot[length] = slots_taken
        slots_taken += count_of_length[length]
        num_runs += count_of_length[length] > 0
    run_need = np.empty(num_runs, np.int32)
    run_size = np.empty(num_runs, np.int64)
    run = 0
    for length in range(seq_len, 0, -1):
        if count_of_length[length] > 0:
            run_need[run] = length
            run_size[run] = count_of_length[length]
            run += 1
    order = np.empty(lengths.size, np.int32)
    for i in range(lengths.size):
        length = lengths[i]
        order[next_slot[length]] = i
        next_slot[length] += 1
    return order, run_need, run_size


# ---------------------------------------------------------------------------------------------------- ffd


@numba.njit(cache=True)
def _grow_max_tree(max_tree, num_leaves):
    """The same max-tree with twice the leaves; the new leaves are 0 (rows not opened yet)."""
    grown = np.zeros(4 * num_leaves, max_tree.dtype)
    grown[2 * num_leaves : 3 * num_leaves] = max_tree[num_leaves : 2 * num_leaves]
    for node in range(2 * num_leaves - 1, 0, -1):
        grown[node] = max(grown[2 * node], grown[2 * node + 1])
    return grown


@numba.njit(cache=True)
def _leftmost_at_least(max_tree, num_leaves, node, need):
    """Descend from `node` (whose max is >= need) to its leftmost leaf >= need; branch-free per level."""
    while node < num_leaves:
        node = 2 * node
        node += max_tree[node] < need
    return node


@numba.njit(cache=True)
def ffd_assign_rows(run_need, run_size, seq_len):
    """First-fit-decreasing: each document (longest first) goes into the lowest-numbered row it fits in.

    A max-tree over the rows' free space finds that row in O(log rows): leaf `num_leaves + r` holds row r's free
    tokens (0 for rows not opened yet), every inner node the max of its two children, so "leftmost leaf >= need"
    is one walk from the root. The tree doubles when the rows fill it: memory O(rows), not O(documents).
    Documents of equal length come in runs; within a run the first fit never moves left (rows only lose space),
    so the search starts at the previous document's row and climbs only as far as it must: mostly O(1).
    Returns (row_of_sorted int32[N], num_rows).
    """
    row_of_sorted = np.empty(run_size.sum(), np.int32)
    num_leaves = 1024
    free_tree = np.zeros(2 * num_leaves, np.int32)
    num_rows = 0
    k = 0
    for run in range(run_need.size):
        need = run_need[run]
        leaf = 1  # no row of this run yet: search from the root
        for _ in range(run_size[run]):
            if free_tree[1] < need:  # no open row fits
                leaf = -1
            elif leaf == 1:
                leaf = _leftmost_at_least(free_tree, num_leaves, 1, need)
            elif free_tree[leaf] < need:  # the run's previous row is full now: climb right of it, walk down
                while leaf % 2 == 1 or free_tree[leaf + 1] < need:
                    leaf //= 2  # the root fits, so a right sibling that fits exists on the way up
                leaf = _leftmost_at_least(free_tree, num_leaves, leaf + 1, need)
            if leaf < 0:  # open a new row
                if num_rows == num_leaves:
                    free_tree = _grow_max_tree(free_tree, num_leaves)
                    num_leaves *= 2
                leaf = num_leaves + num_rows
                free_tree[leaf] = seq_len
                num_rows += 1
            free_tree[leaf] -= need
            node = leaf // 2
            while node >= 1:  # restore the max up the path; stop as soon as a node keeps its value
                largest = max(free_tree[2 * node], free_tree[2 * node + 1])
                if free_tree[node] == largest:
                    break
                free_tree[node] = largest
                node //= 2
            row_of_sorted[k] = leaf - num_leaves
            k += 1
    return row_of_sorted, num_rows


# ---------------------------------------------------------------------------------------------------- bfd


@numba.njit(cache=True)
def _first_flag_at_or_after(flag_tree, num_leaves, lowest):
    """Smallest value v >= lowest whose leaf flag is set, or -1. The tree's inner nodes are OR of children."""
    node = num_leaves + lowest
    if flag_tree[node]:
        return lowest
    while node > 1:
        if node % 2 == 0 and flag_tree[node + 1]:  # the right sibling's range lies above: the answer is there
            node += 1
            while node < num_leaves:
                node = 2 * node
                if not flag_tree[node]:
                    node += 1
            return node - num_leaves
        node //= 2
    return -1


@numba.njit(cache=True)
def _set_flag(flag_tree, num_leaves, value):
    node = num_leaves + value
    while node >= 1 and not flag_tree[node]:
        flag_tree[node] = 1
        node //= 2


@numba.njit(cache=True)
def _clear_flag(flag_tree, num_leaves, value):
    node = num_leaves + value
    flag_tree[node] = 0
    node //= 2
    while node >= 1:
        either = flag_tree[2 * node] | flag_tree[2 * node + 1]
        if flag_tree[node] == either:
            break
        flag_tree[node] = either
        node //= 2


@numba.njit(cache=True)
def bfd_assign_rows(run_need, run_size, seq_len):
    """Best-fit-decreasing: each document (longest first) goes into the row with the least free space that fits.

    Rows are kept in buckets by free space (1..seq_len-1; full rows leave the buckets). A flag tree over the
    free-space values finds the smallest non-empty bucket >= need in O(log seq_len). Tie-break: a bucket is a
    FIFO queue, so among rows with equal free space the one that reached that free space first is used (what TRL's
    `_pack_bfd` does with its deque, so the rows match TRL's). Returns (row_of_sorted int32[N], num_rows).
    """
    row_of_sorted = np.empty(run_size.sum(), np.int32)
    num_leaves = 1
    while num_leaves < seq_len + 1:
        num_leaves *= 2
    flag_tree = np.zeros(2 * num_leaves, np.uint8)
    bucket_head = np.full(seq_len + 1, -1, np.int32)  # oldest row with this free space
    bucket_tail = np.full(seq_len + 1, -1, np.int32)  # newest row with this free space
    next_in_bucket = np.empty(1024, np.int32)  # per row: the next-newer row of its bucket, -1 at the tail
    num_rows = 0
    k = 0
    for run in range(run_need.size):
        need = run_need[run]
        for _ in range(run_size[run]):
            free = _first_flag_at_or_after(flag_tree, num_leaves, need)
            if free < 0:  # no open row fits: open a new one
                row = num_rows
                num_rows += 1
                if row == next_in_bucket.size:
                    grown = np.empty(2 * next_in_bucket.size, np.int32)
                    grown[: next_in_bucket.size] = next_in_bucket
                    next_in_bucket = grown
                free = seq_len
            else:  # take the oldest row of the bucket
                row = bucket_head[free]
                bucket_head[free] = next_in_bucket[row]
                if bucket_head[free] < 0:
                    bucket_tail[free] = -1
                    _clear_flag(flag_tree, num_leaves, free)
            free -= need
            if free > 0:  # append the row to its new bucket
                next_in_bucket[row] = -1
                if bucket_tail[free] < 0:
                    bucket_head[free] = row
                    _set_flag(flag_tree, num_leaves, free)
                else:
                    next_in_bucket[bucket_tail[free]] = row
                bucket_tail[free] = row
            row_of_sorted[k] = row
            k += 1
    return row_of_sorted, num_rows


# ---------------------------------------------------------------------------------------------------- greedy


@numba.njit(cache=True)
def greedy_assign_rows(run_need, run_size, seq_len):
    """The Packing Analysis paper's greedy packing: fill the current row in sorted order, close it at the first
    document that does not fit (never look back). Returns (row_of_sorted int32[N], num_rows)."""
    row_of_sorted = np.empty(run_size.sum(), np.int32)
    row = -1
    used = seq_len  # so the first document opens row 0
    k = 0
    for run in range(run_need.size):
        need = run_need[run]
        for _ in range(run_size[run]):
            if used + need > seq_len:
                row += 1
                used = 0
            used += need
            row_of_sorted[k] = row
            k += 1
    return row_of_sorted, row + 1


# ---------------------------------------------------------------------------------------------------- b2f


@numba.njit(cache=True)
def _last_flag_at_or_before(flag_tree, num_leaves, highest):
    """Largest value v <= highest whose leaf flag is set, or -1 (mirror of _first_flag_at_or_after)."""
    node = num_leaves + highest
    if flag_tree[node]:
        return highest
    while node > 1:
        if node % 2 == 1 and flag_tree[node - 1]:  # the left sibling's range lies below: the answer is there
            node -= 1
            while node < num_leaves:
                node = 2 * node + 1
                if not flag_tree[node]:
                    node -= 1
            return node - num_leaves
        node //= 2
    return -1


@numba.njit(cache=True)
def _balanced_pair(flag_tree, num_leaves, pool_left, target):
    """The smaller length of the most balanced pair of pooled documents summing to `target`, or -1.

    Walks the pooled lengths down from target // 2 (flag tree), so the cost is the number of distinct pooled
    lengths in [target - longest pooled, target // 2], not target.
    """
    longest = _last_flag_at_or_before(flag_tree, num_leaves, num_leaves - 1)
    small = _last_flag_at_or_before(flag_tree, num_leaves, target // 2)
    while small > 0 and target - small <= longest:
        large = target - small
        if pool_left[large] > (1 if small == large else 0):
            return small
        small = _last_flag_at_or_before(flag_tree, num_leaves, small - 1)
    return -1


@numba.njit(cache=True)
def b2f_pack(order, run_need, run_size, seq_len, repair_tries):
    """First-fit-decreasing filled row by row, then best-two-fit repair (Friesen & Langston's B2F).

    Filling each row with the largest unpacked document that fits, until none fits, gives exactly FFD's rows. When
    a row keeps free space, its last `repair_tries` documents (smallest first) are tried in turn: put the document
    back and take the most balanced pair of unpacked documents that fills the row exactly (the larger takes the
    document's place, the smaller goes last). Exact fits cost one document each, which FFD leaves to later rows.
    Unpacked documents sit in per-length pools (slices of `order`, lowest index first; a document put back is the
    next one taken); a flag tree over lengths finds the largest that fits in O(log seq_len).
    Returns (row_offsets, doc, length), int64.
    """
    num_docs = order.size
    pool_start = np.zeros(seq_len + 1, np.int64)  # pool of length L: order[pool_start[L] + taken[L] : ...]
    pool_left = np.zeros(seq_len + 1, np.int64)
    taken = np.zeros(seq_len + 1, np.int64)
    num_leaves = 1
    while num_leaves < seq_len + 1:
        num_leaves *= 2
    flag_tree = np.zeros(2 * num_leaves, np.uint8)  # flag L: pool L is not empty
    slot = 0
    for run in range(run_need.size):
        pool_start[run_need[run]] = slot
        pool_left[run_need[run]] = run_size[run]
        slot += run_size[run]
        _set_flag(flag_tree, num_leaves, run_need[run])
    doc = np.empty(num_docs, np.int64)
    piece_length = np.empty(num_docs, np.int64)
    row_offsets = np.zeros(1024, np.int64)
    num_rows = 0
    written = 0
    while written < num_docs:
        row_start = written
        free = seq_len
        while free > 0:  # FFD: the largest document that still fits
            length = _last_flag_at_or_before(flag_tree, num_leaves, free)
            if length <= 0:
                break
            doc[written] = order[pool_start[length] + taken[length]]
            piece_length[written] = length
            written += 1
            taken[length] += 1
            pool_left[length] -= 1
            if pool_left[length] == 0:
                _clear_flag(flag_tree, num_leaves, length)
            free -= length
        for j in range(written - 1, max(row_start, written - repair_tries) - 1, -1):
            if free == 0 or written == num_docs:
                break
            put_back = piece_length[j]  # identical lengths fail identically, so this is the pool's last-taken doc
            pool_left[put_back] += 1  # tentatively back in its pool
            if pool_left[put_back] == 1:
                _set_flag(flag_tree, num_leaves, put_back)
            small = _balanced_pair(flag_tree, num_leaves, pool_left, put_back + free)
            if small < 0:  # no exact pair: undo
                pool_left[put_back] -= 1
                if pool_left[put_back] == 0:
                    _clear_flag(flag_tree, num_leaves, put_back)
                continue
            taken[put_back] -= 1
            for slot_index, length in ((j, put_back + free - small), (written, small)):
                doc[slot_index] = order[pool_start[length] + taken[length]]
                piece_length[slot_index] = length
                taken[length] += 1
                pool_left[length] -= 1
                if pool_left[length] == 0:
                    _clear_flag(flag_tree, num_leaves, length)
            written += 1
            free = 0
        num_rows += 1
        if num_rows == row_offsets.size:
            grown = np.zeros(2 * row_offsets.size, np.int64)
            grown[: row_offsets.size] = row_offsets
            row_offsets = grown
        row_offsets[num_rows] = written
    return row_offsets[: num_rows + 1].copy(), doc, piece_length


# ---------------------------------------------------------------------------------------------------- output


@numba.njit(cache=True)
def gather_rows(order, row_of_sorted, num_rows, run_need, run_size):
    """Group documents by row: (row_offsets int64[rows + 1], doc int64[N], length int64[N]), in placement order.

    order [1, 0, 2], row_of_sorted [0, 1, 0] -> row_offsets [0, 2, 3], doc [1, 2, 0].
    """
    row_offsets = np.zeros(num_rows + 1, np.int64)
    for k in range(row_of_sorted.size):
        row_offsets[row_of_sorted[k] + 1] += 1
    for row in range(num_rows):
        row_offsets[row + 1] += row_offsets[row]
    next_slot = row_offsets[:-1].copy()
    doc = np.empty(order.size, np.int64)
    piece_length = np.empty(order.size, np.int64)
    k = 0
    for run in range(run_need.size):
        for _ in range(run_size[run]):
            slot = next_slot[row_of_sorted[k]]
            doc[slot] = order[k]
            piece_length[slot] = run_need[run]
            next_slot[row_of_sorted[k]] = slot + 1
            k += 1
    return row_offsets, doc, piece_length


@numba.njit(cache=True, nogil=True)
def copy_pieces(src_ids, src_mask, src_start, dst_ids, dst_mask, dst_start, lengths):
    """dst[dst_start[k]:+lengths[k]] = src[src_start[k]:+lengths[k]] for ids and mask alike (the shard writer's
    gather from one spool file: plain loops, no index arrays)."""
    for k in range(lengths.size):
        s, d = src_start[k], dst_start[k]
        for i in range(lengths[k]):
            dst_ids[d + i] = src_ids[s + i]
            dst_mask[d + i] = src_mask[s + i]


# ---------------------------------------------------------------------------------------------------- random


@numba.njit(cache=True)
def cut_stream(lengths, doc_order, seq_len):
    """Concatenate the documents in `doc_order` and cut every `seq_len` tokens; a cut document becomes pieces.

    lengths [3, 4], doc_order [1, 0], seq_len 5 -> rows [doc 1 (0..4), doc 0 (0..1)], [doc 0 (1..3)].
    Returns (row_offsets, doc, start, length), all int64. Two passes: count the pieces, then fill.
    """
    num_pieces = 0
    total = 0
    used = 0
    for k in range(doc_order.size):
        remaining = lengths[doc_order[k]]
        total += remaining
        while remaining > 0:
            take = min(remaining, seq_len - used)
            num_pieces += 1
            remaining -= take
            used = (used + take) % seq_len
    num_rows = (total + seq_len - 1) // seq_len
    row_offsets = np.empty(num_rows + 1, np.int64)
    doc = np.empty(num_pieces, np.int64)
    start = np.empty(num_pieces, np.int64)
    piece_length = np.empty(num_pieces, np.int64)
    piece = 0
    row = 0
    used = 0
    for k in range(doc_order.size):
        remaining = lengths[doc_order[k]]
        offset = 0
        while remaining > 0:
            if used == 0:
                row_offsets[row] = piece
                row += 1
            take = min(remaining, seq_len - used)
            doc[piece] = doc_order[k]
            start[piece] = offset
            piece_length[piece] = take
            piece += 1
            offset += take
            remaining -= take
            used = (used + take) % seq_len
    row_offsets[num_rows] = num_pieces
    return row_offsets, doc, start, piece_length


# ---------------------------------------------------------------------------------------------------- exports


@numba.njit(cache=True)
def _put_decimal(value, out, pos):
    """ASCII decimal digits of value >= 0 into out[pos:]; returns the position after them."""
    digits = 1
    bound = 10
    while value >= bound:
        digits += 1
        bound *= 10
    for k in range(digits - 1, -1, -1):
        out[pos + k] = 48 + value % 10
        value //= 10
    return pos + digits


@numba.njit(cache=True)
def boundaries_csv(lengths, out):
    """One `start,end` line per document, documents back to back from 0, as ASCII into out (uint8, at least 42
    bytes per document); returns the bytes written. lengths [3, 2] -> b"0,3\\n3,5\\n" (OLMo-core's .csv.gz)."""
    pos = 0
    start = 0
    for i in range(lengths.size):
        end = start + lengths[i]
        pos = _put_decimal(start, out, pos)
        out[pos] = 44
        pos = _put_decimal(end, out, pos + 1)
        out[pos] = 10
        pos += 1
        start = end
    return pos
