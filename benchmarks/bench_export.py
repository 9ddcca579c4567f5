"""Export benchmark (issue 12): `packprep.exports.export` throughput per format, one process, one core.

Builds (cached under .cache/bench/):
- `--source synthetic` (default): the benchmark corpus's shape without its tokenization cost. Document lengths are
  resampled (seeded) from benchmarks/data/sft_lengths_qwen.npy (the Qwen token counts of bench_build.py's
  documents) to --scale x 13.4M tokens, packed with packprep.pack (ffd, seq_len 4096), rows shuffled, written with
  packprep.shards in shards of build's default size; token ids uniform in Qwen's 151,646 ids (int32 / uint32 on
  export), loss on each document's last 60%. The manifest holds what exports read (fingerprint, seq_len,
  tokenizer vocab/eos, counts).
- `--source real`: `packprep build` of bench_build.py's corpus (`.cache/bench/sft_{scale}x.jsonl`) with the Qwen
  tokenizer (`.cache/qwen-tokenizer`), 2 workers.
Each export runs --repeat times into a fresh folder after one read of every shard (page cache warm); reported:
wall seconds (best and median), MB/s of token data (the shards' int32 ids: 4 bytes/token) and of bytes written.
By default each format runs without fsync (the process's own work: reading the memory-mapped shards and copying
into the page cache; what the issue-12 target measures); `--fsync on|both` adds the run `packprep export` does by
default, where the disk's write speed bounds it. One line per format and fsync setting: token-data MB/s (the
target), written MB/s, the wall times, the load average, and the exact command that reproduces that line.

usage: python benchmarks/bench_export.py [--source synthetic|real] [--scale 10] [--formats megatron,olmo]
                                          [--repeat 3] [--fsync off|on|both] [--core N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
SEQ_LEN = 4096
QWEN_VOCAB = 151_646
TARGET_TOKENS = 13_400_000


def synthetic_build(scale: int) -> Path:
    from packprep.pack import pack
    from packprep.shards import MANIFEST, make_batch, shard_name, write_hf_metadata, write_json_atomic, write_shard

    out = CACHE / f"export_synthetic_{scale}x"
    if (out / MANIFEST).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(scale)
    real = np.load(ROOT / "benchmarks" / "data" / "sft_lengths_qwen.npy")
    lengths = rng.choice(real, int(scale * TARGET_TOKENS / real.mean())).astype(np.int64)
    plan = pack(lengths, seq_len=SEQ_LEN, strategy="ffd", seed=0)
    rows = len(plan.row_offsets) - 1
    order = rng.permutation(rows)
    shard_rows = (256 << 20) // (5 * SEQ_LEN)  # build's default: about 256 MB of ids + mask per shard
    files, counts = [], {"rows": rows, "pieces": len(plan.doc), "tokens": int(lengths.sum()), "loss_tokens": 0}
    for s, first in enumerate(range(0, rows, shard_rows)):
        part = order[first:first + shard_rows]
        pieces = np.concatenate([np.arange(plan.row_offsets[r], plan.row_offsets[r + 1]) for r in part])
        piece_len = plan.length[pieces]
        docs = plan.doc[pieces]
        tokens = rng.integers(0, QWEN_VOCAB, int(piece_len.sum()), dtype=np.int32)
        pos = np.arange(len(tokens)) - np.repeat(np.concatenate([[0], np.cumsum(piece_len)[:-1]]), piece_len)
        mask = (pos >= np.repeat((piece_len * 0.4).astype(np.int64), piece_len)).astype(np.uint8)
        counts["loss_tokens"] += int(mask.sum())
        row_pieces = np.concatenate([[0], np.cumsum(np.diff(plan.row_offsets)[part])])
        row_tokens = np.concatenate([[0], np.cumsum(np.add.reduceat(piece_len, row_pieces[:-1]))])
        batch = make_batch(tokens, row_tokens, piece_len, row_pieces, docs, mask)
        n = -(-rows // shard_rows)
        files.append(write_shard(out / shard_name(s, n), [batch], fsync=False))
    write_hf_metadata(out, [f["file"] for f in files], fingerprint=f"synthetic-{scale}x")
    write_json_atomic(out / MANIFEST, {"format_version": 1, "fingerprint": f"synthetic-{scale}x", "seq_len": SEQ_LEN,
                                       "tokenizer": {"name": "synthetic-qwen", "vocab_size": QWEN_VOCAB,
                                                     "eos_id": 151643}, "counts": counts, "shards": files})
    return out


def real_build(scale: int) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_build import TOKENIZER, make_corpus

    out = CACHE / f"export_real_{scale}x"
    if not (out / "packprep.json").exists():
        corpus = make_corpus(scale)
        subprocess.run([sys.executable, "-m", "packprep.cli", "build", str(corpus), "--out", str(out), "--tokenizer",
                        str(TOKENIZER), "--seq-len", str(SEQ_LEN), "--workers", "2"], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=("synthetic", "real"), default="synthetic")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--formats", default="megatron,olmo")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fsync", choices=("both", "on", "off"), default="off")
    ap.add_argument("--core", type=int, default=None, help="pin the process to this CPU core (one core)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of the text line")
    args = ap.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    from packprep.exports import export
    from packprep.shards import shard_files

    build = synthetic_build(args.scale) if args.source == "synthetic" else real_build(args.scale)
    manifest = json.loads((build / "packprep.json").read_text())
    tokens = manifest["counts"]["tokens"]
    for f in shard_files(build):  # warm the page cache: exports then read memory, as after a build
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    fsyncs = {"both": (True, False), "on": (True,), "off": (False,)}[args.fsync]
    for fmt, fsync in [(f, s) for f in args.formats.split(",") for s in fsyncs]:
        walls, written = [], 0
        for _ in range(args.repeat):
            out = CACHE / f"export_out_{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            m = export(build, fmt, out, fsync=fsync)
            walls.append(time.perf_counter() - t)
            written = sum((out / name).stat().st_size for name in m["files"])
            shutil.rmtree(out)
        best = min(walls)
        command = (f"python benchmarks/bench_export.py --source {args.source} --scale {args.scale} --formats {fmt} "
                   f"--fsync {'on' if fsync else 'off'} --repeat {args.repeat}"
                   + (f" --core {args.core}" if args.core is not None else ""))
        row = {"format": fmt, "fsync": fsync, "source": args.source, "scale": args.scale, "tokens": tokens,
               "rows": manifest["counts"]["rows"], "documents": manifest["counts"]["pieces"],
               "wall_best_s": round(best, 3), "wall_median_s": round(statistics.median(walls), 3),
               "token_MBps": round(tokens * 4 / best / 1e6, 1), "written_MBps": round(written / best / 1e6, 1),
               "written_MB": round(written / 1e6, 1), "load_avg": round(os.getloadavg()[0], 2), "command": command}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{fmt:<12} fsync {'on ' if fsync else 'off'}  {row['token_MBps']:7.1f} MB/s token data  "
                  f"({row['written_MBps']:.1f} MB/s written; {tokens / 1e6:.1f}M tokens, best {best:.3f} s of "
                  f"{args.repeat}, median {row['wall_median_s']:.3f} s, load {row['load_avg']})  $ {command}",
                  flush=True)


if __name__ == "__main__":
    main()
