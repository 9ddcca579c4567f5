"""The optimizer and its learning-rate schedule: AdamW (no decay on biases and norms), linear warmup, cosine decay.

Costs: AdamW keeps two fp32 moments per parameter (8 bytes each); the fused CUDA kernel is used when every parameter
is on the GPU. The schedule is a pure function of the step, so a resumed run needs only the step to continue it.
"""

from __future__ import annotations

import math

import torch


def lr_lambda(warmup: int, total: int, floor: float = 0.1):
    """Linear warmup to 1, then cosine to `floor` at `total`: warmup 2, total 6 -> 0.5, 1, 1, 0.78, 0.33, 0.1."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW(0.9, 0.95) with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))
