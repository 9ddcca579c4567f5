"""Two versions of packprep on the same corpus, in one run: build wall time (interleaved rounds) and shard sha256.

Used for "byte-identical and no slower" checks across a change (issue 9: before/after the redesign) and for "how much
faster than the build we had" (issue 10). Each version is a source tree (a git worktree of a commit) run with
PYTHONPATH=TREE; the raw HF tokenizer program of bench_build.py runs in the same rounds as the baseline a user would
compare against.

Every build starts with an empty packprep cache folder (PACKPREP_CACHE, `packprep.cache`: the auto backend's verdict
and the tiktoken rank table), so each one pays what a first build pays; --warm-cache shares one folder across all
builds instead (a rebuild or a second build of the same corpus and tokenizer).

usage: git worktree add --detach /tmp/v0 71937d8
       python benchmarks/bench_versions.py --version before=/tmp/v0 --version after=. [--scale 10] [--rounds 2]
           [--extra "after=--tokenizer-backend tiktoken"] [--warm-cache] [--json out.json]
       (the same tree may appear twice under two names with different --extra flags)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_build as bb  # noqa: E402  (corpus, tokenizer and the measuring probe live there)


def build(tree: Path, corpus: Path, out: Path, workers: int, extra: list[str], cache: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "packprep.cli", "build", str(corpus), "--tokenizer", str(bb.TOKENIZER), "--seq-len",
           str(bb.SEQ_LEN), "--out", str(out), "--workers", str(workers), "--overwrite", "-q", *extra]
    subprocess.run(["rm", "-rf", str(out)])
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    probe = subprocess.run([sys.executable, "-c", "import packprep; print(packprep.__file__)"], env=env,
                           capture_output=True, text=True, cwd="/").stdout.strip()
    assert probe.startswith(str(tree.resolve())), f"PYTHONPATH={tree} imports packprep from {probe}"
    fresh = None if cache else tempfile.mkdtemp(prefix="packprep-cache-")
    res = bb.measure(cmd, env={"PYTHONPATH": str(tree.resolve()), "PACKPREP_CACHE": cache or fresh})
    if fresh:
        shutil.rmtree(fresh, ignore_errors=True)
    manifest = json.loads((out / "packprep.json").read_text())
    res["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("data-*.arrow"))}
    res["tokens"] = manifest["counts"]["tokens"]
    res["timings"] = manifest.get("timings")
    res["backend"] = {k: manifest["tokenizer"].get(k) for k in ("backend", "backend_reason")}
    res.pop("out"), res.pop("err")
    subprocess.run(["rm", "-rf", str(out)])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", action="append", required=True, help="NAME=TREE (a source tree with packprep/)")
    ap.add_argument("--scale", type=int, default=1, help="corpus size in multiples of 13.4M tokens")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--no-raw", action="store_true", help="skip the raw HF tokenizer program")
    ap.add_argument("--extra", action="append", default=[], help="NAME=FLAGS: extra build flags for one version")
    ap.add_argument("--warm-cache", action="store_true", help="one packprep cache folder for all builds (default: "
                    "an empty one per build)")
    ap.add_argument("--json")
    a = ap.parse_args()
    versions = {n: str(Path(t).resolve()) for n, t in (v.split("=", 1) for v in a.version)}  # before the chdir
    a.json = a.json and str(Path(a.json).resolve())
    os.chdir(tempfile.gettempdir())  # `python -m` puts the working directory first on sys.path, before PYTHONPATH
    extras = dict(e.split("=", 1) for e in a.extra)
    corpus = bb.make_corpus(a.scale)
    if not (bb.TOKENIZER / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(bb.ROOT / "benchmarks" / "make_qwen_tokenizer.py")], check=True)
    print(f"uptime: {bb.uptime()}\ncorpus {corpus.name} ({corpus.stat().st_size / 1e6:.0f} MB), workers {a.workers}")
    runs: dict[str, list] = {name: [] for name in versions}
    runs["raw-hf-tokenizer"] = []
    cache = tempfile.mkdtemp(prefix="packprep-cache-") if a.warm_cache else None
    for rnd in range(a.rounds):
        for name, tree in versions.items():
            extra = shlex.split(extras.get(name, ""))
            r = build(Path(tree), corpus, bb.CACHE / f"out_versions_{name}", a.workers, extra, cache)
            runs[name].append(r)
            print(f"  round {rnd} {name:>8}: wall {r['wall']:7.2f}s  peak RSS {r['rss_mb']:5.0f} MB  "
                  f"tokens {r['tokens']:,}  {r['timings']}", flush=True)
        if not a.no_raw:
            x = bb.raw_tokenizer(corpus, a.workers, ("processes",))["processes"]
            runs["raw-hf-tokenizer"].append(x)
            print(f"  round {rnd} raw HF tokenizer program ({a.workers} processes): wall {x['wall']:.2f}s "
                  f"(encode {x['seconds']:.2f}s, {x['tokens']:,} tokens)", flush=True)
    print("summary (best wall of the rounds):")
    best = {n: min(r["wall"] for r in rs) for n, rs in runs.items() if rs}
    for n, w in best.items():
        print(f"  {n:>16}: {w:7.2f}s")
    names = list(versions)
    for n in names[1:]:
        print(f"  {names[0]} / {n}: {best[names[0]] / best[n]:.2f}x")
        same = runs[n][0]["sha256"] == runs[names[0]][0]["sha256"]
        print(f"  shards {n} vs {names[0]}: {'IDENTICAL' if same else 'DIFFERENT'}")
    for n in names:
        print(f"  sha256 {n}: {runs[n][0]['sha256']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"uptime": bb.uptime(), "corpus": str(corpus), "workers": a.workers,
                                            "cache": "warm" if cache else "cold", "best_wall": best, "runs": runs},
                                           indent=1))
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
