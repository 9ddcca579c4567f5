"""TrainConfig: every setting of a training run, declared once (the `packprep train` options are generated from it).

Owns the names, defaults, closed sets and validation of the training settings; imports neither torch nor
transformers, so reading it (for `--help`) costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from packprep.config import check_types, setting

Attn = Literal["auto", "fa4", "flash_attn", "torch", "sdpa"]
Device = Literal["auto", "cpu", "cuda"]
ATTN_BACKENDS: tuple[str, ...] = get_args(Attn)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run: shards -> model -> optimizer steps (each field is a `packprep train` option)."""

    shards: str = setting(doc="""packprep output folder (the `packprep build` output, with its packprep.json) to train
        on.""")
    model: str = setting("tiny", """'tiny' / 'small' (Llama-style, random weights, vocabulary sized from the build's
        tokenizer), a local model folder, or a hub name.""")
    steps: int = setting(100, "Optimizer steps to run in total (a resumed run continues up to this step).")
    batch_tokens: int = setting(8192, """Token budget of one micro-batch per rank (rows are added while the batch stays
        within it; >= seq_len).""")
    grad_accum: int = setting(1, "Micro-batches per optimizer step on each rank.")
    lr: float = setting(3e-4, "Peak learning rate (AdamW).")
    warmup_steps: int = setting(10, "Linear warmup steps; cosine decay to 10% of lr afterwards.")
    weight_decay: float = setting(0.1, "AdamW weight decay (not applied to biases and norms).")
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value (0: off).")
    device: Device = setting("auto", "cpu, cuda, or auto (cuda when available).")
    attn: Attn = setting("auto", """Attention backend: auto (fa4 on Hopper/Blackwell when installed, else flash_attn,
        torch, sdpa), fa4, flash_attn, torch, sdpa.""")
    bf16: bool | None = setting(None, "bf16 autocast (default: on for cuda, off for cpu).")
    seed: int = setting(0, "Seed of the data order and of the preset models' initial weights.")
    ckpt: str | None = setting(None, """Checkpoint folder (last.pt is written there every ckpt_every steps and at the
        end); None: no checkpoints.""")
    ckpt_every: int = setting(0, "Steps between checkpoints (0: only at the end).")
    resume: bool = setting(False, "Continue from <ckpt>/last.pt.")
    stop_at: int = setting(0, """Stop after this step (0: at `steps`), checkpointing there; the schedule still spans
        `steps` (for jobs cut into time-limited pieces).""")
    log_every: int = setting(1, "Steps between log lines.")
    verify_shards: bool = setting(False, """Check every shard's sha256 against packprep.json before training (reads the
        whole corpus once).""")
    compile: bool = setting(False, """torch.compile the decoder once over static shapes: every batch is exactly
        batch_tokens long (the rest is one filler document without loss).""")
    balance: bool = setting(False, """Deal rows to ranks so that every rank's attention + token cost is equal within
        each global step (instead of equal token counts); helps data parallelism at long context.""")
    balance_alpha: float = setting(27500.0, """The cost of one token relative to one unit of sum(l^2): a row costs
        alpha * sum(l) + sum(l^2). It depends on the model and GPU: benchmarks/bench_balance.py measures it (the
        default is its figure for the `small` preset on an H200; RESULTS.md).""")
    balance_window: int = setting(64, """Global steps whose rows are balanced together (larger: closer balance, rows
        move further from their shuffled position).""")

    def __post_init__(self):
        check_types(self)  # one line naming the key, the value and the expected type
        positive = {"steps": self.steps, "batch_tokens": self.batch_tokens, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "balance_window": self.balance_window}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        for name in ("warmup_steps", "ckpt_every", "stop_at", "grad_clip", "weight_decay", "balance_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.device not in get_args(Device):
            raise ValueError(f"device={self.device!r}: choose cpu, cuda or auto")
        if self.attn not in ATTN_BACKENDS:
            raise ValueError(f"attn={self.attn!r}: choose one of {', '.join(ATTN_BACKENDS)}")
        if self.resume and not self.ckpt:
            raise ValueError("--resume needs --ckpt DIR (the folder holding last.pt)")
