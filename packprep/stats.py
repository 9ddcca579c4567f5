"""Statistics of a packing plan, shared by everything that reports on one (simulate, build manifest, benchmarks).

`plan_stats(plan, seq_len)` returns plain JSON-serialisable Python values. O(pieces) numpy work with temporaries of
rows size only (no array per piece), so it fits beside a billion-document plan.
"""

from __future__ import annotations

import numpy as np

from packprep.pack import Plan


def lower_bound_rows(total_tokens: int, seq_len: int) -> int:
    """No strategy can use fewer rows than ceil(tokens / seq_len)."""
    return -(-int(total_tokens) // int(seq_len))


def plan_stats(plan: Plan, seq_len: int) -> dict:
    """Rows, tokens, efficiency, lower bound, documents per row and what packing saves versus padding.

    Padding baseline (strategy "none"): one document per row, every row padded to seq_len, so `docs` rows.
    Example: 4 documents of 3 tokens, seq_len 6 -> rows 2, efficiency 1.0, padding rows 4, steps_reduction 2.0.
    """
    seq_len = int(seq_len)
    rows = plan.num_rows
    pieces = plan.num_pieces
    tokens = plan.num_tokens
    split_docs = int(np.count_nonzero(plan.start))  # pieces that continue a cut document
    docs = pieces - split_docs  # every document has exactly one piece starting at token 0
    lower_bound = lower_bound_rows(tokens, seq_len)
    pieces_per_row = np.diff(plan.row_offsets)
    padded_rows = docs  # strategy "none"
    padding_tokens = rows * seq_len - tokens
    padded_padding_tokens = padded_rows * seq_len - tokens
    return {
        "strategy": plan.strategy,
        "seq_len": seq_len,
        "docs": docs,
        "pieces": pieces,
        "split_docs": split_docs,
        "rows": rows,
        "tokens": tokens,
        "efficiency": tokens / (rows * seq_len) if rows else 0.0,
        "lower_bound": lower_bound,
        "rows_over_lb": rows / lower_bound if lower_bound else 1.0,
        "docs_per_row_mean": pieces / rows if rows else 0.0,
        "docs_per_row_max": int(pieces_per_row.max()) if rows else 0,
        "max_row_tokens": int(plan.row_tokens().max()) if rows else 0,
        "padding_tokens": padding_tokens,
        "padded_rows": padded_rows,
        "padding_tokens_saved": padded_padding_tokens - padding_tokens,
        "rows_saved": padded_rows - rows,
        "steps_reduction": padded_rows / rows if rows else 1.0,
    }
