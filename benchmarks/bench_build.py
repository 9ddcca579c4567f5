"""Build pipeline benchmark (issue 3): packprep build vs the HF datasets + TRL pipeline, and the raw tokenizer.

Corpus: the real documents of ../shared/data (gsm8k question/answer, code_alpaca, ShareGPT flattened to
prompt/completion) resampled with a fixed seed into a prompt/completion JSONL of ~13.4M Qwen tokens (the issue's
reference size), plus a 10x one for the flat-memory check. Tokenizer: .cache/qwen-tokenizer
(benchmarks/make_qwen_tokenizer.py). Each pipeline runs as its own command; wall time and the peak RSS of its
largest process (getrusage RUSAGE_CHILDREN of a fresh measuring process) are recorded.

usage: python benchmarks/bench_build.py [--workers 2] [--skip-10x] [--skip-hf]
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


def raw_tokenizer(corpus: Path, workers: int) -> dict:
    out = {}
    for mode, w, env in (("rayon", 0, {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(workers)}),
                         ("processes", workers, {})):
        r = subprocess.run([sys.executable, "-c", RAW, str(corpus), str(TOKENIZER), str(w)], capture_output=True,
                           text=True, check=True, env={**os.environ, **env})
        out[mode] = json.loads(r.stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--skip-10x", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()
    if not (TOKENIZER / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_qwen_tokenizer.py")], check=True)
    corpus = make_corpus(1)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.0f} MB), workers {a.workers}, seq_len {SEQ_LEN}")
    results = {}

    out = CACHE / "out_packprep"
    pp = [sys.executable, "-m", "packprep.cli", "build", str(corpus), "--tokenizer", str(TOKENIZER), "--seq-len",
          str(SEQ_LEN), "--out", str(out), "--workers", str(a.workers), "--overwrite", "-q"]
    subprocess.run(["rm", "-rf", str(out)])
    results["packprep"] = measure(pp)
    m = json.loads((out / "packprep.json").read_text())
    c = m["counts"]
    results["packprep"].update(docs=c["input_docs"], tokens=c["tokens"], rows=c["rows"],
                               efficiency=m["packing"]["efficiency"], rows_over_lb=m["packing"]["rows_over_lb"],
                               timings=m["timings"])
    print(f"packprep: wall {results['packprep']['wall']:.2f}s  peak RSS {results['packprep']['rss_mb']:.0f} MB  "
          f"docs {c['input_docs']:,} tokens {c['tokens']:,} rows {c['rows']:,} eff "
          f"{m['packing']['efficiency']:.4f} rows/LB {m['packing']['rows_over_lb']:.5f} {m['timings']}")

    raw = raw_tokenizer(corpus, a.workers)
    for mode, r in raw.items():
        print(f"raw tokenizer ({mode}, {a.workers} cores): {r['tokens']:,} tokens in {r['seconds']:.2f}s = "
              f"{r['tokens'] / r['seconds']:,.0f} tok/s")
    best = max(r["tokens"] / r["seconds"] for r in raw.values())
    tokenized = sum(r["tokens"] for r in raw.values()) // 2 + c["input_docs"]  # + one EOS per document
    ours = tokenized / results["packprep"]["wall"]
    print(f"packprep end to end: {ours:,.0f} tok/s = {ours / best:.1%} of the raw tokenizer's best")

    if not a.skip_hf:
        hf_out = CACHE / "out_hf"
        subprocess.run(["rm", "-rf", str(hf_out)])
        hf = [sys.executable, str(SHARED / "bench" / "hf_trl_pipeline.py"), str(corpus), str(TOKENIZER),
              str(SEQ_LEN), str(hf_out), "--num-proc", str(a.workers)]
        results["hf_trl"] = measure(hf)
        line = " ".join(results["hf_trl"]["out"].strip().splitlines()[-2:])
        print(f"hf+trl:   wall {results['hf_trl']['wall']:.2f}s  peak RSS {results['hf_trl']['rss_mb']:.0f} MB  "
              f"{line}")
        print(f"speedup packprep vs hf+trl: {results['hf_trl']['wall'] / results['packprep']['wall']:.2f}x")
        subprocess.run(["rm", "-rf", str(hf_out)])

    if not a.skip_10x:
        big = make_corpus(10)
        out10 = CACHE / "out_packprep_10x"
        subprocess.run(["rm", "-rf", str(out10)])
        cmd = [*pp[:4], str(big), *pp[5:]]
        cmd[cmd.index(str(out))] = str(out10)
        r10 = measure(cmd)
        m10 = json.loads((out10 / "packprep.json").read_text())
        print(f"packprep 10x: {big.stat().st_size / 1e6:.0f} MB, wall {r10['wall']:.2f}s, peak RSS "
              f"{r10['rss_mb']:.0f} MB ({r10['rss_mb'] / results['packprep']['rss_mb']:.2f}x the 1x run), "
              f"tokens {m10['counts']['tokens']:,} rows/LB {m10['packing']['rows_over_lb']:.5f} {m10['timings']}")
        subprocess.run(["rm", "-rf", str(out10)])
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
