"""The tiktoken backend gives HF `tokenizers`' ids exactly, and refuses what it cannot represent."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import tokenizer_zoo
from tokenizer_zoo import BUILTIN, FAMILIES, LLAMA3_PATTERN, training_texts, zoo_tokenizer
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from packprep.backend import check_sample
from packprep.tiktoken_backend import TiktokenBackend, unsupported_reason

zoo_root = tokenizer_zoo.zoo_root  # the session's zoo folder (a fixture)
SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
PIECES = ["héllo wörld", "naïve café", "日本語のテキスト", "🤗🚀 emoji", "Ελληνικά", "кириллица", "a\u0301e\u0301",
          "   ", "\t\t", "\n\n\n", " \n \n", "12345678901", "3.14159", "x=1;y=22", "don't", "I'LL", "snake_case",
          "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|im_start", "|>", "<mask>",
          " <mask> ", "x<mask>y", "[TOOL]", "tool", "  [TOOL]  ", "def f(x):\n    return x\n", "\u2000\u3000"]


def real_texts(n: int = 300) -> list[str]:
    return training_texts()[:n]


def mixed_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Unicode, whitespace runs, digits, special- and added-token strings glued at random; some long."""
    rng = np.random.default_rng(seed)
    out = ["", " ", "<|endoftext|>", "<|endoftext|><|endoftext|>", "a<|im_end|>\n", "\n<|im_start|>"]
    for i in range(n):
        k = int(rng.integers(1, 400 if i % 50 == 0 else 30))
        out.append("".join(PIECES[j] + (" " if rng.random() < 0.5 else "") for j in rng.integers(0, len(PIECES), k)))
    return out


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    """A byte-level BPE trained here (Llama-3's split regex, NFC), with special and added tokens of every flag."""
    tok = Tokenizer(models.BPE(ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = real_texts(2000) + mixed_texts(500, seed=1)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True, single_word=True, normalized=False),
                    AddedToken("[TOOL]", lstrip=True, normalized=True), AddedToken("café", normalized=True)])
    return tok


def hf_ids(tok: Tokenizer, texts: list[str], special: bool = False) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=special)]


def test_builtin_equals_hf():
    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    assert unsupported_reason(BUILTIN) is None
    fast = TiktokenBackend(BUILTIN)
    texts = real_texts() + mixed_texts()
    assert fast.encode_batch(texts) == hf_ids(tok, texts)
    assert check_sample(fast, texts) is None
    assert fast.encode_batch(texts[:50], num_threads=2) == hf_ids(tok, texts[:50])
    assert sum(t.count("<|endoftext|>") for t in texts) > 20  # the special-token path is exercised


def test_trained_bpe_with_added_tokens_equals_hf(trained):
    fast = TiktokenBackend(trained)
    texts = mixed_texts(400, seed=2) + real_texts()
    assert fast.encode_batch(texts) == hf_ids(trained, texts)
    # every flag changed the result somewhere: the test is not passing on plain text alone
    ids = {trained.token_to_id(t) for t in ("<mask>", "[TOOL]", "café", "<|im_end|>")}
    assert ids <= {i for row in hf_ids(trained, texts) for i in row}
    assert hf_ids(trained, ["x<mask>y"]) != hf_ids(trained, ["x <mask> y"])  # single_word declined one


def test_special_tokens_as_text(trained):
    """encode_special_tokens=True (transformers' split_special_tokens): special strings in the text are plain text,
    non-special added tokens still split, as in HF."""
    hf = Tokenizer.from_str(trained.to_str())
    hf.encode_special_tokens = True
    fast = TiktokenBackend(trained, encode_special_tokens=True)
    texts = mixed_texts(200, seed=6)
    assert fast.encode_batch(texts) == hf_ids(hf, texts)
    assert check_sample(fast, texts) is None
    assert hf_ids(hf, ["<|im_end|>"]) != hf_ids(trained, ["<|im_end|>"])  # the switch changes something
    assert pickle.loads(pickle.dumps(fast)).encode("a<|im_end|>") == fast.encode("a<|im_end|>")


