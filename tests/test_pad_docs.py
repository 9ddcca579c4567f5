"""--pad-docs-to-multiple N (context parallelism): every document (every piece) is a slot of its real tokens then pad
tokens without loss, slot lengths multiples of N, packed by slot length; the shards keep the slots (doc_offsets) and
the real offsets (doc_offsets_unpadded); verify checks the layout; the trainer's varlen path and packprep.hf give each
document's real tokens exactly its own logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_exports
import torch
from build_fixtures import texts, write_corpora
from trainer_fixtures import one_torch_thread

from packprep.build import build
from packprep.config import BuildConfig, Source
from packprep.shards import SCHEMA, SCHEMA_PADDED, open_shard, shard_files
from packprep.verify import _check_padding, verify

N = 8
SEQ = 256
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
readers = test_exports.readers  # the fixture that installs the stacks' reader venvs (once per session)


def _build(folder, inputs, **kw):
    cfg = dict(inputs=tuple(map(str, inputs)), out=str(folder), seq_len=SEQ, long_docs="split", shard_rows=15,
               workers=1)
    build(BuildConfig(**{**cfg, **kw}))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pad_in")
    files = write_corpora(d, n=30)
    extra = d / "long.jsonl"  # two documents longer than seq_len: split into pieces
    extra.write_text("".join(json.dumps({"text": " ".join(texts(1, seed=s, lo=300, hi=301))}) + "\n"
                             for s in (9, 10)))
    return [files["prompt-completion"], files["chat"], files["text"], extra]


@pytest.fixture(scope="module")
def pair(inputs, tmp_path_factory):
    """The same inputs built unpadded and with --pad-docs-to-multiple N."""
    d = tmp_path_factory.mktemp("pad_builds")
    return _build(d / "plain", inputs), _build(d / "padded", inputs, pad_docs_to_multiple=N)


def rows_of(out) -> list[dict]:
    return [r for f in shard_files(out) for r in open_shard(f).to_pylist()]


def documents(out) -> dict:
    """doc id -> its pieces' (real tokens, loss_mask), sorted; pads stripped by doc_offsets_unpadded."""
    docs = {}
    for r in rows_of(out):
        offs, unpadded = r["doc_offsets"], r.get("doc_offsets_unpadded") or r["doc_offsets"]
        for i, d in enumerate(r["doc_ids"]):
            a, n = offs[i], unpadded[i + 1] - unpadded[i]
            docs.setdefault(d, []).append((tuple(r["input_ids"][a:a + n]), tuple(r["loss_mask"][a:a + n])))
    return {d: sorted(p) for d, p in docs.items()}


def test_padded_layout_real_tokens_and_manifest(pair):
    plain, padded = pair
    m = json.loads((padded / "packprep.json").read_text())
    pad_id = m["padding"]["pad_id"]
    assert m["padding"]["multiple"] == N and m["format_minor"] == 2 and m["config"]["pad_docs_to_multiple"] == N
    # the builtin tokenizer's pad token is its EOS, <|endoftext|>
    assert m["padding"]["from"] == "pad_token" and pad_id == m["tokenizer"]["eos_id"]
    assert open_shard(shard_files(padded)[0]).schema.equals(SCHEMA_PADDED)
    pads = 0
    for r in rows_of(padded):
        ids, offs, u = np.array(r["input_ids"]), np.array(r["doc_offsets"]), np.array(r["doc_offsets_unpadded"])
        slot, real = np.diff(offs), np.diff(u)
        assert len(ids) <= SEQ and (slot % N == 0).all() and ((slot - real >= 0) & (slot - real < N)).all()
        assert r["seq_lengths"] == slot.tolist()
        for a, n, s in zip(offs[:-1], real, slot):
            assert (ids[a + n:a + s] == pad_id).all()
            assert not any(r["loss_mask"][a + n:a + s]) and set(r["labels"][a + n:a + s]) <= {-100}
            pads += s - n
    assert pads == m["counts"]["pad_tokens"] > 0
    # the documents' real tokens and masks are the unpadded build's, piece for piece
    assert documents(padded) == documents(plain)
    report = verify(padded, tokens=40)  # + 40 documents re-tokenized by transformers against their real tokens
    assert report.ok and any(name.startswith("tokens vs reference") for name, _, _ in report.checks), report.failures


