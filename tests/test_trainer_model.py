"""trainer.varlen + trainer.model: per-document attention, packed logits == per-document logits, loss normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_fixtures import one_torch_thread, random_lengths, write_packed

from trainer import build_model, model_inputs, varlen_attention
from trainer.data import make_varlen_batch
from trainer.loss import CausalLMLoss, _LinearCrossEntropy, loss_sum
from trainer.optim import make_optimizer
from trainer.train import train_step
from trainer.varlen import resolve_backend


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference_attention(q, k, v, cu, causal):
    """Explicit softmax(q k^T / sqrt(D)) v in float64, one document at a time."""
    groups = q.shape[1] // k.shape[1]
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = q[a:b].double(), k[a:b].double().repeat_interleave(groups, 1), v[a:b].double().repeat_interleave(
            groups, 1)
        s = torch.einsum("qhd,khd->hqk", qd, kd) / q.shape[-1] ** 0.5
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vd))
    return torch.cat(out)


def random_cu(rng, docs, max_len):
    lens = rng.integers(1, max_len, docs)
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32), int(lens.max())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_backend_is_per_document_attention(heads, kv_heads, causal):
    rng = np.random.default_rng(heads * 10 + kv_heads + causal)
    for _ in range(3):
        cu, mx = random_cu(rng, int(rng.integers(1, 8)), 40)
        T = int(cu[-1])
        q, k, v = torch.randn(T, heads, 16), torch.randn(T, kv_heads, 16), torch.randn(T, kv_heads, 16)
        out = varlen_attention(q, k, v, cu, mx, causal=causal, backend="sdpa")
        assert out.shape == q.shape
        assert rel(out, reference_attention(q, k, v, cu, causal)) < 1e-6


def test_backend_resolution():
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="cannot run here"):
        resolve_backend("torch", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("xformers", "cpu", torch.float32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", "sdpa", vocab_size=512).eval()


def packed_example(rng, docs=6, max_len=60, vocab=512):
    lens = rng.integers(1, max_len, docs)
    cu = np.concatenate([[0], np.cumsum(lens)])
    tokens = rng.integers(0, vocab, cu[-1])
    return make_varlen_batch(tokens, cu, np.ones(cu[-1]), np.array([0, cu[-1]])), tokens, cu


def test_packed_logits_equal_per_document_logits(tiny):
    """The core claim: through a real HF LlamaForCausalLM, no token sees another document."""
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_config(tiny.config, attn_implementation="eager").eval()
    ref_model.load_state_dict(tiny.state_dict())
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch, tokens, cu = packed_example(rng)
        with torch.no_grad():
            packed = tiny(**model_inputs(batch)).logits[0]
            per_doc = torch.cat([ref_model(input_ids=torch.tensor(tokens[a:b])[None]).logits[0]
                                 for a, b in zip(cu[:-1], cu[1:])])
        assert rel(packed, per_doc) < 1e-4
        # and the documents really interact without the boundaries (the test is not vacuous):
        with torch.no_grad():
            whole = ref_model(input_ids=batch.input_ids[None]).logits[0]
        assert rel(whole, per_doc) > 1e-2


def test_forward_without_packing_is_causal_attention(tiny):
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_config(tiny.config, attn_implementation="eager").eval()
    ref_model.load_state_dict(tiny.state_dict())
    ids = torch.randint(0, 512, (3, 25))
    with torch.no_grad():
        assert rel(tiny(input_ids=ids).logits, ref_model(input_ids=ids).logits) < 1e-5


def test_loss_normalization_under_accumulation_equals_one_batch():
    """Two micro-batches (different loss-token counts) give the loss and gradients of their concatenation."""
    rng = np.random.default_rng(1)
    b1, _, _ = packed_example(rng, docs=3)
    b2, _, _ = packed_example(rng, docs=7)
    labels2 = b2.labels.clone()
    labels2[: len(labels2) // 2] = -100  # a prompt-heavy micro-batch: few loss tokens
    b2.labels = labels2
    both = make_varlen_batch(torch.cat([b1.input_ids, b2.input_ids]).numpy(),
                             torch.cat([b1.cu_seqlens[:-1], b2.cu_seqlens + b1.num_tokens]).numpy(),
                             np.ones(b1.num_tokens + b2.num_tokens), np.array([0, b1.num_tokens + b2.num_tokens]))
    both.labels = torch.cat([b1.labels, b2.labels])

    def run(batches):
        torch.manual_seed(0)
        model = build_model("tiny", "sdpa", vocab_size=512)
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
        grads = {}

        def grab(_):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

        opt.register_step_pre_hook(lambda *a: grab(None))
        out = train_step(model, opt, [(model_inputs(b), b.labels[None]) for b in batches],
                         device=torch.device("cpu"), bf16=False, grad_clip=0.0)
        return out, grads

    acc, g_acc = run([b1, b2])
    one, g_one = run([both])
    assert acc["loss_tokens"] == one["loss_tokens"] == both.num_loss_tokens()
    assert abs(acc["loss"] - one["loss"]) < 1e-5
    for n in g_one:
        assert rel(g_acc[n], g_one[n]) < 1e-5, n
    # a plain mean of micro-batch means weights tokens differently (guards against a vacuous pass)
    torch.manual_seed(0)
    m = build_model("tiny", "sdpa", vocab_size=512)
    naive = sum(loss_sum(m, model_inputs(b), b.labels[None]) / b.num_loss_tokens() for b in (b1, b2)) / 2
    naive.backward()
    assert rel(m.lm_head.weight.grad, g_one["lm_head.weight"]) > 1e-2


def test_chunked_loss_equals_full_logits_loss():
    """CausalLMLoss (logits only at loss positions, a few tokens per chunk, gradients computed chunk by chunk) gives
    the loss and the gradients of full logits + cross-entropy; a micro-batch without loss tokens gives 0 and touches
    every parameter."""
    rng = np.random.default_rng(3)
    b, _, _ = packed_example(rng, docs=5)
    labels = b.labels.clone()
    labels[::3] = -100  # masked positions are skipped, not computed
    torch.manual_seed(0)
    model = build_model("tiny", "sdpa", vocab_size=512)
    vocab = model.get_input_embeddings().weight.shape[0]
    chunked = CausalLMLoss(model, chunk_elements=7 * vocab, min_chunk_tokens=1)  # 7 tokens a chunk: many
    assert chunked.head is model.lm_head and chunked.chunk == 7

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    inputs = model_inputs(b)
    full_loss, full_g = grads(lambda: torch.nn.functional.cross_entropy(
        model(**inputs).logits[0, :-1].float(), labels[1:], ignore_index=-100, reduction="sum"))
    loss, g = grads(lambda: chunked(inputs, labels[None]))
    assert rel(loss, full_loss) < 1e-6
    assert g.keys() == full_g.keys()
    for n in g:
        assert rel(g[n], full_g[n]) < 1e-5, n
    none = torch.full_like(labels, -100)[None]
    zero, g0 = grads(lambda: chunked(inputs, none))
    assert float(zero) == 0.0 and "lm_head.weight" in g0


@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_function_against_autograd(bias):
    """The fused head + cross-entropy (gradients computed in the forward pass) against F.linear + F.cross_entropy
    and autograd: loss, dh, dW, db; chunks of 3 rows; a frozen weight gets no gradient."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 13, (11,), generator=g)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y, reduction="sum")
    want = torch.autograd.grad(2.5 * ref, [h, w] + ([b] if bias else []))
    got_loss = _LinearCrossEntropy.apply(h, w, b, y, 3)
    got = torch.autograd.grad(2.5 * got_loss, [h, w] + ([b] if bias else []))
    assert abs(float(got_loss) - float(ref)) < 1e-5 * float(ref)
    for a, e in zip(got, want):
        assert rel(a, e) < 1e-6
    frozen = w.detach()
    out = _LinearCrossEntropy.apply(h, frozen, None, y, 4)
    (dh,) = torch.autograd.grad(out, [h])
    (want_dh,) = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ frozen.T, y, reduction="sum"), [h])
    assert rel(dh, want_dh) < 1e-6


