"""Hugging Face causal LMs that run packed batches through `varlen_attention`.

packprep registers attention functions `packprep_<backend>` (auto, fa4, flash_attn, torch, sdpa) with transformers'
`AttentionInterface`, so any model whose attention layers dispatch through it (Llama, Qwen2/3, Mistral, ...)
trains on flat packed batches (a sliding window longer than every document is exact; a shorter one, or logit
softcapping as in Gemma 2, is refused with a clear error rather than silently ignored).
`model(**model_inputs(batch))` passes the document boundaries as the `cu_seq_lens_q/k` and `max_length_q/k`
keyword arguments that transformers forwards to every attention call. A forward without them is ordinary causal
attention (SDPA). No mask function is registered for these names, so transformers builds no mask tensor (and makes no
host sync) for packed batches; a 2-D padding mask is therefore not applied: right-padded rows are still exact for
training (causal attention never looks right, and padded labels are -100).

`build_model(spec, shards=...)` reads the build's manifest: presets get the build tokenizer's vocabulary (rounded
up to a multiple of 64), and a pretrained model whose embeddings are fewer than the tokenizer's vocabulary, or whose
folder holds a tokenizer other than the build's (by the same sha256 the build records), is refused before training.

Costs: building `tiny` takes milliseconds; `small` (~300M parameters) allocates ~1.3 GB of fp32 weights, `1b` ~4.5 GB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.data import BuildInfo, PackedShards, VarlenBatch
from trainer.varlen import BACKENDS, varlen_attention

# name -> (hidden, layers, heads, kv heads, intermediate); Llama-style, random weights, no download.
PRESETS = {
    "tiny": (64, 2, 4, 2, 128),
    "small": (1024, 24, 16, 8, 2816),  # ~300M parameters with a 32k vocabulary: the GPU benchmark's model
    "1b": (2048, 16, 32, 8, 8192),  # Llama-3.2-1B's shape: ~1.0B parameters without the embeddings
}


def _attention_forward(backend: str):
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query (B, H, S, D), key/value (B, Hkv, S, D) -> attn_output (B, S, H, D), as transformers expects
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        if query.shape[0] != 1:
            raise ValueError(f"packed batches are flat: input_ids must be [1, T], got batch size {query.shape[0]}")
        if dropout and module.training:
            raise ValueError("attention dropout is not supported with packed batches; set attention_dropout=0")
        window, max_len = kwargs.get("sliding_window"), kwargs["max_length_q"]  # max_len: an int or a CPU scalar
        if window is not None and int(max_len) > window:  # a window shorter than every document changes nothing
            raise ValueError(f"this model uses sliding-window attention (window {window}) and a document of "
                             f"{max_len} tokens exceeds it; packprep's varlen attention has no window: build the "
                             f"shards with --seq-len <= {window} or disable the window in the model config")
        if kwargs.get("softcap"):
            raise ValueError(f"this model caps attention logits (softcap {kwargs['softcap']}), which packprep's "
                             "varlen attention does not implement")
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
        device_type = q.device.type
        if q.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
            # fp32 weights under autocast: the projections are bf16 but RoPE's fp32 cos/sin promote q and k back
            # to fp32; run the attention in the autocast dtype, as autocast would run a matmul
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out = varlen_attention(q, k, v, cu_seqlens, max_len, causal=getattr(module, "is_causal", True),
                               backend=backend, scale=scaling)
        return out.unsqueeze(0), None

    forward.__name__ = f"packprep_{backend}_attention_forward"
    return forward


def register_attention() -> None:
    """Register `packprep_<backend>` for every backend with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    for backend in BACKENDS:
        AttentionInterface.register(f"packprep_{backend}", _attention_forward(backend))


def preset_config(name: str, vocab_size: int = 32000, max_position_embeddings: int = 8192):
    """A LlamaConfig for a preset name ('tiny', 'small')."""
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, inter = PRESETS[name]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
                       max_position_embeddings=max_position_embeddings, rope_theta=10000.0, tie_word_embeddings=False,
                       use_cache=False, attention_dropout=0.0)


