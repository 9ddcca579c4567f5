"""The tokenization contract on the built-in tokenizer and small templates: prompt/completion as one string with the
loss from the completion's first character, EOS rules, chat spans with and without generation markers, refusals
naming the template, chat shapes (tool calls, content null, content parts, missing content), template exceptions
through --on-error with file and line, special-token strings in text, the labels column and the backend choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from build_fixtures import chats, read_docs, texts

from packprep.build import build
from packprep.chat import ChatTemplate, TemplateError
from packprep.config import BuildConfig
from packprep.records import Docs, RecordError
from packprep.shards import open_shard, shard_files
from packprep.tokenizer import BUILTIN, Tokenizer

TOK = Tokenizer(BUILTIN)
EOS = TOK.eos_id
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}")


def run(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("seq_len", 1024)
    return build(BuildConfig(inputs=tuple(map(str, inputs)), out=str(out), **kw)).manifest


def pair_reference(p: str, c: str) -> tuple[list[int], list[int]]:
    enc = TOK.rust.encode(p + c)
    first = next((k for k, (s, _) in enumerate(enc.offsets) if s >= len(p)), len(enc.ids))
    return enc.ids + [EOS], [0] * first + [1] * (len(enc.ids) - first + 1)


def test_prompt_completion_is_one_string_with_loss_from_the_completion(corpora, tmp_path):
    run([corpora["prompt-completion"]], tmp_path / "out")
    docs = read_docs(tmp_path / "out")
    for i, (p, c) in enumerate(zip(texts(40, 2), texts(40, 3))):
        (ids, mask), = docs[i]
        assert (ids.tolist(), mask.tolist()) == pair_reference(p, c)


def test_encode_empty_parts_and_eos_rules():
    """Empty documents stay empty; EOS is appended unless last, and carries loss even after an empty completion."""
    prompts, completions = ["a b", "", "", "hello there", "x", "q"], ["c", "d e", "", "", "yz", "a<|endoftext|>"]
    ids, mask, lengths, _ = TOK.encode(Docs(prompts=prompts, completions=completions))
    want = [pair_reference(p, c) if p + c else ([], []) for p, c in zip(prompts, completions)]
    want[5] = (want[5][0][:-1], want[5][1][:-1])  # already ends with EOS (parsed): nothing appended
    assert lengths.tolist() == [len(w[0]) for w in want]
    assert ids.tolist() == sum((w[0] for w in want), []) and mask.tolist() == sum((w[1] for w in want), [])
    assert want[3][1][-1] == 1 and ids.dtype == np.int32 and mask.dtype == np.uint8
    ids, mask, lengths, notes = TOK.encode(Docs(texts=["", "one two", "", "end<|endoftext|>"]))
    one = TOK.rust.encode("one two").ids
    end = TOK.rust.encode("end<|endoftext|>").ids
    assert ids.tolist() == one + [EOS] + end and lengths.tolist() == [0, len(one) + 1, 0, len(end)]
    assert mask.all() and notes["special_in_text"] == 1


def test_chat_tokens_are_the_templates_with_nothing_appended(corpora, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(BUILTIN))
    run([corpora["chat"]], tmp_path / "out")
    docs = read_docs(tmp_path / "out")
    for i, msgs in enumerate(chats(40, 4)):
        ref = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        (ids, mask), = docs[i]
        assert ids.tolist() == list(ref["input_ids"]) and mask.tolist() == list(ref["assistant_masks"])


def test_turn_by_turn_spans_include_the_end_of_turn_marker():
    msgs = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma delta"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": " padded "}]
    tpl = ChatTemplate(CHATML, TOK.special, TOK.special_strings, "chatml-test")
    text, spans = tpl.render(msgs)
    assert [text[a:b] for a, b in spans] == ["gamma delta<|im_end|>", " padded <|im_end|>"]
    echo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "assistant"}]
    text, spans = tpl.render(echo)  # the content also spells the role header: the span is the content's
    assert [text[a:b] for a, b in spans] == ["assistant<|im_end|>"] and text[spans[0][0] - 1] == "\n"


def test_unlocatable_spans_are_refused_naming_the_template():
    no_marker = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tpl = ChatTemplate(no_marker, TOK.special, TOK.special_strings, "the chat template of tokenizer X")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(TemplateError, match="the chat template of tokenizer X: cannot locate the end-of-turn"):
        tpl.render(msgs)
    hides = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(TemplateError, match="t: cannot locate"):
        ChatTemplate(hides, TOK.special, TOK.special_strings, "t").render(msgs)
    with pytest.raises(TemplateError, match="cannot render this conversation: TypeError"):
        ChatTemplate(CHATML, TOK.special, TOK.special_strings).render(
            [msgs[0], {"role": "assistant", "content": [{"type": "text", "text": "a"}]}])
    parts = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{{ m['content'] if m['content'] is "
             "string else m['content'][0]['text'] }}{{ '<|im_end|>\n' }}{% endfor %}")
    with pytest.raises(TemplateError, match="no text content to locate"):  # renders, but no string to find
        ChatTemplate(parts, TOK.special, TOK.special_strings).render(
            [msgs[0], {"role": "assistant", "content": [{"type": "text", "text": "a"}]}])


def _chat_file(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def test_chat_shapes_rejects_and_template_errors(tmp_path):
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    tool_call = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    missing = [{"role": "user", "content": "q"}, {"role": "assistant"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]
    no_assistant = [{"role": "user", "content": "only a question"}]
    src = _chat_file(tmp_path / "c.jsonl", [ok, tool_call, missing, parts, no_assistant, ok])
    with pytest.raises(RecordError, match=r"c.jsonl line 2: .*chat template.*cannot render"):
        run([src], tmp_path / "out")
    m = run([src], tmp_path / "out2", on_error="skip")
    assert m["counts"]["rejected_reasons"] == {"chat_template": 2, "missing_field": 1, "no_assistant": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out2" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5]
    kept = _chat_file(tmp_path / "k.jsonl", [ok, no_assistant])
    m = run([kept], tmp_path / "out3")
    assert m["counts"]["no_assistant"] == 1 and m["counts"]["input_docs"] == 2


def test_template_raise_exception_goes_through_on_error(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((BUILTIN / "tokenizer.json").read_bytes())
    cfg = json.loads((BUILTIN / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported')"
                            " }}{% endif %}" + CHATML)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    src = _chat_file(tmp_path / "c.jsonl", [ok, [{"role": "system", "content": "s"}, *ok]])
    with pytest.raises(RecordError, match="c.jsonl line 2: .*System role not supported"):
        run([src], tmp_path / "out", tokenizer=str(folder))
    m = run([src], tmp_path / "out2", tokenizer=str(folder), on_error="skip")
    assert m["counts"]["rejected_reasons"] == {"chat_template": 1}


def test_special_tokens_in_text_parse_or_literal(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a <|im_start|> b", "plain", "c<|endoftext|>"]))
    parsed = run([src], tmp_path / "parse")
    literal = run([src], tmp_path / "literal", special_tokens_in_text="literal")
    assert parsed["counts"]["special_in_text"] == literal["counts"]["special_in_text"] == 2
    docs = read_docs(tmp_path / "parse")
    assert TOK.rust.token_to_id("<|im_start|>") in docs[0][0][0].tolist()
    docs = read_docs(tmp_path / "literal")
    assert TOK.rust.token_to_id("<|im_start|>") not in docs[0][0][0].tolist()
    assert docs[2][0][0].tolist()[-1] == EOS and docs[2][0][0].tolist().count(EOS) == 1  # the text is not EOS


def test_labels_column(corpora, tmp_path):
    m = run([corpora["prompt-completion"], corpora["text"]], tmp_path / "out", seq_len=256)
    n = 0
    for f in shard_files(tmp_path / "out"):
        t = open_shard(f).to_pydict()
        for ids, offs, mask, labels in zip(t["input_ids"], t["doc_offsets"], t["loss_mask"], t["labels"]):
            want = np.where(np.array(mask) == 1, ids, -100)
            want[offs[:-1]] = -100
            assert labels == want.tolist()
            n += int((want != -100).sum())
    assert n == m["counts"]["label_tokens"] > 0
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert info["features"]["labels"]["feature"]["dtype"] == "int32" and m["format_minor"] == 1


def test_backend_choice_recorded(corpora, tmp_path):
    pytest.importorskip("tiktoken")
    m = run([corpora["text"]], tmp_path / "auto")
    assert m["tokenizer"]["backend"] == "tiktoken" and "equals HF" in m["tokenizer"]["backend_reason"]
    h = run([corpora["text"]], tmp_path / "hf", tokenizer_backend="hf")
    assert [s["sha256"] for s in h["shards"]] == [s["sha256"] for s in m["shards"]]


def test_hub_name_without_transformers_names_the_extra(corpora, tmp_path, monkeypatch, cli_error):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    line = cli_error("build", corpora["text"], "--out", tmp_path / "out", "--tokenizer", "some-org/some-model",
                     "--workers", 1)
    assert 'pip install "packprep[hf]"' in line and "some-org/some-model" in line