def test_build_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        build_model("tiny", "xformers")
    with pytest.raises(ValueError, match="cannot load model"):
        build_model(str(tmp_path / "no-such-model"))


def test_build_model_reads_the_manifest(tmp_path):
    """Presets take the build tokenizer's vocabulary (not a default, not the largest id met); a pretrained model
    with fewer embeddings than the tokenizer's vocabulary, or another tokenizer in its folder, is refused."""
    import shutil

    from packprep.tokenize import BUILTIN, tokenizer_sha256
    from transformers import AutoModelForCausalLM

    from trainer.model import preset_config

    builtin = tokenizer_sha256(BUILTIN)
    out = tmp_path / "build"
    write_packed(out, random_lengths(40, 64), 64, vocab=1500, tokenizer_sha256=builtin)
    assert build_model("tiny", "sdpa", shards=out).get_input_embeddings().weight.shape[0] == 1536  # 1500 -> x64

    def save(vocab, name, tokenizer=None):
        folder = tmp_path / name
        AutoModelForCausalLM.from_config(preset_config("tiny", vocab)).save_pretrained(folder)
        if tokenizer:
            shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
        return str(folder)

    assert build_model(save(1600, "fits", BUILTIN), "sdpa", shards=out).config.vocab_size == 1600
    with pytest.raises(ValueError, match="has 1024 embeddings but the shards' tokenizer .* has 1500 tokens"):
        build_model(save(1024, "small_vocab"), "sdpa", shards=out)
    other = tmp_path / "other_tok"
    shutil.copytree(BUILTIN, other)
    (other / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    with pytest.raises(ValueError, match="holds a tokenizer .* other than the one that built the shards"):
        build_model(save(1600, "other", other), "sdpa", shards=out)


@pytest.mark.parametrize("style", ["window_size", "is_causal", "enable_gqa"])
def test_torch_backend_adapts_to_varlen_attn_versions(monkeypatch, style):
    """The `torch` backend's call adapter (window_size vs is_causal, GQA by repeat + recompute or enable_gqa) on CPU,
    with a stand-in for torch.nn.attention.varlen.varlen_attn that has each version's signature."""
    import trainer.varlen as varlen

    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), is_causal=False,
             enable_gqa=False):
        calls.append(k.shape[1])
        causal = window_size == (-1, 0) if style != "is_causal" else is_causal
        assert enable_gqa or k.shape[1] == q.shape[1]
        return varlen.sdpa_reference(q, k, v, cu_q, causal, scale)

    params = {"window_size": {"scale", "window_size"}, "is_causal": {"is_causal"},
              "enable_gqa": {"scale", "window_size", "enable_gqa"}}[style]
    monkeypatch.setattr(varlen, "_torch_varlen", lambda: (fake, frozenset(params)))
    rng = np.random.default_rng(3)
    cu, mx = random_cu(rng, 4, 30)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, 8, requires_grad=True) for h in (4, 2, 2))
    out = varlen._torch_attention(q, k, v, cu, mx, True, 0.3)
    ref = varlen.sdpa_reference(q, k, v, cu, True, 0.3)
    assert rel(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel(a, b) < 1e-5
    # repeat + recompute in backward where the kernel has no enable_gqa; native GQA otherwise
    assert calls == ([2] if style == "enable_gqa" else [4, 4])


@pytest.mark.parametrize("window", [8, 64])
def test_sliding_window_models_are_exact_or_refused(tmp_path, window):
    """Mistral-style sliding windows: exact when no document exceeds the window, a clear error otherwise (never a
    silently ignored window)."""
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window, use_cache=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "mistral")
    model = build_model(str(tmp_path / "mistral"), "sdpa").eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "mistral", attn_implementation="eager").eval()
    batch, tokens, cu = packed_example(np.random.default_rng(1), docs=4, max_len=40)
    assert batch.max_seqlen > 8
    if window < batch.max_seqlen:
        with pytest.raises(ValueError, match="sliding-window"):
            model(**model_inputs(batch))
        return
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0]
        per_doc = torch.cat([ref(input_ids=torch.tensor(tokens[a:b])[None]).logits[0] for a, b in zip(cu[:-1], cu[1:])])
    assert rel(packed, per_doc) < 1e-4


