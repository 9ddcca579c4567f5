"""GPU equivalences (skipped without CUDA): the fused varlen backends (fa4 where flash_attn.cute imports) in bf16
against the per-document reference, static-shape compile (one compile, the eager loss curve), a CUDA train run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer import model_inputs, varlen_attention
from trainer.data import make_varlen_batch
from trainer.varlen import available_backends, resolve_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BF16_TOL = 2e-2  # bf16 operands: ~1e-3..1e-2 relative error expected (8-bit mantissa)


def fused_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["torch"]
    return [b for b in available_backends("cuda", torch.bfloat16) if b != "sdpa"]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_cu(rng, docs, max_len):
    lens = rng.integers(1, max_len, docs)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device="cuda")
    return cu, int(lens.max())


def has_fa4() -> bool:
    return torch.cuda.is_available() and "fa4" in available_backends("cuda", torch.bfloat16)


def test_auto_picks_a_fused_backend():
    hopper_or_later = torch.cuda.get_device_capability()[0] >= 9
    picked = resolve_backend("auto", "cuda", torch.bfloat16)
    assert picked == "fa4" if has_fa4() else picked in ("flash_attn", "torch")
    assert not has_fa4() or hopper_or_later
    assert resolve_backend("auto", "cuda", torch.float32) == "sdpa"


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 8, 64), (8, 2, 64), (16, 4, 128), (32, 8, 128)])
def test_fused_backend_matches_reference_fwd_bwd(backend, heads, kv_heads, dim):
    rng = np.random.default_rng(heads + kv_heads + dim)
    for docs, max_len in [(1, 300), (7, 200), (40, 600)]:
        cu, mx = random_cu(rng, docs, max_len)
        T = int(cu[-1])
        q32 = torch.randn(T, heads, dim, device="cuda", requires_grad=True)
        k32 = torch.randn(T, kv_heads, dim, device="cuda", requires_grad=True)
        v32 = torch.randn(T, kv_heads, dim, device="cuda", requires_grad=True)
        g = torch.randn(T, heads, dim, device="cuda")
        ref = varlen_attention(q32, k32, v32, cu, mx, backend="sdpa")  # fp32 per-document reference
        non_causal = varlen_attention(q32.bfloat16(), k32.bfloat16(), v32.bfloat16(), cu, mx, backend=backend,
                                      causal=False)
        assert rel(non_causal, ref) > 5 * BF16_TOL  # the causal comparison below has teeth
        ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g)
        q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q32, k32, v32))
        out = varlen_attention(q, k, v, cu, mx, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), g.bfloat16())
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        assert rel(out, ref) < BF16_TOL
        for a, b in zip(grads, ref_grads):
            assert rel(a, b) < BF16_TOL


@pytest.mark.parametrize("backend", fused_backends())
def test_packed_logits_equal_per_document_logits_bf16(backend):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.model import register_attention

    register_attention()
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, use_cache=False)  # head_dim 64, GQA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=f"packprep_{backend}").cuda().eval()
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").cuda().eval()
    ref.load_state_dict(model.state_dict())
    rng = np.random.default_rng(0)
    lens = rng.integers(5, 400, 12)
    cu = np.concatenate([[0], np.cumsum(lens)])
    tokens = rng.integers(0, 1024, cu[-1])
    batch = make_varlen_batch(tokens, cu, np.ones(cu[-1]), np.array([0, cu[-1]])).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(**model_inputs(batch)).logits[0]
    with torch.no_grad():  # fp32 reference, one document at a time
        per_doc = torch.cat([ref(input_ids=torch.tensor(tokens[a:b], device="cuda")[None]).logits[0]
                             for a, b in zip(cu[:-1], cu[1:])])
        whole = ref(input_ids=batch.input_ids[None]).logits[0]
    assert rel(packed, per_doc) < BF16_TOL
    assert rel(whole, per_doc) > 5 * BF16_TOL  # without boundaries the documents interact: the check has teeth


@pytest.mark.parametrize("backend", fused_backends())
def test_fp32_weights_under_autocast_use_the_fused_kernel(backend, monkeypatch):
    """Training-mode forward/backward with fp32 master weights and bf16 autocast reaches the fused backend in bf16."""
    import trainer.varlen as varlen
    from trainer import build_model

    seen = []
    real = varlen.resolve_backend
    monkeypatch.setattr(varlen, "resolve_backend", lambda b, d, t: seen.append((b, t)) or real(b, d, t))
    model = build_model("tiny", backend, vocab_size=512).cuda().train()
    batch = make_varlen_batch(np.arange(1, 301) % 500, np.array([0, 100, 300]), np.ones(300), np.array([0, 300]))
    batch = batch.to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**model_inputs(batch)).logits.float().square().mean()
    loss.backward()
    assert seen and all(t == torch.bfloat16 for _, t in seen)


def test_train_step_on_cuda(tmp_path):
    from trainer_fixtures import random_lengths, write_packed

    from trainer.train import PEAK_FLOPS, TrainConfig, train

    write_packed(tmp_path, random_lengths(300, 512, seed=2), 512, vocab=1000)
    metrics = train(TrainConfig(shards=str(tmp_path), model="tiny", steps=20, batch_tokens=2048, lr=3e-3,
                                warmup_steps=2, device="cuda", attn="auto", log_every=1), echo=print)
    losses = [m["loss"] for m in metrics]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    if any(k in torch.cuda.get_device_name() for k in PEAK_FLOPS):  # a GPU whose peak is known reports MFU
        assert all(0 < m["mfu"] < 1 for m in metrics)
    assert all(m["fill"] <= 1 and m["data_s"] < m["step_s"] for m in metrics)


@pytest.mark.skipif(not has_fa4(), reason="needs flash_attn.cute (flash-attn-4) on Hopper/Blackwell")
def test_static_compile_compiles_once_and_matches_eager(tmp_path):
    """Static batches + fa4 + a compiled decoder: graphs are compiled in the first step only (a varying number of
    documents and longest length cause no recompile) and the loss curve is the eager one within bf16 noise."""
    from torch._dynamo.utils import counters
    from trainer_fixtures import random_lengths, write_packed
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.train import TrainConfig, train

    write_packed(tmp_path / "shards", random_lengths(400, 512, seed=4), 512, vocab=1000, token_high=50)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # head_dim 64, GQA
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    base = dict(shards=str(tmp_path / "shards"), model=str(tmp_path / "model"), steps=12, batch_tokens=2048,
                lr=3e-3, warmup_steps=2, device="cuda", attn="fa4", log_every=1)
    eager = [m["loss"] for m in train(TrainConfig(**base), echo=print)]
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    seen = []
    metrics = train(TrainConfig(**base, compile=True), echo=lambda line: seen.append(
        counters["stats"]["unique_graphs"]))
    compiled = [m["loss"] for m in metrics]
    # seen[0]: at the header line, before any step; seen[k]: after step k. Graphs appear in step 1 only.
    assert seen[1] > before and len(set(seen[1:])) == 1, seen
    assert np.allclose(compiled, eager, rtol=2e-2, atol=2e-2), (compiled, eager)
    assert compiled[-1] < compiled[0] - 0.5