def test_split_pieces_are_each_padded(pair):
    _, padded = pair
    pieces = {}
    for r in rows_of(padded):
        for i, d in enumerate(r["doc_ids"]):
            pieces.setdefault(d, []).append((r["doc_offsets_unpadded"][i + 1] - r["doc_offsets_unpadded"][i],
                                             r["seq_lengths"][i]))
    split = {d: p for d, p in pieces.items() if len(p) > 1}
    assert len(split) >= 2
    for p in split.values():  # every piece but the last is seq_len real tokens; the last is padded to N
        real = sorted(p, reverse=True)
        assert all(r == s == SEQ for r, s in real[:-1]) and real[-1][1] == -(-real[-1][0] // N) * N


def test_unpadded_build_keeps_format_1_1(pair):
    plain, _ = pair
    m = json.loads((plain / "packprep.json").read_text())
    assert m["format_minor"] == 1 and "padding" not in m and "pad_tokens" not in m["counts"]
    assert open_shard(shard_files(plain)[0]).schema.equals(SCHEMA)


def test_random_strategy_mixture_and_verify_finds_bad_padding(inputs, pair, tmp_path):
    out = _build(tmp_path / "random", inputs[:1], strategy="random", pad_docs_to_multiple=N)
    assert verify(out).ok, verify(out).failures
    # a mixture's per-source token counts are real tokens, recounted by verify from the padded shards
    mix = tmp_path / "mix"
    build(BuildConfig(sources=(Source(paths=(str(inputs[0]),), weight=1.0), Source(paths=(str(inputs[2]),),
                                                                                    weight=1.0)),
                      out=str(mix), seq_len=SEQ, pad_docs_to_multiple=N, workers=1))
    assert verify(mix).ok, verify(mix).failures
    _, padded = pair
    table = open_shard(shard_files(padded)[0])
    pad = json.loads((padded / "packprep.json").read_text())["padding"]
    assert _check_padding(table, pad) == []
    assert _check_padding(table, {**pad, "multiple": 3 * N}) != []
    mask = table.column("loss_mask").combine_chunks()
    values = mask.values.to_numpy().copy()
    base = 0
    for r in table.to_pylist():  # the first pad: a slot's first position past its real tokens
        offs, u = r["doc_offsets"], r["doc_offsets_unpadded"]
        with_pads = [i for i in range(len(offs) - 1) if offs[i + 1] - offs[i] > u[i + 1] - u[i]]
        if with_pads:
            i = with_pads[0]
            values[base + offs[i] + u[i + 1] - u[i]] = 1
            break
        base += len(r["input_ids"])
    bad = table.set_column(3, "loss_mask", type(mask).from_arrays(mask.offsets, values))
    assert "carries loss" in _check_padding(bad, pad)[0]


def test_pad_token_else_eos():
    from types import SimpleNamespace

    from packprep.layout import padding

    vocab = {"<pad>": 3, "</s>": 2}
    tok = SimpleNamespace(special={"pad_token": "<pad>", "eos_token": "</s>"}, eos_id=2,
                          rust=SimpleNamespace(token_to_id=vocab.get))
    cfg = BuildConfig(pad_docs_to_multiple=4)
    assert padding(cfg, tok) == {"multiple": 4, "pad_id": 3, "pad_token": "<pad>", "from": "pad_token"}
    tok.special["pad_token"] = None
    assert padding(cfg, tok) == {"multiple": 4, "pad_id": 2, "pad_token": "</s>", "from": "eos_token"}
    assert padding(BuildConfig(), tok) is None


def test_config_errors(cli_error, tmp_path):
    line = cli_error("build", "--out", tmp_path / "o", "--seq-len", 100, "--pad-docs-to-multiple", 8)
    assert "seq_len 100 is not a multiple of --pad-docs-to-multiple 8" in line
    with pytest.raises(ValueError, match="pad_docs_to_multiple must be an integer >= 1"):
        BuildConfig(pad_docs_to_multiple=0)
    with pytest.raises(ValueError, match="not a multiple of --pad-docs-to-multiple 3"):
        BuildConfig(seq_len=256, pad_docs_to_multiple=3)
    assert "pad_docs_to_multiple" not in BuildConfig().output_keys()  # unpadded builds keep their identity


def _tiny(vocab: int):
    from trainer import build_model

    torch.manual_seed(0)
    model = build_model("tiny", "sdpa", vocab_size=vocab).eval()
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _per_document(ref, docs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([ref(input_ids=torch.tensor(d, dtype=torch.long)[None], use_cache=False).logits[0]
                          for d in docs])


def real_documents(rows) -> tuple[list, list, list]:
    """Rows flattened one after the other: each document's real tokens, their positions, the pads' positions."""
    docs, real, pads, base = [], [], [], 0
    for r in rows:
        offs, u = r["doc_offsets"], r["doc_offsets_unpadded"]
        for i in range(len(offs) - 1):
            a, n = base + offs[i], u[i + 1] - u[i]
            docs.append(r["input_ids"][offs[i]:offs[i] + n])
            real += range(a, a + n)
            pads += range(a + n, base + offs[i + 1])
        base += len(r["input_ids"])
    assert len(docs) > len(rows) and pads  # several documents per row, some of them padded
    return docs, real, pads


def test_trainer_varlen_padded_logits_equal_per_document_logits(pair):
    """Through trainer.data (PackedShards) and the varlen attention: the real tokens of each padded slot get the
    logits of their document alone; pads carry no label."""
    from trainer import model_inputs
    from trainer.data import PackedShards

    _, padded = pair
    vocab = json.loads((padded / "packprep.json").read_text())["tokenizer"]["vocab_size"]
    model, ref = _tiny(vocab)
    shards = PackedShards(padded, batch_tokens=4 * SEQ, seed=0)
    rows = rows_of(padded)[:4]
    batch = shards.batch(np.arange(4))  # what its iterator yields for these rows
    assert batch.input_ids.tolist() == [t for r in rows for t in r["input_ids"]]
    docs, real, pads = real_documents(rows)
    assert (batch.labels[pads] == -100).all()
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[0]
    want = _per_document(ref, docs)
    assert float((logits[real] - want).abs().max()) < 1e-4
    # not vacuous: the same real tokens without the document boundaries get other logits
    with torch.no_grad():
        whole = ref(input_ids=torch.tensor([t for d in docs for t in d])[None], use_cache=False).logits[0]
    assert float((whole - want).abs().max()) > 1e-2


def test_hf_collator_through_trainer_on_a_padded_build(pair, tmp_path):
    """packprep.hf's PackedCollator through transformers.Trainer.predict on load_from_disk(padded build): the real
    tokens' logits equal per-document logits; position ids restart at every slot; the pads' labels are -100."""
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    from packprep.hf import PackedCollator

    _, padded = pair
    ds = datasets.load_from_disk(str(padded))
    assert "doc_offsets_unpadded" in ds.column_names
    vocab = json.loads((padded / "packprep.json").read_text())["tokenizer"]["vocab_size"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                          remove_unused_columns=False, use_cpu=True)
    pred = transformers.Trainer(model=model, args=args, data_collator=PackedCollator()).predict(ds.select(range(2)))
    logits = torch.as_tensor(pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions)[0]
    rows = [ds[i] for i in range(2)]
    docs, real, pads = real_documents(rows)
    batch = PackedCollator()(rows)
    assert (batch["labels"][0, pads] == -100).all()
    starts = [b + o for b, r in zip([0, len(rows[0]["input_ids"])], rows) for o in r["doc_offsets"][:-1]]
    assert (batch["position_ids"][0, starts] == 0).all()
    want = _per_document(model, docs)
    assert float((logits[real] - want).abs().max()) < 1e-4


# ---------------------------------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def padded_expected(pair, tmp_path_factory):
    return test_exports.expected_of(pair[1], tmp_path_factory.mktemp("pad_expected"))


@pytest.mark.parametrize("fmt", ["megatron", "olmo", "mds", "litdata"])
def test_exports_of_a_padded_build_hold_the_real_documents(fmt, pair, padded_expected, readers, tmp_path):
    """megatron, olmo, mds and litdata get each document's real tokens and boundaries, read back by their own
    readers with the assertions of test_exports (on the unpadded rows)."""
    te = test_exports
    check = {"megatron": te.test_megatron_read_by_indexed_dataset_and_bytes_match_their_builder,
             "olmo": te.test_olmo_read_by_packed_fsl_dataset_with_explicit_boundaries}.get(fmt)
    if check is None:
        te.test_row_formats_read_by_streaming_dataset_and_bytes_match_their_writer(fmt, pair[1], padded_expected,
                                                                                   readers, tmp_path)
    else:
        check(pair[1], padded_expected, readers, tmp_path)
    e = padded_expected
    assert (e["slots"] > e["lengths"]).any() and len(e["tokens"]) < sum(e["slots"])  # the pads really are gone


def test_nemo_export_of_a_padded_build_is_their_context_parallel_layout(pair, padded_expected, readers, tmp_path):
    """Megatron-Bridge's GPTSFTPackedDataset(pad_seq_to_mult=N) on the export: its cu_seqlens are packprep's slots,
    its inputs each document's real tokens then EOS to the slot length, and no loss on a pad."""
    from reader_envs import run_reader

    readers("nemo")
    manifest = test_exports.export_fast(pair[1], "nemo", tmp_path / "n", container="npy")
    assert manifest["pad_seq_to_mult"] == N
    e = padded_expected
    run_reader("nemo", "nemo_read.py", tmp_path / "n", e["path"], tmp_path / "r.npz", str(N))
    r = np.load(tmp_path / "r.npz")
    eos = int(e["eos_id"])
    docs = np.split(e["tokens"], np.cumsum(e["lengths"])[:-1])
    masks = np.split(e["mask"], np.cumsum(e["lengths"])[:-1])
    stored = [np.concatenate([d, np.full(p - len(d) + 1, eos)]) for d, p in zip(docs, e["slots"])]
    inputs = np.concatenate([x[:-1] for x in stored])
    assert r["tokens"].tolist() == inputs.tolist()
    assert r["labels"].tolist() == np.concatenate([x[1:] for x in stored]).tolist()
    shifted = np.concatenate([np.concatenate([m[1:], np.zeros(p - len(m) + 1, np.uint8)])
                              for m, p in zip(masks, e["slots"])])
    assert r["loss_mask"].tolist() == (shifted * (inputs != eos)).tolist()
    rows = [e["slots"][a:b] for a, b in zip(e["row_docs"][:-1], e["row_docs"][1:])]
    assert r["cu_seqlens"].tolist() == np.concatenate([np.concatenate([[0], np.cumsum(x)]) for x in rows]).tolist()
    assert (np.concatenate([np.diff(np.concatenate([[0], np.cumsum(x)])) for x in rows]) % N == 0).all()
    # their real lengths: up to the last non-EOS input of each slot, never into the padding
    real = [int(np.flatnonzero(x[:-1] != eos)[-1]) + 1 for x in stored]
    per_row = [real[a:b] for a, b in zip(e["row_docs"][:-1], e["row_docs"][1:])]
    assert r["cu_seqlens_unpadded"].tolist() == np.concatenate([np.concatenate([[0], np.cumsum(x)])
                                                                 for x in per_row]).tolist()
    assert all(u <= len(d) for u, d in zip(real, docs))
