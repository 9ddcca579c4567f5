"""Packing engine benchmark (issue 2): speed, memory and quality of packprep.pack against the targets.

1. 10M SFT-like lengths (lognormal, mean ~250, clipped to 4096), seq_len 4096: ffd / bfd / greedy / random time
   (pack() end to end, best of 3 after a JIT warm-up, one core), peak extra memory (RSS high-water mark of a fresh
   process minus its RSS before packing, and the plan's array bytes), rows / lower bound. 100M and 1B documents of
   the real mix: benchmarks/bench_billion.py.
2. TRL's `trl.data_utils._pack_bfd` on a one-column pyarrow table of a 300k subset vs ours on the same lengths, in
   the same run: time, rows, ratio, and whether the rows hold the same documents in the same order.
3. The real SFT mix benchmarks/data/sft_lengths_qwen.npy (9,990 docs, Qwen BPE), as is, resampled to 1M docs and
   tiled 100x, at seq_len 512..4096: rows vs LB x 1.0002 + 1 and what greedy / random waste.

usage: taskset -c 0 python benchmarks/bench_pack.py [--docs 10000000] [--trl-docs 300000]
Prints markdown tables (pasted into benchmarks/RESULTS.md).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from packprep.pack import pack
from packprep.stats import plan_stats

REAL = Path(__file__).parent / "data" / "sft_lengths_qwen.npy"


def sft_like_lengths(num_docs: int, seq_len: int = 4096, seed: int = 0) -> np.ndarray:
    """Heavy-tailed SFT-like mix: lognormal with mean 250 (sigma 1), tail clipped to seq_len, int32."""
    sigma = 1.0
    raw = np.random.default_rng(seed).lognormal(np.log(250) - sigma**2 / 2, sigma, num_docs)
    return np.clip(raw, 1, seq_len).astype(np.int32)


def best_time(fn, repeat: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(lengths_path: str, strategy: str, seq_len: int) -> None:
    """In a fresh process: RSS high-water mark during pack() minus RSS before it (numba allocations included)."""
    lengths = np.load(lengths_path)
    pack(lengths[:1000], seq_len, strategy)  # JIT warm-up / cache load
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    plan = pack(lengths, seq_len, strategy)
    peak = _rss_kib("VmHWM")
    arrays = (plan.row_offsets, plan.doc, plan.start, plan.length)
    plan_bytes = sum(a.nbytes for a in arrays if a.strides != (0,))  # an uncut plan's start is a view of one zero
    print(json.dumps({"peak_extra_bytes": (peak - before) * 1024, "plan_bytes": plan_bytes}))


def peak_memory(lengths: np.ndarray, strategy: str, seq_len: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lengths.npy")
        np.save(path, lengths)
        out = subprocess.run([sys.executable, __file__, "--memory-child", path, strategy, str(seq_len)],
                             check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_10m(num_docs: int, seq_len: int = 4096) -> None:
    lengths = sft_like_lengths(num_docs, seq_len)
    print(f"\n### {num_docs:,} SFT-like docs (lognormal mean {lengths.mean():.1f}, max {lengths.max()}), "
          f"seq_len {seq_len}\n")
    print("| strategy | time (s) | docs/s | peak extra RSS (B/doc) | plan arrays (B/doc) | rows | LB | rows/LB |")
    print("|---|---|---|---|---|---|---|---|")
    for strategy in ("ffd", "bfd", "b2f", "greedy", "random"):
        pack(lengths[:1000], seq_len, strategy)  # JIT warm-up
        seconds, plan = best_time(lambda s=strategy: pack(lengths, seq_len, s))
        stats = plan_stats(plan, seq_len)
        del plan
        mem = peak_memory(lengths, strategy, seq_len)
        print(f"| {strategy} | {seconds:.3f} | {num_docs / seconds / 1e6:.1f}M | "
              f"{mem['peak_extra_bytes'] / num_docs:.1f} | {mem['plan_bytes'] / num_docs:.1f} | {stats['rows']:,} | "
              f"{stats['lower_bound']:,} | {stats['rows_over_lb']:.6f} |")


def bench_trl(num_docs: int, seq_len: int = 4096) -> None:
    try:
        import pyarrow as pa
        import trl
        from trl.data_utils import _pack_bfd
    except ImportError:
        print("\n(trl not installed: TRL comparison skipped)")
        return
    lengths = sft_like_lengths(num_docs, seq_len, seed=1)
    # One list column whose tokens are the document's own index, so TRL's output says which doc is where.
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    values = np.repeat(np.arange(num_docs, dtype=np.int32), lengths)
    table = pa.table({"input_ids": pa.LargeListArray.from_arrays(offsets, values)})
    trl_seconds, packed = best_time(lambda: _pack_bfd(table, seq_len), repeat=1)
    trl_rows = []
    for ids, seq_lengths in zip(packed["input_ids"].to_numpy(zero_copy_only=False),
                                packed["seq_lengths"].to_numpy(zero_copy_only=False)):
        starts = np.concatenate([[0], np.cumsum(seq_lengths)[:-1]])
        trl_rows.append(ids[starts].tolist())
    del packed, values
    print(f"\n### TRL {trl.__version__} `_pack_bfd` vs packprep, {num_docs:,} docs, seq_len {seq_len} (same run)\n")
    print("| packer | time (s) | docs/s | rows | same rows, same order as TRL | speed-up vs TRL |")
    print("|---|---|---|---|---|---|")
    print(f"| trl._pack_bfd | {trl_seconds:.3f} | {num_docs / trl_seconds / 1e3:.0f}k | {len(trl_rows):,} | - | 1x |")
    for strategy in ("bfd", "ffd"):
        pack(lengths[:1000], seq_len, strategy)
        seconds, plan = best_time(lambda s=strategy: pack(lengths, seq_len, s))
        ours = [plan.doc[plan.row(r)].tolist() for r in range(plan.num_rows)]
        print(f"| packprep {strategy} | {seconds:.4f} | {num_docs / seconds / 1e6:.1f}M | {plan.num_rows:,} | "
              f"{'yes' if ours == trl_rows else 'no'} | {trl_seconds / seconds:.0f}x |")


def split_long(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Documents > seq_len become full pieces + a remainder (the build's --long-docs split)."""
    long = lengths > seq_len
    if not long.any():
        return lengths, 0
    pieces = [np.full(n // seq_len, seq_len, np.int32) for n in lengths[long]]
    rest = lengths[long] % seq_len
    return np.concatenate([lengths[~long], *pieces, rest[rest > 0].astype(np.int32)]), int(long.sum())


def bench_real() -> None:
    real = np.load(REAL)
    rng = np.random.default_rng(0)
    mixes = {
        f"real ({real.size:,} docs)": real,
        "resampled 1M docs": rng.choice(real, 1_000_000),
        f"tiled 100x ({100 * real.size:,} docs)": np.tile(real, 100),
    }
    print(f"\n### Real SFT mix ({REAL.name}: gsm8k + code_alpaca + ShareGPT through the Qwen BPE, "
          f"mean {real.mean():.1f}, max {real.max()})\n")
    print("| mix | seq_len | split docs | LB | LB x 1.0002 + 1 | ffd rows | bfd rows | b2f rows | greedy rows (+% LB) "
          "| random rows (docs cut) | none rows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    within = {"ffd": 0, "bfd": 0, "b2f": 0}
    cases = 0
    for name, mix in mixes.items():
        for seq_len in (512, 1024, 2048, 4096):
            lengths, split = split_long(mix, seq_len)
            s = {k: plan_stats(pack(lengths, seq_len, k), seq_len) for k in ("ffd", "bfd", "b2f", "greedy", "random")}
            lb = s["ffd"]["lower_bound"]
            bound = lb * 1.0002 + 1
            cases += 1
            cells = []
            for k in within:
                ok = s[k]["rows"] <= bound
                within[k] += ok
                cells.append(f"{s[k]['rows']:,}" + ("" if ok else " (over)"))
            greedy_extra = 100 * (s["greedy"]["rows"] / lb - 1)
            print(f"| {name} | {seq_len} | {split} | {lb:,} | {bound:,.1f} | {' | '.join(cells)} | "
                  f"{s['greedy']['rows']:,} (+{greedy_extra:.1f}%) | {s['random']['rows']:,} "
                  f"({s['random']['split_docs']:,}) | {lengths.size:,} |")
    print("\nrows <= LB x 1.0002 + 1: " + ", ".join(f"{k} {n}/{cases}" for k, n in within.items()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--trl-docs", type=int, default=300_000)
    args = parser.parse_args()
    print(f"cpu affinity {sorted(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    bench_10m(args.docs)
    bench_trl(args.trl_docs)
    bench_real()


if __name__ == "__main__":
    main()
