"""Billion-document planning (issue 11): pack 100M and 1B documents of the real SFT length mix, seq_len 4096.

Lengths: benchmarks/data/sft_lengths_qwen.npy (9,990 real SFT documents through the Qwen BPE) resampled with
replacement (seeded) into an int32 array of N documents. Each (N, strategy) runs in a fresh process that imports
packprep, warms the JIT on 1,000 documents, reads its RSS (the baseline), builds the lengths, packs once and reads
`resource.getrusage(RUSAGE_SELF).ru_maxrss`: the figure reported is that peak minus the baseline, which includes
the int32 lengths (4 B/doc). Time: pack() wall and CPU seconds (user + sys: less sensitive than wall to other jobs
on a shared CPU). Then rows, the lower bound ceil(tokens / seq_len), rows/LB, and a check of the plan (every
document once: counts and index sums; every piece's length equals its document's; no row over seq_len).

usage: python benchmarks/bench_billion.py [--docs 100000000 1000000000] [--strategies ffd b2f] [--seq-len 4096]
Targets: 1B documents < 90 s on one core, <= 16 bytes/document peak, b2f rows <= LB x 1.0002 + 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REAL = Path(__file__).parent / "data" / "sft_lengths_qwen.npy"
CHUNK = 1 << 22  # documents resampled (and checked) at a time: 4M x 4 bytes of temporaries


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def resampled_lengths(num_docs: int, seed: int = 0) -> np.ndarray:
    real = np.load(REAL).astype(np.int32)
    rng = np.random.default_rng(seed)
    lengths = np.empty(num_docs, np.int32)
    for a in range(0, num_docs, CHUNK):
        b = min(a + CHUNK, num_docs)
        lengths[a:b] = real[rng.integers(0, real.size, b - a, dtype=np.int32)]
    return lengths


def check_plan(plan, lengths: np.ndarray, seq_len: int) -> None:
    """Every document in exactly one piece (count, and sums of doc indices and of their squares mod 2^64), piece
    lengths equal their documents' lengths, no row over seq_len: chunked, so the check adds no array per document."""
    n = lengths.size
    assert int(plan.row_offsets[0]) == 0 and int(plan.row_offsets[-1]) == plan.num_pieces
    assert int(plan.row_tokens().max()) <= seq_len and plan.num_tokens == int(lengths.sum(dtype=np.int64))
    if plan.strategy == "random":  # cut documents: the tokens add up (above); pieces are checked by tests/
        return
    assert plan.num_pieces == n
    doc_sum = doc_sq = 0
    for a in range(0, n, CHUNK):
        d = plan.doc[a : a + CHUNK].astype(np.uint64)
        assert np.array_equal(lengths[d], plan.length[a : a + CHUNK])
        doc_sum += int(d.sum())
        doc_sq = (doc_sq + int((d * d).sum())) % 2**64  # uint64 arithmetic wraps: compare mod 2^64
    assert doc_sum == n * (n - 1) // 2, "a document is missing or twice"
    assert doc_sq == (n - 1) * n * (2 * n - 1) // 6 % 2**64, "a document is missing or twice"
    assert not np.any(plan.start)


def child(num_docs: int, strategy: str, seq_len: int) -> None:
    from packprep.pack import pack

    pack(resampled_lengths(1000), seq_len, strategy)  # JIT warm-up: numba's cache load, not the packing
    baseline = _rss_bytes()
    lengths = resampled_lengths(num_docs)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    plan = pack(lengths, seq_len, strategy)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    plan_bytes = sum(a.nbytes for a in (plan.row_offsets, plan.doc, plan.start, plan.length) if a.strides != (0,))
    tokens = plan.num_tokens
    lower_bound = -(-tokens // seq_len)
    check_plan(plan, lengths, seq_len)
    print(json.dumps({
        "docs": num_docs, "strategy": strategy, "seq_len": seq_len, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "peak_rss": peak, "baseline_rss": baseline,
        "peak_minus_baseline_per_doc": round((peak - baseline) / num_docs, 2),
        "lengths_bytes": lengths.nbytes, "plan_bytes": int(plan_bytes), "dtypes": [str(plan.row_offsets.dtype),
        str(plan.doc.dtype), str(plan.start.dtype), str(plan.length.dtype)], "tokens": tokens, "rows": plan.num_rows,
        "lower_bound": lower_bound, "rows_over_lb": plan.num_rows / lower_bound,
        "within_b2f_target": plan.num_rows <= lower_bound * 1.0002 + 1}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[100_000_000, 1_000_000_000])
    parser.add_argument("--strategies", nargs="+", default=["ffd", "b2f"])
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}", flush=True)
    print("| docs | strategy | wall (s) | CPU (s) | peak RSS - baseline | per doc | rows | LB | rows/LB | "
          "<= LB x 1.0002 + 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for num_docs in args.docs:
        for strategy in args.strategies:
            out = subprocess.run([sys.executable, __file__, "--child", str(num_docs), strategy, str(args.seq_len)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {num_docs:,} | {strategy} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                  f"{(r['peak_rss'] - r['baseline_rss']) / 2**30:.2f} GiB (raw peak {r['peak_rss'] / 2**30:.2f}, "
                  f"baseline {r['baseline_rss'] / 2**20:.0f} MiB) | {r['peak_minus_baseline_per_doc']:.2f} B | "
                  f"{r['rows']:,} | {r['lower_bound']:,} | {r['rows_over_lb']:.6f} | "
                  f"{'yes' if r['within_b2f_target'] else 'no'} |", flush=True)
            print("    " + json.dumps(r), file=sys.stderr, flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
