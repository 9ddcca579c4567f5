"""The training loop: packed varlen batches -> any HF causal LM, AdamW + warmup/cosine, DDP, exact resume.

Loss = (sum of token losses over every micro-batch of every rank) / (global count of loss tokens), so gradient
accumulation and data parallelism give the gradient of one big batch: the loss-token count is all-reduced before
any backward (one scalar all-reduce per step), and each micro-batch's summed loss is divided by it (times the world
size, which DDP's gradient averaging divides back out). Checkpoints hold model, optimizer, scheduler, every rank's
loader state and the step; `resume` continues with the same batches, and on CPU in fp32 the same losses.

Costs per step: the model's forward/backward over `batch_tokens * grad_accum` tokens per rank, one host sync (the
logged loss), two scalar all-reduces; the loader assembles a batch with one copy of its tokens (well under 1% of a
GPU step, benchmarks/bench_train.py). Run data-parallel with torchrun: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from packprep.config import check_types, setting
from packprep.shards import atomic_file
from trainer.data import IGNORE_INDEX, PackedShards
from trainer.model import PRESETS, build_model, model_inputs, num_params
from trainer.varlen import BACKENDS, resolve_backend

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12}  # dense bf16


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: shards -> model -> optimizer steps (each field is a `packprep train` option)."""

    shards: str = setting(doc="packprep output folder (the `packprep build` output) to train on.")
    model: str = setting("tiny", """'tiny' / 'small' (Llama-style, random weights, vocabulary sized to the shards), a
        local model folder, or a hub name.""")
    steps: int = setting(100, "Optimizer steps to run in total (a resumed run continues up to this step).")
    batch_tokens: int = setting(8192, """Token budget of one micro-batch per rank (rows are added while the batch
        stays within it; >= seq_len).""")
    grad_accum: int = setting(1, "Micro-batches per optimizer step on each rank.")
    lr: float = setting(3e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = setting(10, "Linear warmup steps; cosine decay to 10% of lr afterwards.")
    weight_decay: float = setting(0.1, "AdamW weight decay (not applied to biases and norms).")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value (0: off).")
    device: Device = setting("auto", "cpu, cuda, or auto (cuda when available).")
    attn: str = setting("auto", "Attention backend: auto, flash_attn, torch, sdpa.")
    bf16: bool | None = setting(None, "bf16 autocast (default: on for cuda, off for cpu).")
    seed: int = setting(0, "Seed of the data order and of the preset models' initial weights.")
    ckpt: str | None = setting(None, """Checkpoint folder (last.pt is written there every ckpt_every steps and at the
        end); none: no checkpoints.""")
    ckpt_every: int = setting(0, "Steps between checkpoints (0: only at the end).")
    resume: bool = setting(False, "Continue from <ckpt>/last.pt.")
    stop_at: int = setting(0, """Stop after this step (0: at `steps`), checkpointing there; the schedule still spans
        `steps` (for jobs cut into time-limited pieces).""")
    log_every: int = setting(1, "Steps between log lines.")

    def __post_init__(self):
        check_types(self)
        positive = {"steps": self.steps, "batch_tokens": self.batch_tokens, "grad_accum": self.grad_accum,
                    "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        for name in ("warmup_steps", "ckpt_every", "stop_at", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.attn not in BACKENDS:
            raise ValueError(f"attn={self.attn!r}: choose one of {', '.join(BACKENDS)}")
        if self.resume and not self.ckpt:
            raise ValueError("--resume needs --ckpt DIR (the folder holding last.pt)")


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warmup to 1, then cosine to `floor` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


LOSS_CHUNK_ELEMENTS = 1 << 26  # logits computed at once: 67M fp32 values = 256 MiB (2,097 tokens at a 32k vocab)...
LOSS_CHUNK_MIN_TOKENS = 2048  # ...but never fewer tokens than this: smaller matmuls cost speed (H100, 151k vocab:
# 441-token chunks 255 ms a step, 1,771-token chunks 232 ms)


class CausalLMLoss(torch.nn.Module):
    """An HF causal LM and its summed next-token loss in one forward (the module DDP wraps, so the gradient sync
    sees every parameter use).

    Logits are computed only at positions that carry loss, `LOSS_CHUNK_ELEMENTS / vocab` tokens (at least
    `LOSS_CHUNK_MIN_TOKENS`) at a time, and each chunk's gradients (w.r.t. the hidden states, the head's weight and
    bias) are computed right there, in the forward pass (`_LinearCrossEntropy`): the full [tokens, vocab] fp32
    tensor never exists (at a 151k vocabulary and 16k tokens it alone is ~10 GB, x2 with its gradient) and no logits
    are recomputed in backward. Models whose head is not a plain Linear on the decoder's last hidden state (logit
    soft-capping or scaling) take the plain path: full logits, then cross-entropy.
    """

    def __init__(self, model: torch.nn.Module, chunk_elements: int = LOSS_CHUNK_ELEMENTS,
                 min_chunk_tokens: int = LOSS_CHUNK_MIN_TOKENS):
        super().__init__()
        self.model = model
        self.head = _plain_head(model)
        self.chunk = max(min_chunk_tokens, chunk_elements // model.get_input_embeddings().weight.shape[0], 1)

    def forward(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss; labels unshifted (HF convention), same leading shape as input_ids ([1, T] or [B, L])."""
        y = labels[..., 1:].flatten()
        if self.head is None:
            logits = self.model(**inputs).logits
            return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), y, ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        h = hidden[..., :-1, :].flatten(0, -2)
        keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
        return _LinearCrossEntropy.apply(h.index_select(0, keep), self.head.weight, self.head.bias,
                                         y.index_select(0, keep), self.chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(h_i W^T + b, y_i), chunk by chunk, with its gradients computed in the same pass.

    Per chunk: logits (matmul in the autocast dtype, softmax in fp32), the loss, dlogits = softmax - onehot (cast
    to the matmul dtype, as autograd would), dh = dlogits W, dW += dlogits^T h (accumulated in fp32). Backward only
    scales the saved dh, dW, db by the incoming gradient. Extra memory: dW in fp32 (V x H) instead of a second
    logits pass. No rows: loss 0 and zero gradients (every parameter still takes part, as DDP expects).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        want_w, want_b = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]  # a frozen head: skip
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for s in range(0, len(y), chunk):
            hc, yc = h[s : s + chunk], y[s : s + chunk]
            logits = F.linear(hc, weight, bias)  # autocast: in its dtype
            mm_dtype = logits.dtype
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            grad[torch.arange(len(yc), device=grad.device), yc] -= 1.0
            grad = grad.to(mm_dtype)
            grad_h[s : s + chunk] = (grad @ weight.to(mm_dtype)).to(h.dtype)
            if grad_w is not None:
                grad_w += (grad.t() @ hc.to(mm_dtype)).float()
            if grad_b is not None:
                grad_b += grad.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(w_dtype) if grad_w is not None else None,
                (grad_b * grad_out).to(b_dtype) if grad_b is not None else None, None, None)


def _plain_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output Linear when logits are exactly head(decoder(...).last_hidden_state); None otherwise."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if not isinstance(head, torch.nn.Linear) or cfg is None or not hasattr(model, "get_decoder"):
        return None
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", 1) not in (None, 1) or getattr(
            cfg, "logits_scaling", 1) not in (None, 1):
        return None
    return head if model.get_decoder() is not model else None


def loss_sum(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of an HF causal LM, a CausalLMLoss, or a DDP-wrapped CausalLMLoss."""
    if isinstance(model, (CausalLMLoss, torch.nn.parallel.DistributedDataParallel)):
        return model(inputs, labels)  # DDP: its own forward must run (it prepares the gradient sync)
    return CausalLMLoss(model)(inputs, labels)


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
        ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else _null()
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


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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


def _stream(ds: PackedShards):
    """Batches forever: the rest of the current epoch, then whole epochs."""
    while True:
        yield from ds


def _save(path: Path, obj: dict) -> None:
    with atomic_file(path) as f:  # a checkpoint is never half-written, even if the job is killed while saving
        torch.save(obj, f)


def _vocab_for(max_token_id: int) -> int:
    return -(-(max_token_id + 1) // 64) * 64  # round up to a multiple of 64


def train(cfg: TrainConfig, echo=print) -> list[dict]:
    """Run training; returns the logged metrics of rank 0 (one dict per logged step)."""
    rank, world, device = _setup_distributed(cfg.device)
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    say = echo if rank == 0 else (lambda *a, **k: None)
    ds = PackedShards(cfg.shards, cfg.batch_tokens, seed=cfg.seed, rank=rank, world_size=world)
    if ds.num_batches() == 0:
        raise ValueError(f"{cfg.shards} yields no batch per rank ({ds.num_rows} rows, {world} ranks)")
    torch.manual_seed(cfg.seed)
    max_id = ds.max_token_id()  # one pass over the corpus' tokens
    model = build_model(cfg.model, cfg.attn, vocab_size=_vocab_for(max_id) if cfg.model in PRESETS else None)
    vocab = model.get_input_embeddings().weight.shape[0]
    if max_id >= vocab:
        raise ValueError(f"the shards hold token id {max_id} but {cfg.model} has {vocab} embeddings; "
                         "train with the model whose tokenizer built the shards")
    model.to(device).train()
    backend = resolve_backend(cfg.attn, device, torch.bfloat16 if bf16 else torch.float32)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps))
    step = 0
    ckpt = Path(cfg.ckpt) if cfg.ckpt else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        if not (ckpt / "last.pt").exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt / 'last.pt'}")
        state = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=False)
        if len(state["loader"]) != world:
            raise ValueError(f"checkpoint was written by {len(state['loader'])} ranks, this run has {world}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ds.load_state_dict(state["loader"][rank])
        step = state["step"]
        say(f"resumed from {ckpt / 'last.pt'} at step {step}")
    net = CausalLMLoss(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.index is not None
                                                        else None)
    n_params = num_params(model)
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    cfgm = model.config
    # attention matmuls, fwd + bwd: 12 * L * H * d flops per (query, key) pair; causal: s^2 / 2 pairs per document
    attn_flops = 12 * cfgm.num_hidden_layers * cfgm.num_attention_heads * getattr(
        cfgm, "head_dim", cfgm.hidden_size // cfgm.num_attention_heads)
    say(f"model {cfg.model}: {n_params / 1e6:.1f}M params (non-embedding), attention {backend}, "
        f"{'bf16' if bf16 else 'fp32'}, {device}, {world} rank(s); data {ds.num_rows} rows, {ds.num_tokens} tokens, "
        f"{ds.num_batches()} batches/rank/epoch")
    batches = _stream(ds)
    metrics: list[dict] = []

    def save():
        loaders = [None] * world
        if world > 1:
            dist.all_gather_object(loaders, ds.state_dict())
        else:
            loaders = [ds.state_dict()]
        if rank == 0:
            _save(ckpt / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "loader": loaders, "step": step,
                                     "config": dataclasses.asdict(cfg)})

    last = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    while step < last:
        t0 = time.perf_counter()
        micro, tokens, flops = [], 0, 0.0
        for _ in range(cfg.grad_accum):
            b = next(batches)
            tokens += b.num_tokens
            lens = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).double()
            flops += 6 * n_params * b.num_tokens + attn_flops * float((lens * lens).sum()) / 2
            b = b.to(device)
            micro.append((model_inputs(b), b.labels.unsqueeze(0)))
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
