"""Variable-length (per-document) causal attention over flat (T, H, D) tensors, with four interchangeable backends.

- `fa4`: FlashAttention-4 (`flash_attn.cute`, the `flash-attn-4` package; Hopper and Blackwell, fp16/bf16), native
  GQA, wrapped as torch custom ops (`packprep::fa4_varlen_fwd/bwd`) so that torch.compile treats it as one opaque
  kernel; `max_seqlen` may be a CPU scalar tensor, so a compiled model does not specialise on it.
- `flash_attn`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), when the package is installed.
- `torch`: PyTorch's own FA2 varlen kernel, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA, fp16/bf16).
- `sdpa`: a per-document loop over `scaled_dot_product_attention`, the reference that runs anywhere (CPU, fp32).
`auto` takes the first one that can run the given tensors, in that order, and logs its choice once.

The fused kernels cost O(sum of doc_len^2 * H * D) work and O(T) memory: no mask tensor, no padding; the reference
costs one kernel launch per document. Where the installed `varlen_attn` lacks `enable_gqa` (torch 2.11), GQA repeats
k/v and recomputes that in backward instead of storing it (a little step time for memory; RESULTS.md).
Legend: T tokens, H query heads, Hkv key/value heads (GQA: H % Hkv == 0),
D head dim, N documents.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from trainer.config import ATTN_BACKENDS as BACKENDS

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _fa4():
    """(forward, backward) of FlashAttention-4's varlen kernels, or None where flash_attn.cute does not import."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception:  # ImportError, or a build for another CUDA -> treat as absent
        return None
    return _flash_attn_fwd, _flash_attn_bwd


@torch.library.custom_op("packprep::fa4_varlen_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: torch.Tensor,
             causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = int(max_seqlen)  # a CPU scalar: no device sync
    out, lse = _fa4()[0](q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=m,
                         max_seqlen_k=m, softmax_scale=scale, causal=causal, return_lse=True)[:2]
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # lse: (H, T)


@torch.library.custom_op("packprep::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: torch.Tensor, causal: bool,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = int(max_seqlen)
    dq, dk, dv = _fa4()[1](q, k, v, out, dout.contiguous(), lse, scale, causal, 0.0, cu_seqlens_q=cu_seqlens,
                           cu_seqlens_k=cu_seqlens, max_seqlen_q=m, max_seqlen_k=m)[:3]
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, max_seqlen)
    ctx.causal, ctx.scale = causal, scale


def _fa4_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, max_seqlen = ctx.saved_tensors
    dq, dk, dv = _fa4_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


def _fa4_capable(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] in (9, 10, 11, 12) and _fa4() is not None)


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken build (undefined symbol) -> treat as absent
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen():
    """(varlen_attn, its parameter names) or None where this torch has no varlen kernel."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends that can run tensors of this device and dtype, fastest first."""
    device = torch.device(device)
    fused_ok = device.type == "cuda" and dtype in _HALF
    found = []
    if fused_ok and _fa4_capable(device):
        found.append("fa4")
    if fused_ok and _flash_attn_func() is not None:
        found.append("flash_attn")
    if fused_ok and _torch_varlen() is not None:
        found.append("torch")
    return found + ["sdpa"]


_logged: set[tuple[str, str]] = set()


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend `backend` means for tensors of this device/dtype; raises if it cannot run them."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    found = available_backends(device, dtype)
    if backend == "auto":
        chosen = found[0]
        key = (str(torch.device(device).type), chosen)
        if key not in _logged:
            _logged.add(key)
            log.info("varlen attention: auto picked %r for %s %s (available: %s)", chosen, key[0], dtype, found)
        return chosen
    if backend not in found:
        why = ("flash_attn.cute does not import (pip install flash-attn-4; Hopper or Blackwell GPUs only)"
               if backend == "fa4" and torch.device(device).type == "cuda" and dtype in _HALF else
               "flash-attn is not installed (pip install flash-attn)" if backend == "flash_attn" and
               _flash_attn_func() is None else
               "torch.nn.attention.varlen is missing (needs torch >= 2.10)" if backend == "torch" and
               _torch_varlen() is None else f"it needs CUDA tensors in fp16/bf16, got {torch.device(device).type} "
               f"{dtype}")
        raise ValueError(f"attention backend {backend!r} cannot run here: {why}; use --attn auto or sdpa")
    return backend


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     causal: bool = True, backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention of every token over its own document only; q (T, H, D), k/v (T, Hkv, D) -> (T, H, D).

    cu_seqlens: int32 [N+1] document boundaries, e.g. lengths [3, 2, 4] -> [0, 3, 5, 9]; max_seqlen: the longest
    length (an int, or a CPU scalar tensor, which a compiled model passes so that it does not recompile per value).
    """
    assert q.ndim == 3 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[1] % k.shape[1] == 0, (
        q.shape, k.shape, v.shape)
    backend = resolve_backend(backend, q.device, q.dtype)
    if cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if backend == "fa4":
        if not isinstance(max_seqlen, torch.Tensor):
            max_seqlen = torch.tensor(int(max_seqlen), dtype=torch.int32)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        return _fa4_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen, causal,
                        float(scale))[0]
    max_seqlen = int(max_seqlen)
    if backend == "flash_attn":
        return _flash_attn_func()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                                  causal=causal)
    if backend == "torch":
        return _torch_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return sdpa_reference(q, k, v, cu_seqlens, causal, scale)


def _torch_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    """torch.nn.attention.varlen.varlen_attn across its versions: 2.9/2.10 take `is_causal`, later ones
    `window_size=(-1, 0)` for causal; `enable_gqa` and `scale` are used where the installed version has them
    (2.11 has `scale` but not `enable_gqa`)."""
    varlen_attn, params = _torch_varlen()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        raise ValueError("this torch's varlen_attn has neither window_size nor is_causal; use --attn sdpa")
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel uses 1/sqrt(D): fold the rest of the factor into q
            q = q * (scale * q.shape[-1] ** 0.5)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and "enable_gqa" in params:
        kwargs["enable_gqa"], groups = True, 1

    def attend(q, k, v):
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)

    if groups > 1 and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # GQA without enable_gqa (torch 2.10/2.11): backward would keep the repeated k/v (groups x their memory,
        # ~0.8 GB over 24 layers of 16k tokens); keep only q/k/v and redo the repeat and attention in backward
        # (one extra attention forward).
        return torch.utils.checkpoint.checkpoint(attend, q, k, v, use_reentrant=False)
    return attend(q, k, v)


def sdpa_reference(q, k, v, cu_seqlens, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """One `scaled_dot_product_attention` per document (obviously per-document; one host sync for the offsets)."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[a:b].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        if groups > 1:
            kd, vd = kd.repeat_interleave(groups, dim=0), vd.repeat_interleave(groups, dim=0)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(outs)