def build_model(spec: str, attn_backend: str = "auto", vocab_size: int | None = None,
                dtype: torch.dtype = torch.float32, shards: PackedShards | BuildInfo | str | Path | None = None):
    """A Hugging Face causal LM whose attention is packprep's varlen attention.

    spec: 'tiny' / 'small' / '1b' (Llama-style, random weights), a local model folder, or a hub name (needs the
    network). attn_backend: one of auto, fa4, flash_attn, torch, sdpa (see trainer.varlen). shards: the build to
    train on (a folder, its PackedShards or BuildInfo): sizes a preset's vocabulary from the build's tokenizer and
    refuses a pretrained model that does not fit it. Without shards, a preset has vocab_size (default 32000).
    """
    if attn_backend not in BACKENDS:
        raise ValueError(f"attention backend {attn_backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    info = (shards.info if isinstance(shards, PackedShards) else shards if isinstance(shards, BuildInfo) else
            BuildInfo.read(shards) if shards is not None else None)
    if info is not None and spec not in PRESETS:
        check_tokenizer(spec, info)
    from transformers import AutoModelForCausalLM

    register_attention()
    impl = f"packprep_{attn_backend}"
    if spec in PRESETS:
        if vocab_size is None and info is not None:
            vocab_size = -(-info.vocab_size // 64) * 64  # the build tokenizer's, rounded up to a multiple of 64
        config = preset_config(spec, vocab_size or 32000)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=dtype)
    else:
        if vocab_size is not None:
            raise ValueError("vocab_size applies to the built-in presets only; a pretrained model keeps its own")
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, attn_implementation=impl, dtype=dtype)
        except OSError as e:
            where = "local folder" if Path(spec).exists() else "hub name (offline?)"
            raise ValueError(f"cannot load model {spec!r} as a {where}: {e}; or use --model tiny|small") from None
    model.config.use_cache = False
    if info is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < info.vocab_size:
            raise ValueError(f"model {spec!r} has {rows} embeddings but the shards' tokenizer ({info.tokenizer}) has "
                             f"{info.vocab_size} tokens; train with the model whose tokenizer built the shards")
    return model


def check_tokenizer(spec: str, info: BuildInfo) -> None:
    """Refuse a local model folder whose tokenizer differs from the one that built the shards (same sha256 as the
    build records); a hub name or a folder without tokenizer.json is not checked here (its vocabulary still is)."""
    folder = Path(spec)
    if not (folder / "tokenizer.json").is_file() or info.tokenizer_sha256 is None:
        return
    from packprep.tokenize import tokenizer_sha256

    digest = tokenizer_sha256(folder)
    if digest != info.tokenizer_sha256:
        raise ValueError(f"model folder {spec} holds a tokenizer (sha256 {digest[:12]}...) other than the one that "
                         f"built the shards ({info.tokenizer}, {info.tokenizer_sha256[:12]}...); train with the "
                         "matching model or rebuild the shards with its tokenizer")


def model_inputs(batch: VarlenBatch, compiled: bool = False) -> dict:
    """Keyword arguments for `model(**...)`: flat [1, T] inputs plus the document boundaries for the attention.

    compiled: for a torch.compile'd model over static batches: the number of documents is marked dynamic and the
    longest length travels as a CPU scalar tensor, so neither causes a recompile (the fa4 backend reads both).
    """
    max_len = torch.tensor(batch.max_seqlen, dtype=torch.int32) if compiled else batch.max_seqlen
    if compiled:
        torch._dynamo.mark_dynamic(batch.cu_seqlens, 0)
    return {
        "input_ids": batch.input_ids.unsqueeze(0),
        "position_ids": batch.position_ids.unsqueeze(0),
        "cu_seq_lens_q": batch.cu_seqlens,
        "cu_seq_lens_k": batch.cu_seqlens,
        "max_length_q": max_len,
        "max_length_k": max_len,
        "use_cache": False,
    }


def num_params(model, embeddings: bool = False) -> int:
    """Parameter count (without the input embedding unless asked: what 6*N*tokens FLOP estimates use)."""
    total = sum(p.numel() for p in model.parameters())
    if not embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total
