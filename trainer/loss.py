"""The training loss: an HF causal LM's summed next-token cross-entropy, without materialising the logits.

Owns `CausalLMLoss` (the module that DDP wraps), the fused head + cross-entropy autograd function and `loss_sum`.
Costs: the head's matmul over loss positions only, in chunks of `LOSS_CHUNK_ELEMENTS` logits (256 MiB of fp32), with
every chunk's gradients computed in the forward pass; extra memory is the head's fp32 gradient (V x H x 4 bytes)
instead of the [tokens, vocab] logits and their gradient (~10 GB each at a 151k vocabulary and 16k tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data import IGNORE_INDEX

LOSS_CHUNK_ELEMENTS = 1 << 26  # logits computed at once: 67M fp32 values = 256 MiB (2,097 tokens at a 32k vocab)...
LOSS_CHUNK_MIN_TOKENS = 2048  # ...but never fewer tokens than this: smaller matmuls are slower (RESULTS.md, loss)


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
