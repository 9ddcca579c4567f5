"""Scale and resilience benchmark (issue 5): build throughput and peak RSS at ~10M vs ~100M tokens, and the Ray
executor vs the local one on the same CPUs.

Corpus: bench_build's seeded resample of the real documents of ../shared/data into prompt/completion JSONL
(`make_corpus(1)`: 13.4M Qwen tokens, the "10M" point; `make_corpus(8)`: ~107M tokens, the "100M" point).
Tokenizer: .cache/qwen-tokenizer (benchmarks/make_qwen_tokenizer.py). Every build is its own `packprep build`
command, measured by bench_build.measure (wall seconds, peak RSS of the largest process of the command tree).
Local and Ray runs of the 1x corpus alternate (local, ray, local, ray) so that a shared machine's load hits both
alike; the overhead is the ratio of the summed walls.

usage: python benchmarks/bench_scale.py [--workers 2] [--big-scale 8] [--pairs 2] [--skip-big] [--ray-big]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import CACHE, ROOT, SEQ_LEN, TOKENIZER, make_corpus, measure  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_build(corpus: Path, out: Path, workers: int, executor: str) -> dict:
    """One `packprep build` command, timed; returns wall, rss_mb, tokens, tok/s and the in-process stage times."""
    cmd = [sys.executable, "-m", "packprep.cli", "build", str(corpus), "--tokenizer", str(TOKENIZER), "--seq-len",
           str(SEQ_LEN), "--out", str(out), "--workers", str(workers), "--executor", executor, "--overwrite", "-q"]
    subprocess.run(["rm", "-rf", str(out)])
    load = uptime().split("load average:")[-1].strip()
    r = measure(cmd)
    m = json.loads((out / "packprep.json").read_text())
    c = m["counts"]
    tokens = c["tokens"] + c["truncated_tokens"]  # every token the tokenizer produced (EOS included)
    res = {"executor": executor, "corpus": corpus.name, "mb": round(corpus.stat().st_size / 1e6), "load": load,
           "wall": round(r["wall"], 2), "rss_mb": round(r["rss_mb"]), "docs": c["input_docs"], "tokens": tokens,
           "tok_per_s": round(tokens / r["wall"]), "rows_over_lb": m["packing"]["rows_over_lb"],
           "timings": m["timings"], "fingerprint": m["fingerprint"], "command": " ".join(cmd)}
    print(f"{executor:5s} {corpus.name}: wall {res['wall']:.1f}s  {res['tok_per_s']:,} tok/s  peak RSS "
          f"{res['rss_mb']} MB  tokens {tokens:,}  load {load}  {m['timings']}", flush=True)
    subprocess.run(["rm", "-rf", str(out)])
    return res


def _compare(runs: list[dict], what: str) -> None:
    """Ray vs local over the given runs: summed walls, and summed in-process totals (no interpreter/runtime start)."""
    by = {e: [r for r in runs if r["executor"] == e] for e in ("local", "ray")}
    assert len({r["fingerprint"] for r in runs}) == 1, "local and Ray builds differ"
    wall = {e: sum(r["wall"] for r in rs) for e, rs in by.items()}
    inproc = {e: sum(r["timings"]["total"] for r in rs) for e, rs in by.items()}
    print(f"Ray vs local, {what}: wall {wall['ray']:.1f}s vs {wall['local']:.1f}s = "
          f"{wall['ray'] / wall['local'] - 1:+.1%}; in-process (excluding interpreter start and Ray runtime start/stop)"
          f" {inproc['ray']:.1f}s vs {inproc['local']:.1f}s = {inproc['ray'] / inproc['local'] - 1:+.1%}; "
          "same fingerprint", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--big-scale", type=int, default=8, help="x 13.4M tokens for the large corpus (8: ~107M)")
    ap.add_argument("--pairs", type=int, default=2, help="alternating local/ray pairs on the 1x corpus")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--ray-big", action="store_true", help="also build the large corpus with Ray")
    a = ap.parse_args()
    if not (TOKENIZER / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_qwen_tokenizer.py")], check=True)
    small = make_corpus(1)
    big = None if a.skip_big else make_corpus(a.big_scale)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  uptime: {uptime()}", flush=True)
    out, runs = CACHE / "out_scale", []

    for _ in range(a.pairs):
        for executor in ("local", "ray"):
            runs.append(run_build(small, out, a.workers, executor))
    if a.pairs:
        _compare([r for r in runs if r["corpus"] == small.name], f"1x, {a.pairs} pairs")

    if big is not None:
        runs.append(run_build(big, out, a.workers, "local"))
        if a.ray_big:
            runs.append(run_build(big, out, a.workers, "ray"))
        b, s = runs[-1 - a.ray_big], [r for r in runs if r["corpus"] == small.name and r["executor"] == "local"]
        if s:
            mean = round(sum(r["tok_per_s"] for r in s) / len(s))
            print(f"local {a.big_scale}x vs 1x: {b['tok_per_s']:,} vs {mean:,} tok/s, peak RSS {b['rss_mb']} vs "
                  f"{max(r['rss_mb'] for r in s)} MB", flush=True)
        if a.ray_big:
            _compare(runs[-2:], f"{a.big_scale}x")
    print(f"uptime: {uptime()}")
    (CACHE / f"scale_results_{time.strftime('%H%M%S')}.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
