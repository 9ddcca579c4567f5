"""Build pipeline benchmark (issue 3): packprep build vs the HF datasets + TRL pipeline, and the raw tokenizer.

Corpus: the real documents of ../shared/data (gsm8k question/answer, code_alpaca, ShareGPT flattened to
prompt/completion) resampled with a fixed seed into a prompt/completion JSONL of ~13.4M Qwen tokens (the issue's
reference size), plus a 10x one for the flat-memory check. Tokenizer: .cache/qwen-tokenizer
(benchmarks/make_qwen_tokenizer.py). Each pipeline runs as its own command; wall time and the peak RSS of its
largest process (getrusage RUSAGE_CHILDREN of a fresh measuring process) are recorded.

usage: python benchmarks/bench_build.py [--workers 2] [--scales 1,10] [--repeat 2] [--skip-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
SHARED = ROOT.parent / "shared"
TOKENIZER = ROOT / ".cache" / "qwen-tokenizer"
TARGET_TOKENS = 13_400_000
SEQ_LEN = 4096


def real_docs() -> list[dict]:
    data = SHARED / "data"
    docs = [{"prompt": g["question"] + "\n", "completion": g["answer"]}
            for g in map(json.loads, open(data / "gsm8k_train.jsonl"))]
    for a in json.load(open(data / "code_alpaca_2k.json")):
        docs.append({"prompt": a["instruction"] + ("\n" + a["input"] if a["input"] else "") + "\n",
                     "completion": a["output"]})
    for conv in json.load(open(data / "sharegpt_dummy.json")):
        turns = conv["conversations"]
        last = max((i for i, t in enumerate(turns) if t["from"] == "gpt"), default=None)
        if last is None:
            continue
        prompt = "".join(f"{t['from']}: {t['value']}\n" for t in turns[:last])
        docs.append({"prompt": prompt + "gpt: ", "completion": turns[last]["value"]})
    return docs


def make_corpus(scale: int) -> Path:
    """Seeded resample of the real documents to ~scale x 13.4M Qwen tokens (measured by chars/token of the mix)."""
    import numpy as np

    path = CACHE / f"sft_{scale}x.jsonl"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    docs = real_docs()
    lines = [json.dumps(d) + "\n" for d in docs]
    tokens_per_doc = 155.6  # benchmarks/data/sft_lengths_qwen.npy: mean Qwen tokens of these documents
    n = int(scale * TARGET_TOKENS / tokens_per_doc)
    idx = np.random.default_rng(scale).integers(0, len(lines), n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in idx:
            f.write(lines[i])
    tmp.replace(path)
    return path


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (MB) of the largest process of `cmd`, measured in a fresh child."""
    probe = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); w = time.perf_counter() - t; "
             "print(json.dumps({'rc': p.returncode, 'wall': w, 'rss_mb': "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'out': p.stdout[-3000:], "
             "'err': p.stderr[-3000:]}))")
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    res = json.loads(r.stdout)
    if res["rc"]:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res['err']}")
    return res


RAW = """
import json, os, sys, time
import pyarrow.json as pj
from tokenizers import Tokenizer
t = pj.read_json(sys.argv[1])
texts = t["prompt"].to_pylist() + t["completion"].to_pylist()
tok = Tokenizer.from_file(sys.argv[2] + "/tokenizer.json")
workers = int(sys.argv[3])
t0 = time.perf_counter()
if workers == 0:  # one process, the tokenizer's own Rayon threads over all cores
    n = sum(len(e) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
else:  # N forked processes, one core each (what packprep's workers do), fixed slices of 2048 texts
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from multiprocessing import get_context
    def enc(i):
        return sum(len(e) for e in tok.encode_batch_fast(texts[i:i + 2048], add_special_tokens=False))
    with get_context("fork").Pool(workers) as pool:
        n = sum(pool.map(enc, range(0, len(texts), 2048), chunksize=4))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - t0}))
"""


def raw_tokenizer(corpus: Path, workers: int, modes=("rayon", "processes")) -> dict:
    out = {}
    for mode in modes:
        w, env = {"rayon": (0, {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(workers)}),
                  "processes": (workers, {})}[mode]
        r = measure([sys.executable, "-c", RAW, str(corpus), str(TOKENIZER), str(w)], env=env)
        out[mode] = {**json.loads(r["out"]), "wall": r["wall"]}  # wall: the whole program (start, load, read)
    return out


