"""Conformance: packprep's shards hold exactly the model family's own tokens and loss masks (issue 10's contract).

For every zoo family (tests/tokenizer_zoo.py) x format (text, prompt-completion, alpaca; chat and ShareGPT x every
template, plain and with {% generation %} markers), the documents read back from the shards are compared with:
  - text: transformers' `tokenizer(text)` + EOS unless already last; every token carries loss;
  - prompt/completion, alpaca: `tokenizer(prompt + completion)` + EOS unless last; the loss mask equals TRL's
    completion mask (`trl.data_utils.common_prefix_length` of the prompt's and the pair's tokens, TRL's own rule)
    wherever `tokenizer(prompt)` is a prefix of the pair's tokens, and starts at the completion's first character;
  - chat, ShareGPT: `apply_chat_template(messages)` exactly, and the loss mask equals transformers'
    `assistant_masks` (return_assistant_tokens_mask) of the template with markers, for the plain template too
    (same text, same tokens: the turn-by-turn location must find exactly what the markers mark), and equals the
    labels of TRL's own preparation with `assistant_only_loss=True` (which accepts only the marked template);
    TRL refuses a conversation without an assistant turn, packprep keeps it with no loss.
Byte-level families are built again with the tiktoken backend: the shards must be byte-identical (same sha256).
Cost: one build per (family, template, markers) plus one per family for the non-chat formats, small corpora.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizer_zoo
from build_fixtures import read_docs
from tokenizer_zoo import FAMILIES, TEMPLATES, zoo_tokenizer

from packprep.build import build
from packprep.config import BuildConfig

transformers = pytest.importorskip("transformers")
trl_data = pytest.importorskip("trl.data_utils")
zoo_root = tokenizer_zoo.zoo_root
BYTE_LEVEL = ("bytelevel", "bytelevel_bos")

TEXTS = ["hello world", "héllo wörld, naïve café 日本語 🤗", "ends with the EOS string<EOS>", "  two  spaces\n\nlines",
         "12345 678.90", "a literal <|im_start|> marker inside", "x"]
PAIRS = [("Review: great film\nSentiment:", "\nnegative"), ("Q: 2 + 2?\nA:", " 4"), ("Translate: chat\n", "cat"),
         ("Say nothing", ""), ("héllo ", "wörld 🤗"), ("a\n\n", "b<EOS>")]
ALPACA = [("Add the numbers", "1 2", "3"), ("Greet", "", "Hello there."), ("Échoue", "é", " naïve")]


def conversations(template: str) -> list[list[dict]]:
    system = [] if template == "gemma" else [{"role": "system", "content": "Be brief."}]
    return [
        system + [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
        system + [{"role": "user", "content": "And 日本 + 🤗?"}, {"role": "assistant", "content": " Unknown,  sorry."},
                  {"role": "user", "content": "ok"}, {"role": "assistant", "content": "Bye.\n"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello <|im_end|> you"}],
        [{"role": "user", "content": "Only a question?"}],  # no assistant turn: kept, no loss, counted
    ]


def _write(folder: Path, name: str, rows: list[dict]) -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _build(inputs: list[Path], out: Path, tokenizer: Path, backend: str = "hf") -> dict:
    cfg = BuildConfig(inputs=tuple(map(str, inputs)), out=str(out), tokenizer=str(tokenizer), seq_len=1024,
                      workers=1, shuffle=False, tokenizer_backend=backend)
    return build(cfg).manifest


def _docs(out: Path) -> list[tuple[list[int], list[int]]]:
    docs = read_docs(out)
    return [(np.concatenate([p[0] for p in docs[d]]).tolist(), np.concatenate([p[1] for p in docs[d]]).tolist())
            for d in sorted(docs)]


TALLY: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    TALLY[key] = TALLY.get(key, 0) + n


@pytest.fixture(scope="module")
def built(zoo_root, tmp_path_factory):
    """{(family, template or None, markers, backend): (manifest, documents)}: every build of the suite, once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("os.fsync", lambda fd: None)  # durability is not under test here; the bytes are the same
        yield _build_all(zoo_root, tmp_path_factory.mktemp("conformance"))


