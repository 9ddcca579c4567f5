"""Mixture benchmark (issue 11, item 5): a 50/30/20 token mixture of the three real sources, realized shares.

Sources (../shared/data): ShareGPT conversations (chat, weight 0.5, rendered by Qwen's chat template), code_alpaca
(alpaca, 0.3), gsm8k question/answer (prompt/completion, 0.2); each source's format is set in its [[sources]]
table. Tokenizer: .cache/qwen-tokenizer (benchmarks/make_qwen_tokenizer.py). Two builds: the default total (the
source that runs out first at its weight is taken whole) and a --max-tokens total that repeats the small sources.
Each build runs as `packprep build --config`, then `packprep verify`; the table is read from the manifests'
counts.sources. Target: every realized share within 0.001 (absolute) of its weight.

usage: python benchmarks/bench_mixture.py [--workers 2] [--max-tokens 13400000] [--seed 0] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench" / "mixture"
TOKENIZER = ROOT / ".cache" / "qwen-tokenizer"
SOURCES = [("sharegpt_dummy.json", 0.5, "sharegpt"), ("code_alpaca_2k.json", 0.3, "alpaca"),
           ("gsm8k_train.jsonl", 0.2, "prompt-completion")]


def config(path: Path, data: Path, seed: int, max_tokens: int | None) -> Path:
    lines = [f'tokenizer = "{TOKENIZER}"', "seq_len = 4096", f"seed = {seed}", "overwrite = true"]
    if max_tokens:
        lines.append(f"max_tokens = {max_tokens}")
    for name, weight, fmt in SOURCES:
        lines += ["", "[[sources]]", f'paths = ["{data / name}"]', f"weight = {weight}", f'format = "{fmt}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def run(name: str, data: Path, workers: int, seed: int, max_tokens: int | None) -> dict:
    out = CACHE / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh build each time (the same config would be reused)
    toml = config(CACHE / f"{name}.toml", data, seed, max_tokens)
    cmd = [sys.executable, "-m", "packprep.cli", "build", "--config", str(toml), "--out", str(out), "--workers",
           str(workers), "-q"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    subprocess.run([sys.executable, "-m", "packprep.cli", "verify", str(out)], check=True, capture_output=True)
    m = json.loads((out / "packprep.json").read_text())
    return {"name": name, "wall": wall, "counts": m["counts"], "efficiency": m["packing"]["efficiency"]}


def report(r: dict) -> float:
    c = r["counts"]
    print(f"\n{r['name']}: {c['tokens']:,} tokens, {c['rows']:,} rows, efficiency {r['efficiency']:.4f}, "
          f"build {r['wall']:.1f} s (noisy: shared machine), verify ok")
    print("| source | weight | docs (unique / input) | tokens | epochs | loss tokens | share | share - weight |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for s in c["sources"]:
        err = s["share"] - s["target_share"]
        worst = max(worst, abs(err))
        print(f"| {Path(s['paths'][0]).name} | {s['weight']} | {s['docs']:,} ({s['unique_docs']:,} / "
              f"{s['input_docs']:,}) | {s['tokens']:,} | {s['tokens'] / s['input_tokens']:.3f} | "
              f"{s['loss_tokens']:,} | {s['share']:.6f} | {err:+.2e} |")
    print(f"worst |share - weight|: {worst:.2e} (target <= 1e-3: {'met' if worst <= 1e-3 else 'NOT met'})")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)  # the time is noisy on a shared machine
    ap.add_argument("--max-tokens", type=int, default=13_400_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the real corpora's folder")
    args = ap.parse_args()
    if not TOKENIZER.is_dir():
        raise SystemExit(f"{TOKENIZER} missing: run benchmarks/make_qwen_tokenizer.py first")
    CACHE.mkdir(parents=True, exist_ok=True)
    worst = [report(run("default", args.data, args.workers, args.seed, None)),
             report(run("max_tokens", args.data, args.workers, args.seed, args.max_tokens))]
    sys.exit(0 if max(worst) <= 1e-3 else 1)


if __name__ == "__main__":
    main()