def packprep_build(corpus: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "packprep.cli", "build", str(corpus), "--tokenizer", str(TOKENIZER), "--seq-len",
           str(SEQ_LEN), "--out", str(out), "--workers", str(workers), "--overwrite", "-q"]
    subprocess.run(["rm", "-rf", str(out)])
    res = measure(cmd)
    m = json.loads((out / "packprep.json").read_text())
    c = m["counts"]
    res.update(docs=c["input_docs"], tokens=c["tokens"], rows=c["rows"], efficiency=m["packing"]["efficiency"],
               rows_over_lb=m["packing"]["rows_over_lb"], lower_bound=m["packing"]["lower_bound"],
               timings=m["timings"], fingerprint=m["fingerprint"])
    subprocess.run(["rm", "-rf", str(out)])
    return res


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--scales", default="1,10", help="corpus sizes to run, in multiples of 13.4M tokens")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (packprep, raw tokenizer) per scale, "
                    "interleaved so both see the same machine; the best of each is compared")
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    if not (TOKENIZER / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_qwen_tokenizer.py")], check=True)
    print(f"uptime: {uptime()}")
    rss = {}
    for scale in (int(x) for x in a.scales.split(",")):
        corpus = make_corpus(scale)
        print(f"== {scale}x: corpus {corpus.name} ({corpus.stat().st_size / 1e6:.0f} MB), workers {a.workers}, "
              f"seq_len {SEQ_LEN}")
        runs, raws = [], []
        for rnd in range(a.repeat):
            r = packprep_build(corpus, CACHE / f"out_packprep_{scale}x", a.workers)
            runs.append(r)
            print(f"  packprep: wall {r['wall']:.2f}s  peak RSS {r['rss_mb']:.0f} MB  docs {r['docs']:,} tokens "
                  f"{r['tokens']:,} rows {r['rows']:,} (LB {r['lower_bound']:,}, rows/LB {r['rows_over_lb']:.5f}) "
                  f"eff {r['efficiency']:.4f} {r['timings']}")
            modes = ("rayon", "processes") if rnd == 0 and scale == 1 else ("processes",)
            raw = raw_tokenizer(corpus, a.workers, modes)
            for mode, x in raw.items():
                print(f"  raw tokenizer ({mode}, {a.workers} cores): {x['tokens']:,} tokens in {x['seconds']:.2f}s "
                      f"= {x['tokens'] / x['seconds']:,.0f} tok/s (whole program with start, tokenizer load and "
                      f"reading: {x['wall']:.2f}s)")
            raws.append(raw)
        assert len({r["fingerprint"] for r in runs}) == 1, "packprep output differs between runs"
        best_raw = max(x["tokens"] / x["seconds"] for raw in raws for x in raw.values())
        tokenized = raws[0]["processes"]["tokens"] + runs[0]["docs"]  # + one EOS per document
        best = min(r["wall"] for r in runs)
        ours = tokenized / best
        stage = tokenized / min(r["timings"]["tokenize"] for r in runs)
        print(f"  packprep end to end (best of {len(runs)}): {ours:,.0f} tok/s = {ours / best_raw:.1%} of the raw "
              f"tokenizer's best ({best_raw:,.0f} tok/s); its tokenize stage alone: {stage / best_raw:.1%}")
        raw_prog = min(x["processes"]["wall"] for x in raws)
        print(f"  like for like, whole programs (best of each): packprep {best:.2f}s vs the raw tokenizer program "
              f"{raw_prog:.2f}s = {raw_prog / best:.1%}")
        print("  per round (packprep wall vs the raw run right after it): " + ", ".join(
            f"{tokenized / r['wall'] / (x['processes']['tokens'] / x['processes']['seconds']):.1%}"
            for r, x in zip(runs, raws)))
        rss[scale] = max(r["rss_mb"] for r in runs)

        if scale == 1 and not a.skip_hf:
            hf_out = CACHE / "out_hf"
            subprocess.run(["rm", "-rf", str(hf_out)])
            hf = [sys.executable, str(SHARED / "bench" / "hf_trl_pipeline.py"), str(corpus), str(TOKENIZER),
                  str(SEQ_LEN), str(hf_out), "--num-proc", str(a.workers)]
            h = measure(hf)
            line = " ".join(h["out"].strip().splitlines()[-2:])
            print(f"  hf+trl: wall {h['wall']:.2f}s  peak RSS {h['rss_mb']:.0f} MB  {line}")
            print(f"  speedup packprep vs hf+trl: {h['wall'] / best:.2f}x (packprep's best run), "
                  f"{h['wall'] / runs[-1]['wall']:.2f}x (its last run)")
            subprocess.run(["rm", "-rf", str(hf_out)])
    if len(rss) > 1:
        lo, hi = min(rss), max(rss)
        print(f"peak RSS {hi}x / {lo}x: {rss[hi]:.0f} / {rss[lo]:.0f} MB = {rss[hi] / rss[lo]:.2f}x")
    print(f"uptime: {uptime()}")


if __name__ == "__main__":
    main()