def _build_all(zoo_root: Path, root: Path):
    data = root / "data"
    data.mkdir()
    eos = {}
    results = {}
    for family in FAMILIES:
        folder = zoo_tokenizer(zoo_root, family, "chatml")
        eos[family] = transformers.AutoTokenizer.from_pretrained(str(folder)).eos_token
        sub = data / family
        sub.mkdir()
        files = [_write(sub, "a_text.jsonl", [{"text": t.replace("<EOS>", eos[family])} for t in TEXTS]),
                 _write(sub, "b_pc.jsonl", [{"prompt": p, "completion": c.replace("<EOS>", eos[family])}
                                            for p, c in PAIRS]),
                 _write(sub, "c_alpaca.jsonl", [{"instruction": i, "input": x, "output": o} for i, x, o in ALPACA])]
        for backend in ("hf", "tiktoken") if family in BYTE_LEVEL else ("hf",):
            out = root / f"{family}-plain-{backend}"
            results[(family, None, False, backend)] = (_build(files, out, folder, backend), _docs(out))
        for template in TEMPLATES:
            convs = conversations(template)
            names = {"user": "human", "assistant": "gpt"}
            sharegpt = [[{"from": names.get(m["role"], m["role"]), "value": m["content"]} for m in c] for c in convs]
            chat_files = [_write(sub, f"d_{template}_chat.jsonl", [{"messages": c} for c in convs]),
                          _write(sub, f"e_{template}_sharegpt.jsonl", [{"conversations": c} for c in sharegpt])]
            for markers in (False, True):
                folder = zoo_tokenizer(zoo_root, family, template, markers)
                for backend in ("hf", "tiktoken") if family in BYTE_LEVEL else ("hf",):
                    out = root / f"{family}-{template}-{markers}-{backend}"
                    results[(family, template, markers, backend)] = (_build(chat_files, out, folder, backend),
                                                                     _docs(out))
    return results, eos


@pytest.mark.parametrize("family", FAMILIES)
def test_text_prompt_completion_alpaca(built, zoo_root, family):
    results, eos = built
    tok = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer(zoo_root, family, "chatml")))
    manifest, docs = results[(family, None, False, "hf")]
    assert manifest["tokenizer"]["backend"] == "hf"
    want = []
    for t in TEXTS:
        ids = tok(t.replace("<EOS>", eos[family])).input_ids
        ids = ids + [tok.eos_token_id] * (ids[-1] != tok.eos_token_id)
        want.append((ids, [1] * len(ids), None))
    pairs = [(p, c.replace("<EOS>", eos[family])) for p, c in PAIRS]
    pairs += [(i + ("\n\n" + x if x else "") + "\n\n", o) for i, x, o in ALPACA]
    for p, c in pairs:
        enc = tok(p + c, return_offsets_mapping=True)
        ids = enc.input_ids + [tok.eos_token_id] * (enc.input_ids[-1] != tok.eos_token_id)
        # TRL's preparation: EOS text added unless the completion ends with it, then its completion-mask rule
        trl_ids = tok(p + (c if c.endswith(tok.eos_token) else c + tok.eos_token)).input_ids
        prompt_ids = tok(p).input_ids
        trl_len = trl_data.common_prefix_length(prompt_ids, trl_ids)
        trl_mask = [0] * trl_len + [1] * (len(ids) - trl_len)
        trl_mask = trl_mask if trl_ids == ids and trl_len == len(prompt_ids) else trl_ids == ids
        want.append((ids, None, (trl_mask, enc.offset_mapping, len(p))))
    assert len(docs) == len(want)
    for (ids, mask), (want_ids, want_mask, pc) in zip(docs, want):
        assert ids == want_ids, (family, tok.decode(ids), tok.decode(want_ids))
        _count("documents compared (tokens)")
        if want_mask is not None:
            assert mask == want_mask
        else:
            trl_mask, offsets, plen = pc
            first = mask.index(1)
            assert all(mask[first:]) and not any(mask[:first])  # one run, to the end (EOS included)
            content = [k for k, (s, e) in enumerate(offsets) if s >= plen and (s, e) != (0, 0)]
            assert first == (content[0] if content else len(offsets) - (ids[-1] == tok.eos_token_id
                                                                         and offsets[-1] == (0, 0)))
            if isinstance(trl_mask, list):
                assert mask == trl_mask, (family, tok.decode(ids))
                _count("masks compared with TRL's completion mask")
            elif trl_mask:
                _count("pairs whose prompt tokens are not a prefix of TRL's (its rule does not apply)")
            else:
                _count("pairs TRL tokenizes otherwise (EOS text appended after a post-processor EOS)")
        _count("masks compared")
    _count("builds", 1)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_and_sharegpt(built, zoo_root, family, template):
    results, _ = built
    marked = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer(zoo_root, family, template, True)))
    convs = conversations(template)
    want = []
    for c in convs:
        out = marked.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        want.append((list(out["input_ids"]), list(out["assistant_masks"])))
    for markers in (False, True):
        plain = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer(zoo_root, family, template, markers)))
        manifest, docs = results[(family, template, markers, "hf")]
        assert manifest["counts"]["no_assistant"] == 2  # the question-only conversation, in chat and in ShareGPT
        assert len(docs) == 2 * len(convs)
        for k, (ids, mask) in enumerate(docs):
            c = convs[k % len(convs)]
            rendered = plain.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]
            assert ids == list(rendered), (family, template, markers, k)
            assert ids == want[k % len(convs)][0]
            assert mask == want[k % len(convs)][1], (family, template, markers, k, marked.decode(
                [i for i, m in zip(ids, mask) if m]))
            _count("documents compared (tokens)")
            _count("masks compared")
            _count("masks compared with transformers' assistant_masks")
        _count("builds")


