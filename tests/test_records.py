"""Records: format detection from field names and flags, the documents each format gives, and reject reasons
(the reject paths of every reader are in test_bad_input.py)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from packprep.inputs import ReadTask
from packprep.records import Format, RecordError, Reject, resolve_format, table_ok, to_docs


def schema(**cols) -> pa.Schema:
    return pa.table({k: [v] for k, v in cols.items()}).schema


@pytest.mark.parametrize("cols, flags, want", [
    (dict(text="a", id=1), {}, Format("text", ("text",))),
    (dict(body="a"), dict(text_field="body"), Format("text", ("body",))),
    (dict(prompt="a", completion="b"), {}, Format("prompt-completion", ("prompt", "completion"))),
    (dict(question="a", answer="b"), {}, Format("prompt-completion", ("question", "answer"))),
    (dict(q="a", a="b"), dict(prompt_field="q", completion_field="a"), Format("prompt-completion", ("q", "a"))),
    (dict(instruction="a", output="b"), {}, Format("alpaca", ("instruction", "input", "output"))),
    (dict(messages=[{"role": "user", "content": "a"}]), {}, Format("chat", ("messages",))),
    (dict(conversations=[{"from": "human", "value": "a"}]), {}, Format("sharegpt", ("conversations",))),
    (dict(turns=[{"from": "human", "value": "a"}]), dict(messages_field="turns"), Format("sharegpt", ("turns",))),
    (dict(turns=[{"role": "user", "content": "a"}]), dict(messages_field="turns"), Format("chat", ("turns",))),
    (dict(messages=[{"role": "user", "content": "a"}], text="a"), {}, Format("chat", ("messages",))),
])
def test_format_detection(cols, flags, want):
    assert resolve_format("f.jsonl", schema(**cols), **flags) == want


def test_format_errors_name_the_file_and_fields():
    with pytest.raises(ValueError, match=r"f.jsonl: cannot tell the record format from its fields \['body'\]"):
        resolve_format("f.jsonl", schema(body="a"))
    with pytest.raises(ValueError, match=r"f.jsonl: field 'completion' not found \(prompt-completion format\)"):
        resolve_format("f.jsonl", schema(prompt="a"), "prompt-completion")


def docs(records, fmt: Format, rejects=None):
    task = ReadTask(0, "f.jsonl", "jsonl", 0, 1, fmt)
    return to_docs(records, task, 10, lambda i: ("line", 11 + i, None), rejects)


def test_documents_of_each_format():
    alpaca = Format("alpaca", ("instruction", "input", "output"))
    d = docs([{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Yo"}], alpaca)
    assert (d.prompts, d.completions) == (["Add\n\n1 2\n\n", "Hi\n\n"], ["3", "Yo"])
    table = pa.table({"instruction": ["Add", "Hi"], "input": ["1 2", ""], "output": ["3", "Yo"]})
    assert table_ok(table, alpaca) and docs(table, alpaca).prompts == d.prompts  # the fast path agrees
    sharegpt = Format("sharegpt", ("conversations",))
    d = docs([{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                 {"from": "gpt", "value": None}]}], sharegpt)
    assert d.chats == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": None}]]
    assert not table_ok(pa.table({"text": ["a", None]}), Format("text", ("text",)))


def test_bad_records_raise_or_become_rejects():
    text = Format("text", ("text",))
    with pytest.raises(RecordError, match=r"^f.jsonl line 12: field 'text' holds a number \(3\), expected text"):
        docs([{"text": "a"}, {"text": 3}], text)
    rejects: list[Reject] = []
    assert docs([{"text": "a"}, {"text": 3}, {"body": "b"}, "x"], text, rejects).texts == ["a"]
    assert [(r.index, r.at, r.kind) for r in rejects] == [(11, 12, "wrong_type"), (12, 13, "missing_field"),
                                                         (13, 14, "wrong_type")]
    assert rejects[1].to_json() == {"file": "f.jsonl", "line": 13, "kind": "missing_field", "raw": '{"body": "b"}',
                                    "reason": "field 'text' missing (text format); fields: ['body']"}
