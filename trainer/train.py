"""The training loop: packed varlen batches -> any HF causal LM, AdamW + warmup/cosine, DDP, exact resume.

Reads top to bottom: set up ranks -> open the build (PackedShards checks its manifest and shard sizes) -> build and
check the model against the build's tokenizer -> optimizer, schedule, checkpoint -> steps -> final checkpoint. The
parts live beside it: config.py (TrainConfig), data.py (the loader), model.py, loss.py, optim.py, checkpoint.py.

Loss = (sum of token losses over every micro-batch of every rank) / (global count of loss tokens), so gradient
accumulation and data parallelism give the gradient of one big batch: the loss-token count is all-reduced before
any backward (one scalar all-reduce per step), and each micro-batch's summed loss is divided by it (times the world
size, which DDP's gradient averaging divides back out).

Costs per step: the model's forward/backward over `batch_tokens * grad_accum` tokens per rank, one host sync (the
logged loss), two scalar all-reduces; the loader assembles a batch with one copy of its tokens. With `compile`, the
first step also compiles the decoder (tens of seconds). Run data-parallel with torchrun: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, PackedShards, VarlenBatch
from trainer.loss import CausalLMLoss, loss_sum
from trainer.model import build_model, model_inputs, num_params
from trainer.optim import make_optimizer, make_scheduler
from trainer.varlen import resolve_backend

__all__ = ["TrainConfig", "train", "train_step", "step_flops", "PEAK_FLOPS"]

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}  # dense bf16


def train(cfg: TrainConfig, echo=print) -> list[dict]:
    """Run training; returns the logged metrics of rank 0 (one dict per logged step)."""
    rank, world, device = _setup_distributed(cfg.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    say = echo if rank == 0 else (lambda *a, **k: None)
    ds = PackedShards(cfg.shards, cfg.batch_tokens, seed=cfg.seed, rank=rank, world_size=world,
                      verify=cfg.verify_shards, static=cfg.compile, balance=cfg.balance,
                      balance_alpha=cfg.balance_alpha, balance_window=cfg.balance_window)
    if ds.num_batches() == 0:
        raise ValueError(f"{cfg.shards} yields no batch per rank ({ds.num_rows} rows, {world} ranks)")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.attn, shards=ds)  # sized from / checked against the build's tokenizer
    model.to(device).train()
    backend = resolve_backend(cfg.attn, device, torch.bfloat16 if bf16 else torch.float32)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    step = 0
    ckpt = Path(cfg.ckpt) if cfg.ckpt else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        state = load_checkpoint(ckpt, world)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ds.load_state_dict(state["loader"][rank])
        step = state["step"]
        say(f"resumed from {ckpt / 'last.pt'} at step {step}")
    if cfg.compile:
        model.get_decoder().compile()  # in place: state dict names unchanged; static shapes, so compiled once
    net = CausalLMLoss(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.index is not None
                                                        else None)
    n_params = num_params(model)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    say(f"model {cfg.model}: {n_params / 1e6:.1f}M params (non-embedding), attention {backend}, "
        f"{'bf16' if bf16 else 'fp32'}, {device}, {world} rank(s){', compiled' if cfg.compile else ''}; data "
        f"{ds.num_rows} rows, {ds.num_tokens} tokens, {ds.num_batches()} batches/rank/epoch"
        f"{', balanced' if cfg.balance else ''}")
    if cfg.balance and world > 1:
        say(_imbalance_line(ds))
    batches = _stream(ds)
    metrics: list[dict] = []

    def save():
        loaders = [None] * world
        if world > 1:
            dist.all_gather_object(loaders, ds.state_dict())
        else:
            loaders = [ds.state_dict()]
        if rank == 0:
            save_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, loaders=loaders, step=step,
                            config=dataclasses.asdict(cfg))

    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    while step < last:
        t0 = time.perf_counter()
        micro, tokens, flops = [], 0, 0.0
        for _ in range(cfg.grad_accum):
            b = next(batches)
            tokens += b.num_tokens - b.filler  # real tokens (a static batch's filler document is not counted)
            flops += step_flops(model, b, n_params)
            b = b.to(device)
            micro.append((model_inputs(b, compiled=cfg.compile), b.labels.unsqueeze(0)))
        t_data = time.perf_counter() - t0
        out = train_step(net, optimizer, micro, device=device, bf16=bf16, grad_clip=cfg.grad_clip)
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        m = {"step": step, "loss": out["loss"], "lr": scheduler.get_last_lr()[0], "tokens": tokens * world,
             "tok_s": tokens * world / dt, "fill": tokens / (cfg.batch_tokens * cfg.grad_accum),
             "loss_frac": out["loss_tokens"] / (tokens * world), "data_s": t_data, "step_s": dt}
        if peak:
            m["mfu"] = flops / dt / peak
        if step % cfg.log_every == 0 or step == last:
            metrics.append(m)
            say(f"step {step:>6} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | {m['tok_s']:,.0f} tok/s | "
                f"fill {m['fill']:.1%} | loss tokens {m['loss_frac']:.1%}"
                + (f" | mfu {m['mfu']:.1%}" if "mfu" in m else "") + f" | {dt * 1e3:.0f} ms")
        if ckpt is not None and ((cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == last):
            save()
    if world > 1:
        dist.barrier()
    return metrics


def train_step(model, optimizer, micro: list[tuple[dict, torch.Tensor]], *, device: torch.device, bf16: bool,
               grad_clip: float = 1.0) -> dict:
    """One optimizer step over this rank's micro-batches [(model kwargs, labels), ...] (already on `device`).

    Returns {"loss": global mean loss over loss tokens, "loss_tokens": global count}. The caller steps the scheduler.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    count = torch.tensor(float(sum(int((y[..., 1:] != IGNORE_INDEX).sum()) for _, y in micro)), device=device)
    if world > 1:
        dist.all_reduce(count)
    denom = count.clamp(min=1.0) / world  # DDP averages gradients over ranks: undo it
    total = torch.zeros((), device=device)
    for i, (inputs, labels) in enumerate(micro):
        sync = i == len(micro) - 1 or world == 1
        ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            part = loss_sum(model, inputs, labels)
        (part / denom).backward()
        total += part.detach()
    if world > 1:
        dist.all_reduce(total)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(total / count.clamp(min=1.0)), "loss_tokens": int(count)}


