"""Compute-balanced steps: deal rows to ranks so that every rank of a data-parallel step has the same work.

Attention costs grow with the square of each document's length, so rows of equal token counts are unequal work at
long context, and every rank waits for the slowest one at the gradient all-reduce. A row's cost is modelled as
`alpha * tokens + sum(doc_len^2)` (alpha: the cost of one token's linear layers relative to one unit of sum(l^2),
calibrated per model and GPU by benchmarks/bench_balance.py). `balanced_plan` takes the epoch's seeded row order
and, window by window (the rows of `window` token-budget steps), assigns rows to `window * world` batches by largest
cost first into the cheapest batch with room (LPT), groups batches of near-equal cost into steps, and shuffles the
steps. Every row lands in exactly one batch per epoch: rows that fit nowhere move to the next window, and the last
window grows by whole steps (only when the epoch's last rows cannot give every rank a batch is that incomplete step
left out, as the token plan drops its tail batches). The plan depends only on the seed and the epoch (resuming
recomputes it), and no batch exceeds the token budget.

Costs: O(rows log rows + rows * window * world) Python steps per epoch, over the row lengths and costs only (no
token is read).
"""

from __future__ import annotations

import heapq

import numpy as np


def token_plan(lengths: np.ndarray, batch_tokens: int) -> np.ndarray:
    from trainer.data import budget_batches

    return budget_batches(lengths, batch_tokens)


def balanced_plan(order: np.ndarray, row_lengths: np.ndarray, row_costs: np.ndarray, batch_tokens: int, world: int,
                  window: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(row order, batch bounds) whose global batch g = order[bounds[g]:bounds[g+1]] goes to rank g % world, with
    the `world` batches of each step of near-equal total cost. Every row of `order` appears exactly once."""
    greedy = token_plan(row_lengths[order], batch_tokens)
    n_batches = len(greedy) - 1
    per_window = max(1, window) * world
    cuts = list(range(0, n_batches, per_window)) + [n_batches]
    if len(cuts) > 2 and n_batches - cuts[-2] < world:  # a tail too small for one step joins the window before
        del cuts[-2]
    batches: list[np.ndarray] = []
    carry = np.zeros(0, np.int64)
    for w, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        rows = np.concatenate([carry, order[greedy[a]:greedy[b]]])
        last = w == len(cuts) - 2
        steps = min(max(1, -(-(b - a) // world) if last else (b - a) // world), len(rows) // world)
        if steps == 0:  # fewer rows than ranks: nothing can be dealt evenly
            break
        bins, carry = _lpt(rows, row_lengths, row_costs, batch_tokens, steps * world, grow=world if last else 0)
        batches.extend(_group_steps(bins, row_costs, world, rng))
    out = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    bounds = np.concatenate([[0], np.cumsum([len(x) for x in batches])]).astype(np.int64)
    return out.astype(np.int64), bounds


def _lpt(rows: np.ndarray, lengths: np.ndarray, costs: np.ndarray, budget: int, n_bins: int,
         grow: int) -> tuple[list[list[int]], np.ndarray]:
    """Largest cost first into the cheapest bin with room. Rows that fit no bin are returned (or, with `grow`,
    open `grow` new bins). Bins keep their rows in the given (random) order."""
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    used = [0] * n_bins
    heap = [(0.0, i) for i in range(n_bins)]
    left: list[int] = []
    rank_in = {int(r): i for i, r in enumerate(rows.tolist())}
    for r in sorted(rows.tolist(), key=lambda r: (-costs[r], rank_in[r])):
        n, popped, placed = int(lengths[r]), [], False
        while heap:
            c, i = heapq.heappop(heap)
            if used[i] + n <= budget:
                bins[i].append(r)
                used[i] += n
                heapq.heappush(heap, (c + float(costs[r]), i))
                placed = True
                break
            popped.append((c, i))
        for item in popped:
            heapq.heappush(heap, item)
        if placed:
            continue
        if grow:
            start = len(bins)
            bins.extend([r] if k == 0 else [] for k in range(grow))
            used.extend([n] + [0] * (grow - 1))
            heapq.heappush(heap, (float(costs[r]), start))
            for k in range(1, grow):
                heapq.heappush(heap, (0.0, start + k))
        else:
            left.append(r)
    for i in [i for i, b in enumerate(bins) if not b]:  # an empty batch takes the cheapest row of the fullest one
        donor = max(range(len(bins)), key=lambda j: len(bins[j]))
        if len(bins[donor]) < 2:
            break
        bins[i].append(min(bins[donor], key=lambda r: costs[r]))
        bins[donor].remove(bins[i][0])
    bins = [b for b in bins if b]
    if grow and len(bins) % grow:  # fewer rows than batches at the epoch's end: the last, incomplete step is left out
        bins = sorted(bins, key=lambda b: -costs[b].sum())[: len(bins) // grow * grow]
    for b in bins:
        b.sort(key=rank_in.__getitem__)
    return bins, np.asarray(sorted(left, key=rank_in.__getitem__), np.int64)


def _group_steps(bins: list[list[int]], costs: np.ndarray, world: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Bins sorted by cost, `world` neighbours per step, steps and ranks shuffled; flat list in (step, rank) order."""
    total = np.array([costs[b].sum() for b in bins])
    by_cost = np.argsort(total, kind="stable")
    steps = by_cost.reshape(-1, world)
    out = []
    for s in rng.permutation(len(steps)):
        for i in rng.permutation(steps[s]):
            out.append(np.asarray(bins[i], np.int64))
    return out


def step_imbalance(order: np.ndarray, bounds: np.ndarray, costs: np.ndarray, world: int) -> np.ndarray:
    """max / mean of the ranks' costs, per global step of a plan (global batch g to rank g % world)."""
    per_batch = np.add.reduceat(costs[order], bounds[:-1]) if len(order) else np.zeros(0)
    steps = per_batch[: len(per_batch) // world * world].reshape(-1, world)
    return steps.max(1) / steps.mean(1)