def test_fa4_custom_op_plumbing(monkeypatch):
    """The fa4 backend's custom ops (forward, backward, autograd wiring, CPU-scalar max_seqlen) on the CPU, with
    FlashAttention-4's two entry points replaced by the per-document reference (the real kernels: test_trainer_gpu)."""
    import trainer.varlen as varlen

    calls = []

    def fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, return_lse):
        calls.append(("fwd", max_seqlen_q, q.shape[1] // k.shape[1]))
        assert isinstance(max_seqlen_q, int) and return_lse
        out = varlen.sdpa_reference(q, k, v, cu_seqlens_q, causal, softmax_scale)
        return out, torch.zeros(q.shape[1], q.shape[0]), None, None, None

    def bwd(q, k, v, out, dout, lse, scale, causal, softcap, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k):
        calls.append(("bwd", max_seqlen_q, softcap))
        groups = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):  # softmax attention's gradients
            qd = q[a:b].transpose(0, 1)
            kd, vd = (x[a:b].transpose(0, 1).repeat_interleave(groups, 0) for x in (k, v))
            p = (qd @ kd.transpose(1, 2) * scale).masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1),
                                                              float("-inf")).softmax(-1)
            do = dout[a:b].transpose(0, 1)
            dp = do @ vd.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
            dq[a:b] = (ds @ kd).transpose(0, 1)
            dk[a:b] = (ds.transpose(1, 2) @ qd).unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
            dv[a:b] = (p.transpose(1, 2) @ do).unflatten(0, (-1, groups)).sum(1).transpose(0, 1)
        return dq, dk, dv

    monkeypatch.setattr(varlen, "_fa4", lambda: (fwd, bwd))
    monkeypatch.setattr(varlen, "resolve_backend", lambda backend, device, dtype: backend)  # fa4 needs a GPU
    rng = np.random.default_rng(5)
    cu, mx = random_cu(rng, 5, 20)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, 8, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out = varlen.varlen_attention(q, k, v, cu, torch.tensor(mx, dtype=torch.int32), backend="fa4")
    ref = reference_attention(q, k, v, cu, causal=True)
    assert rel(out, ref) < 1e-10
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel(a, b) < 1e-10
    assert calls == [("fwd", mx, 2), ("bwd", mx, 0.0)]  # native GQA: k/v reach the kernel with 2 heads, not 4
