"""The tokenizer zoo's entries load in transformers and in packprep, render chats, and have their family's traits."""

from __future__ import annotations

import json

import pytest
import tokenizer_zoo
from build_fixtures import chats
from tokenizer_zoo import FAMILIES, TEMPLATES, zoo_tokenizer
from typer.testing import CliRunner

from packprep.cli import app

transformers = pytest.importorskip("transformers")
zoo_root = tokenizer_zoo.zoo_root  # the session's zoo folder (a fixture)
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}


def conversation(template: str) -> list[dict]:
    msgs = [{"role": "system", "content": "Be brief."}] if template != "gemma" else []
    return msgs + [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
                   {"role": "user", "content": "And 日本 + 🤗?"}, {"role": "assistant", "content": " Unknown,  sorry."}]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_traits(zoo_root, family):
    tok = transformers.AutoTokenizer.from_pretrained(str(zoo_tokenizer(zoo_root, family, "chatml")))
    ids = tok("hello world").input_ids
    assert (ids[0] == tok.bos_token_id) == (family in ("bytelevel_bos", "spm_bpe"))
    assert (ids[-1] == tok.eos_token_id) == (family == "spm_unigram")
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):  # one token each, in every family
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1, (family, marker)
    # SentencePiece's prefix space: "negative" alone is not the tail of "\nnegative" (the phantom space)
    whole = tok("\nnegative", add_special_tokens=False).input_ids
    parts = tok("\n", add_special_tokens=False).input_ids + tok("negative", add_special_tokens=False).input_ids
    assert (whole != parts) == family.startswith("spm_"), (family, whole, parts)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("family", FAMILIES)
def test_renders_chats(zoo_root, family, template):
    msgs = conversation(template)
    texts = []
    for generation in (False, True):
        folder = zoo_tokenizer(zoo_root, family, template, generation)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        assert ("{% generation %}" in cfg["chat_template"]) == generation
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        texts.append(tok.apply_chat_template(msgs, tokenize=False))
        if not generation:
            continue
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        spans, run = [], []
        for i, m in zip(ids, mask):
            if m:
                run.append(i)
            elif run:
                spans.append(run)
                run = []
        spans += [run] if run else []
        end = END_OF_TURN.get(template, tok.eos_token)
        assert len(spans) == 2, (family, template, spans)
        for span, want in zip(spans, ["It is 4.", "Unknown,  sorry."]):
            said = tok.decode(span)
            assert want in said and said.endswith(end), (family, template, said)
    assert texts[0] == texts[1]  # the markers change nothing in the text
    assert "It is 4." in texts[0] and ("Be brief." in texts[0]) == (template != "gemma")
    if template == "gemma":
        with pytest.raises(Exception, match="System role not supported"):
            tok.apply_chat_template([{"role": "system", "content": "x"}] + msgs, tokenize=False)


@pytest.mark.parametrize("family,template", [("bytelevel", "chatml"), ("bytelevel_bos", "llama3"),
                                             ("spm_bpe", "mistral"), ("spm_unigram", "phi3")])
def test_packprep_builds_with_zoo_tokenizer(zoo_root, tmp_path, family, template):
    folder = zoo_tokenizer(zoo_root, family, template, generation=True)
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats(12, seed=7)))
    r = CliRunner().invoke(app, ["build", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(folder),
                                 "--seq-len", "512", "--workers", "1", "-q"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "out" / "packprep.json").read_text())
    assert manifest["counts"]["input_docs"] == 12 and manifest["counts"]["tokens"] > 0
