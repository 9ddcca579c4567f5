"""Loss memory benchmark: full logits + cross-entropy vs trainer.loss.CausalLMLoss (logits only at loss positions,
chunked, each chunk's gradients computed in the forward pass: no logits are recomputed in backward), same model, same
packed batch, same weights.

For each vocabulary size: peak GPU memory of a training step (forward + backward + AdamW step), the mean step time
after a warm-up, and the loss of both paths on the first step (they must agree). Half of the tokens carry loss (a
typical SFT prompt/completion split).

usage: python benchmarks/bench_loss.py [--vocabs 32000,151936] [--batch-tokens 16384] [--model small] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.data import make_varlen_batch  # noqa: E402
from trainer.loss import CausalLMLoss  # noqa: E402
from trainer.model import build_model, model_inputs  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402
from trainer.train import train_step  # noqa: E402


def run(vocab: int, mode: str, args, device) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, args.attn, vocab_size=vocab).to(device).train()
    net = CausalLMLoss(model)
    if mode == "full":
        net.head = None  # the plain path: full [tokens, vocab] logits, then cross-entropy
    opt = make_optimizer(model, 1e-4, 0.0)
    rng = np.random.default_rng(0)
    lens = rng.integers(50, 600, 200)
    cu = np.concatenate([[0], np.cumsum(lens)])
    cu = cu[cu <= args.batch_tokens]
    n = int(cu[-1])
    tokens = rng.integers(1, vocab, n)
    mask = np.zeros(n)
    for a, b in zip(cu[:-1], cu[1:]):  # second half of each document carries loss
        mask[(a + b) // 2 : b] = 1
    batch = make_varlen_batch(tokens, cu, mask, np.array([0, n])).to(device)
    micro = [(model_inputs(batch), batch.labels[None])]
    cuda = device.type == "cuda"
    losses, times = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        out = train_step(net, opt, micro, device=device, bf16=cuda, grad_clip=1.0)
        if cuda:
            torch.cuda.synchronize()
        losses.append(out["loss"])
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model, net, opt
    if cuda:
        torch.cuda.empty_cache()
    return {"vocab": vocab, "mode": mode, "tokens": n, "loss_tokens": int(mask.sum()), "first_loss": losses[0],
            "peak_gib": peak, "step_s": float(np.mean(times))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="32000,151936")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--model", default="small")
    ap.add_argument("--attn", default="torch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        pair = [run(vocab, mode, args, device) for mode in ("full", "chunked")]
        rows += pair
        full, chunked = pair
        print(f"vocab {vocab:>7,}: {full['tokens']:,} tokens ({full['loss_tokens']:,} with loss) | full logits: "
              f"peak {full['peak_gib']:.2f} GiB, {full['step_s'] * 1e3:.0f} ms/step | chunked: peak "
              f"{chunked['peak_gib']:.2f} GiB, {chunked['step_s'] * 1e3:.0f} ms/step | first loss "
              f"{full['first_loss']:.5f} vs {chunked['first_loss']:.5f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
