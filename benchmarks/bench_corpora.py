"""Real-corpus inputs and outputs (issue 11): a .zst input vs the same JSONL uncompressed, and S3 (a local moto server)
inputs + output vs local, with the same data bytes required of each pair.

- zst: benchmarks/bench_build.py's 10x corpus (~133.6M Qwen tokens, .cache/bench/sft_10x.jsonl) compressed as zstd
  frames of ~1 MB cut at line ends (what chunked writers produce; packprep cuts tasks between them). Target: <= 1.1x.
- s3: the 1x corpus (~13.4M tokens) in a bucket of moto's standalone server on 127.0.0.1, built with --out
  s3://bench/... (local work folder, shards uploaded as they finish) vs a local build. Target: <= 1.2x.
Variants alternate within each round (A B A B ...), so a shared, noisy machine hurts both alike; medians are
reported. Each build is one `packprep build` command, timed by bench_build.measure.

usage: python benchmarks/bench_corpora.py [--rounds 2] [--workers 2] [--only zst|s3] [--zst-scale 10]
    python benchmarks/bench_corpora.py --only s3     # the S3 pair: 1x corpus (13.4M tokens), 2 rounds, ~4 builds
    python benchmarks/bench_corpora.py --only zst    # the zst pair: 10x corpus (133.6M tokens), 2 rounds, ~4 builds
Prints one line per build and a summary with the ratio and the target; the moto server's request log is silenced.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import SEQ_LEN, TOKENIZER, make_corpus, measure  # noqa: E402

FRAME = 1 << 20


def zst_copy(src: Path) -> Path:
    """src as zstd frames of ~FRAME bytes each ending at a line end (written once, next to src)."""
    import pyarrow as pa

    dst = src.with_name(src.name + ".zst")
    if dst.exists():
        return dst
    codec, tmp = pa.Codec("zstd", compression_level=3), dst.with_suffix(".tmp")
    with open(src, "rb") as f, open(tmp, "wb") as out:
        carry = b""
        while block := f.read(FRAME):
            buf = carry + block
            end = buf.rfind(b"\n") + 1
            out.write(codec.compress(buf[:end], asbytes=True))
            carry = buf[end:]
        if carry:
            out.write(codec.compress(carry, asbytes=True))
    tmp.replace(dst)
    return dst


def digests(files: dict[str, bytes]) -> str:
    return hashlib.sha256(b"".join(hashlib.sha256(v).digest() for _, v in sorted(files.items()))).hexdigest()


def local_digest(out: Path) -> str:
    return digests({p.name: p.read_bytes() for p in out.glob("data-*.arrow")})


def build_cmd(inputs: str, out: str, workers: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "packprep.cli", "build", inputs, "--out", out, "--tokenizer", str(TOKENIZER),
            "--seq-len", str(SEQ_LEN), "--workers", str(workers), "-q", *extra]


def run_pairs(name: str, variants: dict, rounds: int) -> dict:
    """variants: label -> (cmd, env, digest_fn, cleanup_fn); returns label -> [wall seconds]."""
    walls = {k: [] for k in variants}
    seen = {}
    for r in range(rounds):
        for label, (cmd, env, digest, cleanup) in variants.items():
            cleanup()
            res = measure(cmd, env)
            walls[label].append(res["wall"])
            seen.setdefault(label, digest())
            print(f"  {name} round {r + 1}: {label:<12} {res['wall']:7.1f} s  peak RSS {res['rss_mb']:.0f} MB",
                  flush=True)
    same = len(set(seen.values())) == 1
    return {"walls": walls, "same_bytes": same}


def bench_zst(workers: int, rounds: int, tmp: Path, scale: int = 10) -> dict:
    src = make_corpus(scale)
    zst = zst_copy(src)
    print(f"zst: {src.name} {src.stat().st_size / 1e6:.0f} MB, {zst.name} {zst.stat().st_size / 1e6:.0f} MB")
    outs = {k: tmp / f"zst-{k}" for k in ("jsonl", "jsonl.zst")}
    variants = {k: (build_cmd(str(p), str(outs[k]), workers), None, lambda o=outs[k]: local_digest(o),
                    lambda o=outs[k]: shutil.rmtree(o, ignore_errors=True))
                for k, p in (("jsonl", src), ("jsonl.zst", zst))}
    return run_pairs("zst", variants, rounds)


def bench_s3(workers: int, rounds: int, tmp: Path) -> dict:
    import s3fs
    from moto.server import ThreadedMotoServer

    src = make_corpus(1)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    try:
        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="bench", secret="bench")
        fs.mkdir("bench")
        fs.put_file(str(src), "bench/in/" + src.name)
        print(f"s3: {src.name} {src.stat().st_size / 1e6:.0f} MB uploaded to moto at {env['AWS_ENDPOINT_URL']}")
        local_out = tmp / "s3-local"

        def remote_digest():
            return digests({p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.glob("bench/out/data-*")})

        def remote_clean():
            fs.invalidate_cache()
            if fs.exists("bench/out"):
                fs.rm("bench/out", recursive=True)

        variants = {
            "local": (build_cmd(str(src), str(local_out), workers), None, lambda: local_digest(local_out),
                      lambda: shutil.rmtree(local_out, ignore_errors=True)),
            "s3": (build_cmd(f"s3://bench/in/{src.name}", "s3://bench/out", workers, "--work-dir",
                             str(tmp / "s3-work")), env, remote_digest, remote_clean),
        }
        return run_pairs("s3", variants, rounds)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["zst", "s3"])
    ap.add_argument("--zst-scale", type=int, default=10, help="corpus of the zst pair (10: ~133.6M tokens)")
    args = ap.parse_args()
    if not TOKENIZER.exists():
        raise SystemExit(f"{TOKENIZER} missing: run python benchmarks/make_qwen_tokenizer.py first")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-corpora-") as tmp:
        if args.only in (None, "zst"):
            zst = bench_zst(args.workers, args.rounds, Path(tmp), args.zst_scale)
            results["zst"] = (zst, "jsonl", "jsonl.zst", 1.1)
        if args.only in (None, "s3"):
            results["s3"] = (bench_s3(args.workers, args.rounds, Path(tmp)), "local", "s3", 1.2)
    print(f"\nsummary ({args.rounds} interleaved rounds, --workers {args.workers}, medians; on a shared machine "
          "the figures are noisy)")
    for name, (res, base, variant, target) in results.items():
        a, b = statistics.median(res["walls"][base]), statistics.median(res["walls"][variant])
        print(f"  {name:<4} {base} {a:7.1f} s   {variant} {b:7.1f} s   ratio {b / a:.3f}x (target <= {target}x)   "
              f"same data bytes: {'yes' if res['same_bytes'] else 'NO'}")
    if not all(res["same_bytes"] for res, *_ in results.values()):
        raise SystemExit("the variants wrote different data bytes")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
