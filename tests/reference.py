"""Slow, obviously-correct twins of the packing kernels (same algorithms, same tie-breaking), for exact comparison.

Each returns rows as lists of (doc, start, length) pieces, in the order the kernels number rows and pieces.
"""

from collections import deque

import numpy as np


def sorted_desc(lengths):
    """Longest first; equal lengths by index ascending."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def ffd_rows(lengths, seq_len):
    """First fit decreasing: the lowest-numbered row with room, else a new row."""
    rows, free = [], []
    for i in sorted_desc(lengths):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if not fits:
            rows.append([])
            free.append(seq_len)
        r = fits[0] if fits else len(rows) - 1
        rows[r].append((i, 0, lengths[i]))
        free[r] -= lengths[i]
    return rows


def bfd_rows(lengths, seq_len):
    """Best fit decreasing: the row with the least room that fits; among equals the one that got that room first."""
    rows, free, since = [], [], []
    for step, i in enumerate(sorted_desc(lengths)):
        fits = [(free[r], since[r], r) for r in range(len(rows)) if free[r] >= lengths[i]]
        if not fits:
            rows.append([])
            free.append(seq_len)
            since.append(step)
        r = min(fits)[2] if fits else len(rows) - 1
        rows[r].append((i, 0, lengths[i]))
        free[r] -= lengths[i]
        since[r] = step
    return rows


def b2f_rows(lengths, seq_len, tries=3):
    """FFD filled row by row (largest unpacked doc that fits, until none fits: ffd_rows' rows). A row left with free
    space then tries its last `tries` docs (smallest first): put it back, take the most balanced pair of unpacked
    docs that fills the row exactly; the larger takes its place, the smaller goes last."""
    pools = {}  # length -> unpacked docs, lowest index first; a doc put back is the next one taken
    for i in sorted_desc(lengths):
        pools.setdefault(lengths[i], deque()).append(i)
    rows = []
    while any(pools.values()):
        row, free = [], seq_len
        while fitting := [n for n, pool in pools.items() if pool and n <= free]:
            row.append(pools[max(fitting)].popleft())
            free -= max(fitting)
        for j in range(len(row) - 1, max(-1, len(row) - 1 - tries), -1):
            if free == 0 or not any(pools.values()):
                break
            pools[lengths[row[j]]].appendleft(row[j])
            target = lengths[row[j]] + free
            have = {n: len(pool) for n, pool in pools.items()}
            pair = [(target - a, a) for a in range(target // 2, 0, -1)
                    if have.get(a, 0) > 0 and have.get(target - a, 0) > (a == target - a)]
            if pair:
                large, small = pair[0]
                row[j] = pools[large].popleft()
                row.append(pools[small].popleft())
                free = 0
            else:
                pools[lengths[row[j]]].popleft()
        rows.append([(i, 0, lengths[i]) for i in row])
    return rows


def greedy_rows(lengths, seq_len):
    """Packing Analysis paper: sort descending, fill the current row, close it at the first doc that does not fit."""
    rows = []
    for i in sorted_desc(lengths):
        if not rows or sum(p[2] for p in rows[-1]) + lengths[i] > seq_len:
            rows.append([])
        rows[-1].append((i, 0, lengths[i]))
    return rows


def random_rows(lengths, seq_len, seed):
    """Shuffle (numpy's default_rng(seed).permutation), concatenate, cut every seq_len tokens."""
    tokens = [(i, t) for i in np.random.default_rng(seed).permutation(len(lengths)) for t in range(lengths[i])]
    rows = []
    for cut in range(0, len(tokens), seq_len):
        row = []
        for i, t in tokens[cut : cut + seq_len]:
            if row and row[-1][0] == i:
                row[-1] = (i, row[-1][1], row[-1][2] + 1)
            else:
                row.append((int(i), t, 1))
        rows.append(row)
    return rows


def none_rows(lengths, seq_len):
    return [[(i, 0, n)] for i, n in enumerate(lengths)]


def plan_rows(plan):
    """A Plan as the same lists of (doc, start, length) pieces, for comparison."""
    pieces = list(zip(plan.doc.tolist(), plan.start.tolist(), plan.length.tolist()))
    return [pieces[a:b] for a, b in zip(plan.row_offsets[:-1].tolist(), plan.row_offsets[1:].tolist())]
