"""Compute-balanced steps at long context: per-row costs measured on the GPU, simulated and (under torchrun) real
data-parallel step times, token-balanced against `PackedShards(balance=True)`.

Corpus: heavy-tailed documents (lognormal, median ~1.5k tokens, tail clipped at 32k), packprep ffd rows of 32,768
tokens, random ids. One row per rank per step (batch_tokens = seq_len).
1. calibrate (rank 0): fwd+bwd time of `--calib` rows (and of half-rows, so tokens vary), least squares
   cost_ms = c0 + c1*tokens + c2*sum(l^2); alpha = c1 / c2 is the token cost in (query, key) pairs. Reports the fit's
   median relative error and the attention share of a mean row.
2. simulate: with the fitted costs of every row, the max/mean rank cost per step at 2, 4 and 8 ranks, rows dealt as
   they come (token-balanced) against the balanced plan; step-time gain = mean(max) / mean(max).
3. run (world > 1): `--steps` steps each way; per rank, local fwd+bwd time (CUDA-synchronised, gradients not yet
   synced), the wait at the gradient all-reduce, and the step time. Gradients are all-reduced after the backward
   (no overlap) so that the wait is measured, not hidden.

    torchrun --nproc_per_node=2 benchmarks/bench_balance.py --attn fa4 --out balance.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_shards  # noqa: E402

from trainer import PackedShards, build_model, model_inputs  # noqa: E402
from trainer.balance import balanced_plan, step_imbalance, token_plan  # noqa: E402
from trainer.loss import CausalLMLoss  # noqa: E402
from trainer.optim import make_optimizer  # noqa: E402


def long_mix(seq_len: int, rows: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(1500), 1.4, rows * 16).astype(np.int64), 16, seq_len)
    keep = np.searchsorted(np.cumsum(lengths), rows * seq_len * 0.97)  # ~`rows` full rows after ffd
    return [rng.integers(1, 32000, n).astype(np.int32) for n in lengths[:keep].tolist()]


def step_time(net, opt, batch, device, sync_grads: bool, world: int) -> tuple[float, float, float]:
    """(compute s, wait s, step s): fwd+bwd, then the all-reduce of a scalar (the wait for the slowest rank), then
    the gradient all-reduce and the optimizer step."""
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = net(model_inputs(batch), batch.labels[None])
    (loss / max(1, batch.num_loss_tokens())).backward()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    if sync_grads:
        flag = torch.ones((), device=device)
        dist.all_reduce(flag)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        torch.cuda.synchronize()
    else:
        t2 = t1
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return t1 - t0, t2 - t1, time.perf_counter() - t0


def calibrate(ds: PackedShards, net, opt, device, n: int) -> dict:
    rng = np.random.default_rng(1)
    rows = rng.choice(ds.num_rows, n, replace=False)
    samples = []
    for i, r in enumerate(rows.tolist()):
        full = ds.batch(np.array([r]))
        variants = [full]
        if i % 2:  # half the rows also as their first documents only: token counts vary
            cu = full.cu_seqlens.numpy()
            k = max(1, int(np.searchsorted(cu, cu[-1] // 2)))
            from trainer.data import make_varlen_batch

            variants.append(make_varlen_batch(full.input_ids.numpy()[: cu[k]], cu[: k + 1],
                                              np.ones(cu[k]), np.array([0, cu[k]])))
        for b in variants:
            g = b.to(device)
            step_time(net, opt, g, device, False, 1)  # warm
            t = min(step_time(net, opt, g, device, False, 1)[0] for _ in range(2))
            lens = np.diff(b.cu_seqlens.numpy()).astype(np.float64)
            samples.append((b.num_tokens, float((lens**2).sum()), t * 1e3))
    x = np.array(samples)
    a = np.stack([np.ones(len(x)), x[:, 0], x[:, 1]], 1)
    coef, *_ = np.linalg.lstsq(a, x[:, 2], rcond=None)
    pred = a @ coef
    err = np.abs(pred - x[:, 2]) / x[:, 2]
    attn_share = coef[2] * x[:, 1].mean() / pred.mean()
    return {"c0_ms": coef[0], "c1_ms_per_token": coef[1], "c2_ms_per_pair": coef[2], "alpha": coef[1] / coef[2],
            "fit_median_rel_err": float(np.median(err)), "fit_max_rel_err": float(err.max()),
            "row_ms_min": float(x[:, 2].min()), "row_ms_median": float(np.median(x[:, 2])),
            "row_ms_max": float(x[:, 2].max()), "attention_share_of_mean_row": float(attn_share), "samples": len(x)}


def simulate(ds: PackedShards, cal: dict, window: int) -> dict:
    ms = cal["c0_ms"] + cal["c1_ms_per_token"] * ds.row_lengths + cal["c2_ms_per_pair"] * ds.row_sq
    alpha_cost = cal["alpha"] * ds.row_lengths + ds.row_sq
    out = {}
    for world in (2, 4, 8):
        rng = np.random.default_rng([0, 0])
        order = rng.permutation(ds.num_rows)
        tok = step_imbalance(order, token_plan(ds.row_lengths[order], ds.batch_tokens), ms, world)
        o, b = balanced_plan(order, ds.row_lengths, alpha_cost, ds.batch_tokens, world, window, rng)
        bal = step_imbalance(o, b, ms, world)

        def mean_max(order, bounds):
            per = np.add.reduceat(ms[order], bounds[:-1])
            return per[: len(per) // world * world].reshape(-1, world).max(1).mean()

        out[world] = {"token_imbalance_mean": float(tok.mean()), "balanced_imbalance_mean": float(bal.mean()),
                      "balanced_imbalance_p99": float(np.percentile(bal, 99)),
                      "step_time_gain": float(mean_max(order, token_plan(ds.row_lengths[order], ds.batch_tokens))
                                              / mean_max(o, b))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--model", default="small")
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--calib", type=int, default=24)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl")
    folder = Path(tempfile.gettempdir()) / f"bench_balance_{args.seq_len}_{args.rows}"
    if rank == 0 and not (folder / "packprep.json").exists():
        folder.mkdir(exist_ok=True)
        write_shards(folder, long_mix(args.seq_len, args.rows), args.seq_len, 32000)
    if world > 1:
        dist.barrier()
    ds = PackedShards(folder, args.seq_len, balance=True, rank=rank, world_size=world, balance_window=args.window)
    torch.manual_seed(0)
    model = build_model(args.model, args.attn, shards=ds).to(device).train()
    net = CausalLMLoss(model)
    opt = make_optimizer(model, lr=1e-5, weight_decay=0.0)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(),
              "world": world, "model": args.model, "attn": args.attn, "seq_len": args.seq_len, "rows": ds.num_rows,
              "mean_row_tokens": float(ds.row_lengths.mean()), "command": " ".join(sys.argv)}
    if rank == 0:
        report["calibration"] = cal = calibrate(ds, net, opt, device, args.calib)
        print(json.dumps(cal), flush=True)
        report["simulated"] = simulate(ds, cal, args.window)
        print(json.dumps(report["simulated"]), flush=True)
        alpha = [cal["alpha"]]
    else:
        alpha = [None]
    if world > 1:
        dist.broadcast_object_list(alpha)
        runs = {}
        for mode in ("token", "balanced"):
            loader = PackedShards(folder, args.seq_len, rank=rank, world_size=world, balance=mode == "balanced",
                                  balance_alpha=max(0.0, float(alpha[0])), balance_window=args.window)
            it = iter(loader)
            times = []
            for step in range(args.steps + 3):
                t = step_time(net, opt, next(it).to(device), device, True, world)
                if step >= 3:
                    times.append(t)
            gathered = [None] * world
            dist.all_gather_object(gathered, times)
            step_s = [statistics.mean(t[2] for t in g) for g in gathered]
            runs[mode] = {"step_ms_mean": 1e3 * float(np.mean(step_s)),
                          "compute_ms_mean_per_rank": [1e3 * statistics.mean(t[0] for t in g) for g in gathered],
                          "wait_ms_mean_per_rank": [1e3 * statistics.mean(t[1] for t in g) for g in gathered],
                          "imbalance_mean": float(np.mean([max(c) / np.mean(c) for c in zip(
                              *[[t[0] for t in g] for g in gathered])]))}
            if rank == 0:
                print(mode, json.dumps(runs[mode]), flush=True)
        if rank == 0:
            runs["speedup"] = runs["token"]["step_ms_mean"] / runs["balanced"]["step_ms_mean"]
            report["ddp"] = runs
            print(json.dumps({"ddp_speedup": runs["speedup"]}), flush=True)
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=float))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