def test_post_processor_bos(trained):
    bos = trained.token_to_id("<|begin_of_text|>")
    trained = Tokenizer.from_str(trained.to_str())
    trained.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])])
    fast = TiktokenBackend(trained)
    texts = mixed_texts(100, seed=3)
    assert fast.encode_batch(texts, add_special_tokens=True) == hf_ids(trained, texts, special=True)
    assert all(row[0] == bos for row in fast.encode_batch(texts, add_special_tokens=True))
    assert fast.encode_batch(texts) == hf_ids(trained, texts)


def test_pickles(trained):
    fast = pickle.loads(pickle.dumps(TiktokenBackend(trained)))
    texts = mixed_texts(50, seed=4)
    assert fast.encode_batch(texts) == hf_ids(trained, texts)


def test_check_sample_names_the_first_difference():
    """A vocabulary where tiktoken's whole-piece lookup differs from HF's merges: abcd has merge (ab, cd), but HF
    merges b+c first and gets stuck at [a, bc, d]; check_sample must say so."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for t in ("bc", "ab", "cd", "abcd"):
        vocab[t] = len(vocab)
    merges = [("b", "c"), ("a", "b"), ("c", "d"), ("ab", "cd")]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast = TiktokenBackend(tok)
    assert hf_ids(tok, ["abcd"]) == [[vocab["a"], vocab["bc"], vocab["d"]]]
    miss = check_sample(fast, ["ab cd", "x\nabcd"])
    assert miss is not None and (miss.index, miss.position) == (1, 2), miss
    assert miss.hf[0] == vocab["a"] and miss.tiktoken[0] == vocab["abcd"]


def test_refuses_what_it_cannot_represent(trained):
    spec = json.loads(trained.to_str())
    cases = {
        "normalizer": dict(spec, normalizer={"type": "Lowercase"}),
        "add_prefix_space": dict(spec, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True,
                                                      "trim_offsets": True, "use_regex": True}),
        "not BPE": dict(spec, model={"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}),
    }
    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))  # SentencePiece style: Metaspace, byte fallback
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.train_from_iterator(real_texts(200), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                                show_progress=False))
    cases["byte_fallback"] = json.loads(sp.to_str())
    for want, case in cases.items():
        why = unsupported_reason(case)
        assert why is not None and want.split()[0].lower() in why.lower(), (want, why)
        with pytest.raises(ValueError, match="tiktoken cannot represent"):
            TiktokenBackend(case)


@pytest.mark.parametrize("family", FAMILIES)
def test_zoo_families(zoo_root, family):
    """Byte-level families are represented (BOS from the post-processor included) and give HF's ids on rendered
    chats; SentencePiece families are refused."""
    from transformers import AutoTokenizer

    folder = zoo_tokenizer(zoo_root, family, "llama3")
    why = unsupported_reason(folder)
    if family.startswith("spm_"):
        assert why is not None and ("byte_fallback" in why or "Unigram" in why), why
        return
    assert why is None, why
    tok = AutoTokenizer.from_pretrained(str(folder))
    chats = [tok.apply_chat_template([{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}],
                                     tokenize=False) for t in mixed_texts(60, seed=5)]
    fast, hf = TiktokenBackend(folder), tok.backend_tokenizer
    for special in (False, True):
        assert fast.encode_batch(chats, add_special_tokens=special) == hf_ids(hf, chats, special)
    assert tok(chats[:3]).input_ids == fast.encode_batch(chats[:3], add_special_tokens=True)


def test_auto_names_where_the_backends_first_differ():
    """The auto check's fallback line says which of lengths, ids or mask differ first, and where."""
    from packprep.backend import _first_difference

    ids, mask, lens = np.array([5, 6, 2, 7, 2]), np.array([0, 1, 1, 1, 1]), np.array([3, 2])
    assert _first_difference((ids, mask, lens), (ids.copy(), mask.copy(), lens.copy())) is None
    assert _first_difference((ids, mask, lens), (np.array([5, 6, 2, 8, 2]), mask, lens)) == "ids differ at token 3"
    assert _first_difference((ids, mask, lens), (ids, np.array([1, 1, 1, 1, 1]), lens)) == "loss masks differ at token 0"
    assert _first_difference((ids, mask, lens), (ids[:4], mask[:4], np.array([3, 1]))) == "lengths differ at document 1"