def step_flops(model, batch: VarlenBatch, params: int | None = None) -> float:
    """Training FLOPs of one batch: 6 N per token (N: non-embedding parameters) plus the attention matmuls, fwd + bwd:
    12 * layers * heads * head_dim per (query, key) pair, causal: l^2 / 2 pairs per document of length l."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).double()
    pairs = float((lens * lens).sum()) / 2
    n = num_params(model) if params is None else params
    return 6 * n * batch.num_tokens + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * pairs


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def _imbalance_line(ds: PackedShards) -> str:
    """The epoch's per-step max/mean rank cost, rows dealt by tokens against the balanced plan."""
    from trainer.balance import step_imbalance, token_plan

    order, bounds = ds._plan(ds.epoch)
    base = np.random.default_rng([ds.seed, ds.epoch]).permutation(ds.num_rows)
    costs = ds.row_costs()
    before = step_imbalance(base, token_plan(ds.row_lengths[base], ds.batch_tokens), costs, ds.world_size)
    after = step_imbalance(order, bounds, costs, ds.world_size)
    return (f"balance: rank cost max/mean per step {before.mean():.3f} dealt by tokens -> {after.mean():.3f} "
            f"balanced (worst step {before.max():.3f} -> {after.max():.3f}; alpha {ds.balance_alpha:g})")


def _stream(ds: PackedShards):
    """Batches forever: the rest of the current epoch, then whole epochs."""
    while True:
        yield from ds
