"""Numba kernels: arrays in, arrays out, no validation (that is `packprep.pack`'s and the readers' job).

The plan is written into arrays the caller allocates (int32 wherever the values fit), and no pass holds an
int64 per document or an argsort's index array. Every strategy but random and none starts from the sorted
lengths as runs (length, count), a counting sort without its order array:
    run_need, run_size = length_runs(lengths, seq_len)                          O(N + seq_len) time, O(seq_len)
ffd and b2f fill rows one by one, bfd assigns rows, and both end as the plan slot of every sorted document:
    rows = fill_rows(run_need, run_size, seq_len, tries, slots, row_offsets)      slots: int32[N]
    rows = bfd_assign_rows(run_need, run_size, seq_len, slots, ...); rows_to_slots(slots, row_offsets)
    place_docs(lengths, run_need, run_size, slots, doc)       doc[slots[k]] = k-th sorted document, int32[N]
    gather_lengths(lengths, doc, slots)                       the slots' memory becomes the piece lengths
so the peak is lengths + slots + doc (12 bytes/document) plus the row offsets. greedy's rows are runs of the
sorted order (`greedy_rows`, `sorted_order`); random cuts a shuffled stream in place (`cut_stream`).
Rows are numbered in the order they are opened; inside a row, pieces keep the order they were placed in.
`tests/reference.py` holds the same algorithms in a few lines of plain Python with the same tie-breaking.
`json_array_cuts` is the input side's one kernel: the byte scan that cuts a JSON array file into tasks
(`packprep.readers.json_array`; its tests parse random arrays range by range against `json.loads`).
Every kernel also runs as plain Python under NUMBA_DISABLE_JIT=1 (slowly; the tests do this in CI).
"""

import numba
import numpy as np

# ---------------------------------------------------------------------------------------------------- sorting


@numba.njit(cache=True)
def length_runs(lengths, seq_len):
    """The lengths sorted descending, as runs (a counting sort that never materialises the order):
    lengths [3, 5, 3, 1] -> run_need [5, 3, 1], run_size [1, 2, 1]. O(N + seq_len) time, O(seq_len) memory."""
    count_of_length = np.zeros(seq_len + 1, np.int64)
    for i in range(lengths.size):
        count_of_length[lengths[i]] += 1
    num_runs = 0
    for length in range(1, seq_len + 1):
        num_runs += count_of_length[length] > 0
    run_need = np.empty(num_runs, np.int32)
    run_size = np.empty(num_runs, np.int64)
    run = 0
    for length in range(seq_len, 0, -1):
        if count_of_length[length] > 0:
            run_need[run] = length
            run_size[run] = count_of_length[length]
            run += 1
    return run_need, run_size


@numba.njit(cache=True)
def _first_sorted_position(run_need, run_size):
    """Per length: the sorted position of its first (lowest-index) document. O(longest length) memory, only the
    entries of lengths that occur are written or read."""
    first = np.empty(run_need[0] + 1, np.int64)
    k = 0
    for run in range(run_need.size):
        first[run_need[run]] = k
        k += run_size[run]
    return first


@numba.njit(cache=True)
def sorted_order(lengths, run_need, run_size, order):
    """order[k] = the k-th document by length descending, ties by index ascending (the stable counting sort):
    lengths [3, 5, 3, 1] -> order [1, 0, 2, 3]. Writes `order` (int32[N]) in place."""
    next_position = _first_sorted_position(run_need, run_size)
    for i in range(lengths.size):
        length = lengths[i]
        order[next_position[length]] = i
        next_position[length] += 1


# ---------------------------------------------------------------------------------------------------- output


