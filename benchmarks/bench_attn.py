"""Varlen attention kernels, forward + backward, bf16: every fused backend that runs here against the fp32
per-document SDPA reference (relative error of the output and of dq, dk, dv) and timed (CUDA events, median).

Shapes: the real SFT mix cut into one 16k-token batch, and a long mix of one 32k-token row of heavy-tailed documents;
32 query heads, 8 KV heads, head_dim 128 (GQA 4:1).

    PYTHONPATH=. python benchmarks/bench_attn.py --out attn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer.varlen import available_backends, varlen_attention

HERE = Path(__file__).parent


def shapes() -> dict[str, np.ndarray]:
    sft = np.load(HERE / "data" / "sft_lengths_qwen.npy").astype(np.int64)
    cut = np.searchsorted(np.cumsum(sft), 16384, side="right")
    rng = np.random.default_rng(0)
    long = np.clip(rng.lognormal(np.log(1500), 1.4, 64).astype(np.int64), 16, 32768)
    long = long[: np.searchsorted(np.cumsum(long), 32768, side="right")]
    return {"sft_16k": sft[:cut], "long_32k": long}


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    backends = [b for b in available_backends("cuda", torch.bfloat16) if b != "sdpa"]
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(),
               "backends": backends, "shapes": {}}
    for name, lens in shapes().items():
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
        T, mx = int(cu[-1]), int(lens.max())
        g = torch.Generator(device="cuda").manual_seed(T)
        q32 = torch.randn(T, args.heads, args.dim, device="cuda", generator=g, requires_grad=True)
        k32 = torch.randn(T, args.kv_heads, args.dim, device="cuda", generator=g, requires_grad=True)
        v32 = torch.randn(T, args.kv_heads, args.dim, device="cuda", generator=g, requires_grad=True)
        dout = torch.randn(T, args.heads, args.dim, device="cuda", generator=g)
        ref = varlen_attention(q32, k32, v32, cu, mx, backend="sdpa")
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout)
        row = {"tokens": T, "docs": len(lens), "max_len": mx}
        for backend in backends:
            q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q32, k32, v32))
            out = varlen_attention(q, k, v, cu, mx, backend=backend)
            grads = torch.autograd.grad(out, (q, k, v), dout.bfloat16())
            errs = {"out": rel(out, ref), **{f"d{n}": rel(a, b) for n, a, b in zip("qkv", grads, ref_grads)}}

            def fwd_bwd():
                o = varlen_attention(q, k, v, cu, mx, backend=backend)
                torch.autograd.grad(o, (q, k, v), dout.bfloat16())

            row[backend] = {"fwd_bwd_ms": bench(fwd_bwd), "rel_err": errs}
            print(name, backend, json.dumps(row[backend]), flush=True)
        if "fa4" in row and "torch" in row:
            row["fa4_speedup_over_torch"] = row["torch"]["fwd_bwd_ms"] / row["fa4"]["fwd_bwd_ms"]
        results["shapes"][name] = row
    print(json.dumps(results), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
