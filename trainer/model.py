"""Hugging Face causal LMs that run packed batches through `varlen_attention`.

packprep registers attention functions `packprep_<backend>` (auto, flash_attn, torch, sdpa) with transformers'
`AttentionInterface`, so any model whose attention layers dispatch through it (Llama, Qwen2/3, Mistral, ...)
trains on flat packed batches (a sliding window longer than every document is exact; a shorter one, or logit
softcapping as in Gemma 2, is refused with a clear error rather than silently ignored).
`model(**model_inputs(batch))` passes the document boundaries as the `cu_seq_lens_q/k` and `max_length_q/k`
keyword arguments that transformers forwards to every attention call. A forward without them is ordinary causal
attention (SDPA). No mask function is registered for these names, so transformers builds no mask tensor (and makes no
host sync) for packed batches; a 2-D padding mask is therefore not applied: right-padded rows are still exact for
training (causal attention never looks right, and padded labels are -100).

Costs: building `tiny` takes milliseconds; `small` (~300M parameters) allocates ~1.3 GB of fp32 weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.data import VarlenBatch
from trainer.varlen import BACKENDS, varlen_attention

# name -> (hidden, layers, heads, kv heads, intermediate); Llama-style, random weights, no download.
PRESETS = {
    "tiny": (64, 2, 4, 2, 128),
    "small": (1024, 24, 16, 8, 2816),  # ~300M parameters with a 32k vocabulary: the GPU benchmark's model
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
        window, max_len = kwargs.get("sliding_window"), int(kwargs["max_length_q"])
        if window is not None and max_len > window:  # a window shorter than every document changes nothing
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
                dtype: torch.dtype = torch.float32):
    """A Hugging Face causal LM whose attention is packprep's varlen attention.

    spec: 'tiny' / 'small' (Llama-style, random weights, vocab_size defaults to 32000), a local model folder, or a
    hub name (needs the network). attn_backend: one of auto, flash_attn, torch, sdpa (see trainer.varlen).
    """
    if attn_backend not in BACKENDS:
        raise ValueError(f"attention backend {attn_backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    from transformers import AutoModelForCausalLM

    register_attention()
    impl = f"packprep_{attn_backend}"
    if spec in PRESETS:
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
    return model


def model_inputs(batch: VarlenBatch) -> dict:
    """Keyword arguments for `model(**...)`: flat [1, T] inputs plus the document boundaries for the attention."""
    return {
        "input_ids": batch.input_ids.unsqueeze(0),
        "position_ids": batch.position_ids.unsqueeze(0),
        "cu_seq_lens_q": batch.cu_seqlens,
        "cu_seq_lens_k": batch.cu_seqlens,
        "max_length_q": batch.max_seqlen,
        "max_length_k": batch.max_seqlen,
        "use_cache": False,
    }


def num_params(model, embeddings: bool = False) -> int:
    """Parameter count (without the input embedding unless asked: what 6*N*tokens FLOP estimates use)."""
    total = sum(p.numel() for p in model.parameters())
    if not embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total