@numba.njit(cache=True)
def rows_to_slots(row_of_sorted, row_offsets):
    """In place: the row of each sorted document becomes its slot in the plan (rows in order, pieces in placement
    order), and `row_offsets` (zeros, int[rows + 1]) gets each row's first slot.

    row_of_sorted [0, 1, 0] -> slots [0, 2, 1], row_offsets [0, 2, 3]. The counts are prefix-summed into
    row_offsets, which then serves as each row's write cursor and is shifted back: no second rows-sized array.
    """
    num_rows = row_offsets.size - 1
    for k in range(row_of_sorted.size):
        row_offsets[row_of_sorted[k] + 1] += 1
    for row in range(num_rows):
        row_offsets[row + 1] += row_offsets[row]
    for k in range(row_of_sorted.size):
        row = row_of_sorted[k]
        row_of_sorted[k] = row_offsets[row]
        row_offsets[row] += 1
    for row in range(num_rows, 0, -1):  # each cursor ended at the next row's first slot
        row_offsets[row] = row_offsets[row - 1]
    row_offsets[0] = 0


@numba.njit(cache=True)
def place_docs(lengths, run_need, run_size, slot_of_sorted, doc):
    """doc[slot_of_sorted[k]] = the k-th document in sorted order, without the order array: scanning documents by
    index, document i is the next one of its length, so its sorted position is its length's next position."""
    next_position = _first_sorted_position(run_need, run_size)
    for i in range(lengths.size):
        length = lengths[i]
        doc[slot_of_sorted[next_position[length]]] = i
        next_position[length] += 1


@numba.njit(cache=True)
def gather_lengths(lengths, doc, piece_length):
    """piece_length[p] = lengths[doc[p]]; `piece_length` may be the memory of a dead int32 array (the slots)."""
    for p in range(doc.size):
        piece_length[p] = lengths[doc[p]]


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
def _flag_tree(seq_len):
    """(flag_tree, num_leaves): one leaf per value 0..seq_len, all clear."""
    num_leaves = 1
    while num_leaves < seq_len + 1:
        num_leaves *= 2
    return np.zeros(2 * num_leaves, np.uint8), num_leaves


@numba.njit(cache=True)
def bfd_assign_rows(run_need, run_size, seq_len, row_of_sorted, next_in_bucket):
    """Best-fit-decreasing: each document (longest first) goes into the row with the least free space that fits.

    Rows are kept in buckets by free space (1..seq_len-1; full rows leave the buckets). A flag tree over the
    free-space values finds the smallest non-empty bucket >= need in O(log seq_len). Tie-break: a bucket is a
    FIFO queue, so among rows with equal free space the one that reached that free space first is used (what TRL's
    `_pack_bfd` does with its deque, so the rows match TRL's). Writes row_of_sorted (int32[N]) and uses
    `next_in_bucket` (int32, one per row: the next-newer row of its bucket) as scratch; returns the number of rows.
    """
    flag_tree, num_leaves = _flag_tree(seq_len)
    bucket_head = np.full(seq_len + 1, -1, np.int32)  # oldest row with this free space
    bucket_tail = np.full(seq_len + 1, -1, np.int32)  # newest row with this free space
    num_rows = 0
    k = 0
    for run in range(run_need.size):
        need = run_need[run]
        for _ in range(run_size[run]):
            free = _first_flag_at_or_after(flag_tree, num_leaves, need)
            if free < 0:  # no open row fits: open a new one
                if num_rows == next_in_bucket.size:
                    raise AssertionError("more rows than the any-fit bound")
                row = num_rows
                num_rows += 1
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
    return num_rows


# ---------------------------------------------------------------------------------------------------- greedy


@numba.njit(cache=True)
def greedy_rows(run_need, run_size, seq_len, row_offsets):
    """The Packing Analysis paper's greedy packing: fill the current row in sorted order, close it at the first
    document that does not fit (never look back). Rows are consecutive runs of the sorted order, so only
    row_offsets (int[rows + 1]) is written; returns the number of rows."""
    num_rows = 0
    used = seq_len  # so the first document opens row 0
    k = 0
    for run in range(run_need.size):
        need = run_need[run]
        for _ in range(run_size[run]):
            if used + need > seq_len:
                if num_rows == row_offsets.size - 1:
                    raise AssertionError("more rows than the next-fit bound")
                row_offsets[num_rows] = k
                num_rows += 1
                used = 0
            used += need
            k += 1
    row_offsets[num_rows] = k
    return num_rows


