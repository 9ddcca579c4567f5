"""The batched tokenize work (`packprep.offsets`): both backends give the contract's ids, masks and lengths on the
edge cases of byte offsets: empty prompt or completion, multibyte characters at the join and split across tokens,
added and special tokens in the text (one with lstrip/rstrip), NFC-changing text, a BOS-adding template, chats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizer_zoo
from tokenizer_zoo import family_folder

from packprep.offsets import finish, mask_from, tiktoken_batch
from packprep.records import Docs
from packprep.tokenizer import BUILTIN, Tokenizer

pytest.importorskip("tiktoken")
zoo_root = tokenizer_zoo.zoo_root

PAIRS = [("", "completion only"), ("prompt only", ""), ("", ""), ("a b", "c"), ("naïve ", "café"),
         ("日本", "語のテキスト"), ("x", "🤗🚀 emoji"), ("🤗", "🚀"), ("ends with é", "\u0301 combining"),
         ("decomposed e\u0301 ", "answer"), ("q", "a\u0301e\u0301"), ("text <|endoftext|> inside", " more"),
         ("join<|im_start|>", "<|im_end|>tail"), ("<|endoftext|>", ""), ("", "<|endoftext|>"), ("x <mask> y", " z"),
         ("before ", " <mask> after"), ("   ", "\n\n\n"), ("tabs\t", "\tx"), ("Ελληνικά ", "кириллица"),
         ("12345678", "90123"), ("done", "<|end_of_text|>")]


@pytest.fixture(scope="module")
def folder(zoo_root, tmp_path_factory):
    """Llama-3 kind (BOS template) with an NFC normalizer and an lstrip/rstrip added token: every fallback path."""
    from tokenizers import AddedToken, normalizers
    from tokenizers import Tokenizer as Rust

    src = family_folder(zoo_root, "bytelevel_bos")
    rust = Rust.from_file(str(src / "tokenizer.json"))
    rust.normalizer = normalizers.NFC()
    rust.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, normalized=False)])
    out = tmp_path_factory.mktemp("nfc_bos")
    rust.save(str(out / "tokenizer.json"))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = tokenizer_zoo.chat_template("chatml", True)  # generation markers: assistant_masks
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def pair_reference(tok: Tokenizer, p: str, c: str) -> tuple[list[int], list[int]]:
    """The contract in a few obvious lines over HF's per-document encode (character offsets)."""
    if not p + c:
        return [], []
    enc = tok.rust.encode(p + c)
    body = [k for k, added in enumerate(enc.special_tokens_mask) if not added]
    content = [k for k in body if enc.offsets[k][0] >= len(p)]
    first = content[0] if content else body[-1] + 1 if body else 0
    ids, mask = list(enc.ids), [0] * first + [1] * (len(enc.ids) - first)
    if ids[-1] != tok.eos_id:
        ids, mask = ids + [tok.eos_id], mask + [1]
    return ids, mask


@pytest.mark.parametrize("where", ["builtin", "nfc_bos"])
def test_pairs_equal_the_reference_on_both_backends(where, folder):
    path = BUILTIN if where == "builtin" else folder
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    ref = [pair_reference(Tokenizer(path), p, c) for p, c in PAIRS]
    for backend in ("hf", "tiktoken"):
        ids, mask, lengths, _ = Tokenizer(path, backend).encode(Docs(prompts=prompts, completions=completions))
        assert lengths.tolist() == [len(r[0]) for r in ref], backend
        assert ids.tolist() == sum((r[0] for r in ref), []), backend
        assert mask.tolist() == sum((r[1] for r in ref), []), backend
        assert ids.dtype == np.int32 and mask.dtype == np.uint8 and lengths.dtype == np.int32


def test_the_fallbacks_are_exercised(folder):
    """NFC-changing text and the lstrip/rstrip token have no exact byte offsets (HF's are used); the rest do."""
    tt = Tokenizer(folder, "tiktoken").tiktoken
    texts = ["decomposed e\u0301", "x <mask> y", "plain", "日本語 🤗", "<|im_start|>ok"]
    batch = tiktoken_batch(tt, texts, add_special_tokens=True)
    assert batch.exact.tolist() == [False, False, True, True, True]
    assert batch.pre == 1 and batch.suf == 0 and batch.added.sum() == len(texts)  # the BOS of each text
    assert (tt.token_sizes[batch.flat] > 0).all()


def test_texts_and_chats_equal_hf_on_both_backends(folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    texts = ["", "one two", "decomposed e\u0301", "x <mask> y", "🤗🚀", "end<|end_of_text|>"]
    tokens = {}
    for backend in ("hf", "tiktoken"):
        tokens[backend] = Tokenizer(folder, backend).encode(Docs(texts=texts))[:3]
    eos = Tokenizer(folder).eos_id
    want = [[] if not t else hf(t).input_ids + ([eos] if hf(t).input_ids[-1] != eos else []) for t in texts]
    for backend, (ids, mask, lengths) in tokens.items():
        assert ids.tolist() == sum(want, []) and lengths.tolist() == list(map(len, want)) and mask.all(), backend
    chats = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
             for u, a in [("q", "é at the start"), ("日本", "語"), ("e\u0301", "decomposed"), ("x <mask>", "<mask> y"),
                          ("🤗", "🚀🚀")]]
    for backend in ("hf", "tiktoken"):
        ids, mask, lengths, notes = Tokenizer(folder, backend).encode(Docs(chats=chats))
        at = 0
        for msgs, n in zip(chats, lengths.tolist()):
            ref = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert ids[at:at + n].tolist() == list(ref["input_ids"]), (backend, msgs)
            assert mask[at:at + n].tolist() == list(ref["assistant_masks"]), (backend, msgs)
            at += n
        assert notes["no_assistant"] == 0


def test_tiktoken_tokenizer_reads_what_hf_reads(folder, zoo_root):
    """EOS id, special strings and vocabulary size come from tokenizer.json (no `tokenizers` load) and equal HF's."""
    for path in (BUILTIN, folder, family_folder(zoo_root, "bytelevel")):
        hf, tt = Tokenizer(path, "hf"), Tokenizer(path, "tiktoken")
        assert (tt.eos_id, sorted(tt.special_strings), tt.vocab_size) == (
            hf.eos_id, sorted(hf.special_strings), hf.rust.get_vocab_size(with_added_tokens=True))
        assert tt._rust is None  # nothing above loaded it


def test_finish_and_mask_from():
    # flat [5, 6, 7, 2], lens [2, 0, 2], EOS 2: appended after the first document only
    ids, mask, lengths = finish(np.array([5, 6, 7, 2], np.int32), np.array([2, 0, 2]), np.array([0, 1, 1, 1], np.uint8),
                                2, eos=True)
    assert ids.tolist() == [5, 6, 2, 7, 2] and mask.tolist() == [0, 1, 1, 1, 1] and lengths.tolist() == [3, 0, 2]
    ids, mask, lengths = finish(np.zeros(0, np.int32), np.array([0, 0]), None, 2, eos=True)
    assert ids.tolist() == [] and lengths.tolist() == [0, 0]
    assert mask_from(np.array([3, 0, 2]), np.array([1, 0, 0])).tolist() == [0, 1, 1, 1, 1]
