"""Tokenizer benchmark (issue 10): tokens/s on one core, HF `tokenizers` vs packprep's tiktoken backend.

Tokenizer: Qwen's real 151k byte-level BPE (.cache/qwen-tokenizer, built offline by make_qwen_tokenizer.py). Texts:
(1) the build benchmark's real documents (bench_build.real_docs, prompt + completion as one string, as packprep
tokenizes them), (2) every text field of ../shared/data on its own (questions, answers, instructions, inputs, outputs,
ShareGPT turns). Every encoder runs on one thread (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false, tiktoken without
its thread pool) in this one process, interleaved round by round so all see the same machine; the medians are
reported, as wall time and as CPU time of the process (steadier on a shared machine). Token identity with HF's
`encode_batch(add_special_tokens=False)` is checked on every document.

usage: python benchmarks/bench_tokenize.py [--rounds 5] [--cpu N] [--shared ../shared]   (--cpu: pin to core N)
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers is imported
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_build  # noqa: E402
from bench_build import TOKENIZER, real_docs, uptime  # noqa: E402


def shared_fields() -> list[str]:
    data = bench_build.SHARED / "data"
    out = [t for g in map(json.loads, open(data / "gsm8k_train.jsonl")) for t in (g["question"], g["answer"])]
    out += [t for a in json.load(open(data / "code_alpaca_2k.json")) for t in (a["instruction"], a["input"],
                                                                               a["output"]) if t]
    out += [t["value"] for c in json.load(open(data / "sharegpt_dummy.json")) for t in c["conversations"]]
    return out


def timed(fn, texts) -> tuple[list[list[int]], float, float]:
    w, c = time.perf_counter(), time.process_time()
    ids = fn(texts)
    return ids, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=None, help="pin to this core")
    ap.add_argument("--shared", type=Path, default=bench_build.SHARED, help="the shared/ folder holding data/")
    a = ap.parse_args()
    bench_build.SHARED = a.shared
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    if not (TOKENIZER / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_qwen_tokenizer.py")], check=True)
    from tokenizers import Tokenizer

    from packprep.tiktoken_backend import TiktokenBackend

    hf = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    t0 = time.perf_counter()
    fast = TiktokenBackend(TOKENIZER)
    print(f"uptime: {uptime()}\ntiktoken backend built in {time.perf_counter() - t0:.2f}s; "
          f"cores visible {len(os.sched_getaffinity(0))}")
    encoders = {
        "hf encode_batch": lambda t: [e.ids for e in hf.encode_batch(t, add_special_tokens=False)],
        "hf encode_batch_fast": lambda t: [e.ids for e in hf.encode_batch_fast(t, add_special_tokens=False)],
        "tiktoken backend": lambda t: fast.encode_batch(t),
        "tiktoken encode_ordinary": lambda t: [fast.encoding.encode_ordinary(x) for x in t],
    }
    sets = {"real_docs (prompt+completion)": [d["prompt"] + d["completion"] for d in real_docs()],
            "shared/data fields": shared_fields()}
    for name, texts in sets.items():
        ref = encoders["hf encode_batch"](texts)
        n = sum(map(len, ref))
        wrong = {k: sum(x != y for x, y in zip(ref, f(texts))) for k, f in encoders.items()}
        print(f"== {name}: {len(texts):,} texts, {n:,} tokens; documents differing from HF: {wrong}")
        walls = {k: [] for k in encoders}
        cpus = {k: [] for k in encoders}
        for r in range(a.rounds):
            order = list(encoders) if r % 2 == 0 else list(reversed(encoders))
            for k in order:
                _, w, c = timed(encoders[k], texts)
                walls[k].append(w)
                cpus[k].append(c)
        best_hf = max((k for k in encoders if k.startswith("hf")), key=lambda k: -statistics.median(cpus[k]))
        base = n / statistics.median(cpus[best_hf])
        for k in encoders:
            tw, tc = n / statistics.median(walls[k]), n / statistics.median(cpus[k])
            print(f"  {k:26s} {tw / 1e6:6.2f}M tok/s wall, {tc / 1e6:6.2f}M tok/CPU-s  ({tc / base:.2f}x the "
                  f"faster HF call, {best_hf}, by CPU time); rounds wall {[round(x, 2) for x in walls[k]]}, "
                  f"CPU {[round(x, 2) for x in cpus[k]]}")
    print(f"uptime: {uptime()}")


if __name__ == "__main__":
    main()