# ---------------------------------------------------------------------------------------------------- ffd, b2f


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
def _take(length, count, slot, pool_start, pool_left, taken, flag_tree, num_leaves, slot_of_sorted):
    """Take the next `count` unpacked documents of `length` (their pool's lowest sorted positions) into plan slots
    slot, slot + 1, ..."""
    first = pool_start[length] + taken[length]
    for t in range(count):
        slot_of_sorted[first + t] = slot + t
    taken[length] += count
    pool_left[length] -= count
    if pool_left[length] == 0:
        _clear_flag(flag_tree, num_leaves, length)


@numba.njit(cache=True)
def fill_rows(run_need, run_size, seq_len, repair_tries, slot_of_sorted, row_offsets):
    """First-fit-decreasing filled row by row; with repair_tries > 0, best-two-fit repair (Friesen & Langston's B2F).

    Filling each row with the largest unpacked document that fits, until none fits, gives exactly FFD's rows (and
    FFD's order inside a row); the largest length that fits is taken as many times as it fits in one step. When
    a row keeps free space, its last `repair_tries` documents (smallest first) are tried in turn: put the document
    back and take the most balanced pair of unpacked documents that fills the row exactly (the larger takes the
    document's place, the smaller goes last). Exact fits cost one document each, which FFD leaves to later rows.
    Unpacked documents sit in per-length pools of sorted positions (lowest first; a document put back is the next
    one taken); a flag tree over lengths finds the largest that fits in O(log seq_len). Writes slot_of_sorted
    (int32[N]: the plan slot of the k-th sorted document) and row_offsets (int[>= rows + 1]); returns the number
    of rows. O(N log seq_len) time, O(seq_len) memory of its own.
    """
    num_docs = slot_of_sorted.size
    pool_start = np.zeros(seq_len + 1, np.int64)  # pool of length L: sorted positions pool_start[L] + taken[L]...
    pool_left = np.zeros(seq_len + 1, np.int64)
    taken = np.zeros(seq_len + 1, np.int64)
    flag_tree, num_leaves = _flag_tree(seq_len)  # flag L: pool L is not empty
    position = 0
    for run in range(run_need.size):
        pool_start[run_need[run]] = position
        pool_left[run_need[run]] = run_size[run]
        position += run_size[run]
        _set_flag(flag_tree, num_leaves, run_need[run])
    row_need = np.empty(min(seq_len, num_docs) + 1, np.int32)  # lengths of the current row's pieces
    num_rows = 0
    written = 0
    while written < num_docs:
        if num_rows == row_offsets.size - 1:
            raise AssertionError("more rows than the first-fit bound")
        row_start = written
        free = seq_len
        longest = _last_flag_at_or_before(flag_tree, num_leaves, num_leaves - 1)  # the longest pooled length
        while free > 0:  # FFD: the largest document that still fits, as often as it fits
            length = longest if free >= longest else _last_flag_at_or_before(flag_tree, num_leaves, free)
            if length <= 0:
                break
            count = min(free // length, pool_left[length])
            _take(length, count, written, pool_start, pool_left, taken, flag_tree, num_leaves, slot_of_sorted)
            row_need[written - row_start : written - row_start + count] = length
            written += count
            free -= count * length
            if length == longest and pool_left[length] == 0:
                longest = _last_flag_at_or_before(flag_tree, num_leaves, length)
        for j in range(written - 1, max(row_start, written - repair_tries) - 1, -1):
            if free == 0 or written == num_docs:
                break
            # identical lengths fail identically, so a success is at the row's last piece of this length: the
            # pool's last-taken document, which goes back to the pool's front
            put_back = row_need[j - row_start]
            pool_left[put_back] += 1  # tentatively back in its pool
            if pool_left[put_back] == 1:
                _set_flag(flag_tree, num_leaves, put_back)
            small = _balanced_pair(flag_tree, num_leaves, pool_left, put_back + free)
            if small < 0:  # no exact pair: undo
                pool_left[put_back] -= 1
                if pool_left[put_back] == 0:
                    _clear_flag(flag_tree, num_leaves, put_back)
                continue
            taken[put_back] -= 1  # its slot_of_sorted entry is rewritten when it is taken again
            large = put_back + free - small
            _take(large, 1, j, pool_start, pool_left, taken, flag_tree, num_leaves, slot_of_sorted)
            _take(small, 1, written, pool_start, pool_left, taken, flag_tree, num_leaves, slot_of_sorted)
            row_need[j - row_start] = large
            row_need[written - row_start] = small
            written += 1
            free = 0
        num_rows += 1
        row_offsets[num_rows] = written
    row_offsets[0] = 0
    return num_rows


# ---------------------------------------------------------------------------------------------------- build


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
def count_stream_pieces(lengths, doc_order, seq_len):
    """Pieces made by concatenating the documents in `doc_order` and cutting every `seq_len` tokens."""
    num_pieces = 0
    used = 0
    for k in range(doc_order.size):
        remaining = lengths[doc_order[k]]
        while remaining > 0:
            take = min(remaining, seq_len - used)
            num_pieces += 1
            remaining -= take
            used = (used + take) % seq_len
    return num_pieces


@numba.njit(cache=True)
def cut_stream(lengths, num_docs, seq_len, doc, start, piece_length, row_offsets):
    """Concatenate the documents in doc order and cut every `seq_len` tokens; a cut document becomes pieces.

    The order comes in at the tail of `doc` (doc[pieces - num_docs:]), and the pieces are written from its front:
    a document's id is read before its pieces are written, and the write position never passes the read position.
    lengths [3, 4], order [1, 0], seq_len 5 -> rows [doc 1 (0..4), doc 0 (0..1)], [doc 0 (1..3)].
    Writes doc, start, piece_length (one per piece) and row_offsets (int[rows + 1]).
    """
    num_pieces = doc.size
    piece = 0
    row = 0
    used = 0
    for k in range(num_docs):
        this_doc = doc[num_pieces - num_docs + k]
        remaining = lengths[this_doc]
        offset = 0
        while remaining > 0:
            if used == 0:
                row_offsets[row] = piece
                row += 1
            take = min(remaining, seq_len - used)
            doc[piece] = this_doc
            start[piece] = offset
            piece_length[piece] = take
            piece += 1
            offset += take
            remaining -= take
            used = (used + take) % seq_len
    row_offsets[row] = num_pieces


# ---------------------------------------------------------------------------------------------------- JSON array scan


@numba.njit(cache=True, nogil=True)
def json_array_cuts(block, base, state, chunk_bytes, cuts):
    """One block of a JSON array file's byte scan (`packprep.readers.json_array`): the top-level commas that cut it.

    block: uint8[n], the file's bytes from offset `base`. state: int64[4] = (bracket depth, inside a string,
    after a backslash, next_cut), carried from block to block and updated in place. cuts: int64[k], filled with
    the top-level commas at or after next_cut (each cut moves next_cut to the comma + chunk_bytes).
    Returns (cuts written, top-level commas seen, position of the array's closing bracket or -1).
    `[{"a": "x,]"}, 2]` from base 0, state (0, 0, 0, 1): the comma and bracket in the string are skipped; cuts [13],
    one comma seen, end 16.
    """
    depth, in_string, escaped, next_cut = state[0], state[1], state[2], state[3]
    num_cuts = 0
    commas = 0
    end = -1
    for i in range(block.size):
        c = block[i]
        if in_string:
            if escaped:
                escaped = 0
            elif c == 92:  # backslash
                escaped = 1
            elif c == 34:  # quote
                in_string = 0
            continue
        if c == 34:
            in_string = 1
        elif c == 91 or c == 123:  # [ {
            depth += 1
        elif c == 93 or c == 125:  # ] }
            depth -= 1
            if depth <= 0:
                end = base + i
                break
        elif c == 44 and depth == 1:  # a top-level comma
            commas += 1
            if base + i >= next_cut and num_cuts < cuts.size:
                cuts[num_cuts] = base + i
                num_cuts += 1
                next_cut = base + i + chunk_bytes
    state[0], state[1], state[2], state[3] = depth, in_string, escaped, next_cut
    return num_cuts, commas, end


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