def _sharegpt(conv: list[dict], names: dict | None = None) -> list[dict]:
    return [{"from": (names or {}).get(m["role"], m["role"]), "value": m["content"]} for m in conv]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_masks_equal_trl_assistant_only_loss(built, zoo_root, family, template, tmp_path):
    """TRL's own preparation (`SFTTrainer(..., SFTConfig(assistant_only_loss=True))` on a tiny random model) of the
    chat and ShareGPT records: TRL accepts the template with {% generation %} markers (and trains the end-of-turn
    marker by its own check), and refuses the plain one. Its labels carry loss exactly where packprep's loss mask
    does, for the builds with the marked template and with the plain one. The one deliberate difference: a
    conversation without an assistant turn, which TRL refuses (RuntimeError) and packprep keeps with no loss
    tokens (counted as `no_assistant`; `--on-error skip` sets it aside). packprep's ShareGPT records use ShareGPT's
    role names (human, gpt); TRL's conversion keeps `from` as the role, so it is given user/assistant (and refuses
    human/gpt: no assistant turn)."""
    trl = pytest.importorskip("trl")
    import jinja2
    from datasets import Dataset
    from test_trl import tiny_model
    from trl.chat_template_utils import get_training_chat_template, is_chat_template_stop_token_trained

    results, _ = built
    marked = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer(zoo_root, family, template, True)))
    plain = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer(zoo_root, family, template, False)))
    assert get_training_chat_template(marked) is None and is_chat_template_stop_token_trained(marked)
    with pytest.raises(ValueError):
        get_training_chat_template(plain)  # no markers, not one of TRL's known templates: assistant_only_loss refuses
    convs = conversations(template)
    answered = [k for k, c in enumerate(convs) if any(m["role"] == "assistant" for m in c)]
    args = trl.SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None, report_to=[],
                         use_cpu=True, save_strategy="no")
    trainer = trl.SFTTrainer(tiny_model(len(marked)), args=args, processing_class=marked,
                             train_dataset=Dataset.from_list([{"messages": convs[k]} for k in answered]))

    def prepare(records: list[dict]):
        return trainer._prepare_dataset(Dataset.from_list(records), marked, args, False, None, "more")

    sharegpt = prepare([{"conversations": _sharegpt(convs[k])} for k in answered])  # TRL's own from/value names
    with pytest.raises((RuntimeError, jinja2.TemplateError)):  # TRL keeps ShareGPT's "gpt" as the role: no
        # assistant turn, or a template that checks the roles refuses the conversation
        prepare([{"conversations": _sharegpt(convs[k], {"user": "human", "assistant": "gpt"})} for k in answered])
    for markers in (False, True):
        docs = results[(family, template, markers, "hf")][1]
        for prepared, ours in ((trainer.train_dataset, docs[: len(convs)]), (sharegpt, docs[len(convs):])):
            assert len(prepared) == len(answered)
            for row, k in zip(prepared, answered):
                ids, mask = ours[k]
                assert list(row["input_ids"]) == ids, (family, template, markers, k)
                assert [int(x != -100) for x in row["labels"]] == mask, (family, template, markers, k, marked.decode(
                    [i for i, m in zip(ids, mask) if m]))
                _count("masks compared with TRL's assistant_only_loss labels")
        for k in set(range(len(convs))) - set(answered):  # kept, in chat and in ShareGPT, with no loss token
            assert docs[k][0] and not any(docs[k][1]) and not any(docs[len(convs) + k][1])
    with pytest.raises(RuntimeError, match="no assistant tokens"):
        prepare([{"messages": c} for k, c in enumerate(convs) if k not in answered])


@pytest.mark.parametrize("family", BYTE_LEVEL)
def test_tiktoken_backend_gives_byte_identical_shards(built, family):
    results, _ = built
    pairs = [(k, v) for k, v in results.items() if k[0] == family and k[3] == "hf"]
    assert len(pairs) == 1 + 2 * len(TEMPLATES)
    for (fam, template, markers, _), (manifest, _) in pairs:
        other = results[(fam, template, markers, "tiktoken")][0]
        assert other["tokenizer"]["backend"] == "tiktoken"
        assert [s["sha256"] for s in other["shards"]] == [s["sha256"] for s in manifest["shards"]]
        _count("tiktoken builds byte-identical to HF")


def test_report_tally():
    """Prints the suite's figures (run with -s); runs last in this module."""
    print("\nconformance:", json.dumps(TALLY, indent=1))
