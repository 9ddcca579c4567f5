"""Bad input under --on-error raise|skip: malformed JSON, wrong types, missing and null fields, invalid UTF-8,
unknown chat roles, huge records, empty documents/conversations/files, a bad JSON array element, a bad CSV row;
every input document packed or counted, rejects.jsonl deterministic, verify catches a broken identity."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from build_fixtures import read_docs, texts

from packprep.build import build
from packprep.config import BuildConfig
from packprep.inputs import plan_tasks, resolve_inputs
from packprep.readers import jsonl as jsonl_reader
from packprep.readers import read_task
from packprep.records import RecordError
from packprep.verify import verify


def run(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("seq_len", 256)
    return build(BuildConfig(inputs=tuple(map(str, inputs)), out=str(out), **kw)).manifest


def jsonl(path: Path, lines) -> Path:
    """Lines as given: dicts are dumped, bytes/str are written verbatim."""
    raw = b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
                   for x in lines)
    path.write_bytes(raw)
    return path


def rejects(out: Path) -> list[dict]:
    p = out / "rejects.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def good(n: int, seed: int = 0) -> list[dict]:
    return [{"text": t} for t in texts(n, seed)]


def check_accounting(m: dict) -> None:
    c = m["counts"]
    assert c["input_docs"] == c["packed"] + c["truncated"] + c["split"] + sum(c["dropped"].values()) + c["rejected"]
    assert sum(c["rejected_reasons"].values()) == c["rejected"]


# (bad line, kind, words the reason must hold): each among good lines, in both modes
CASES = {
    "malformed": (b'{"text": "alpha", ', "malformed_json", ["malformed JSON"]),
    "number": ({"text": 3}, "wrong_type", ["field 'text' holds a number (3), expected text"]),
    "list": ({"text": ["a", "b"]}, "wrong_type", ["field 'text' holds a list, expected text"]),
    "missing": ({"id": 7, "body": "x"}, "missing_field", ["field 'text' missing", "fields: ['id', 'body']"]),
    "null": ({"text": None}, "null", ["field 'text' is null"]),
    "utf8": (b'{"text": "caf\xe9 au lait"}', "invalid_utf8", ["invalid UTF-8"]),
    "not-object": ("[1, 2]", "wrong_type", ["expected an object", "got a list"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_jsonl_line_raise_and_skip(tmp_path, case):
    bad, kind, words = CASES[case]
    src = jsonl(tmp_path / "in.jsonl", [*good(4), bad, *good(5, 1)])  # the bad record is line 5
    with pytest.raises(RecordError) as e:
        run([src], tmp_path / "raise")
    msg = str(e.value)
    assert msg.startswith(f"{src} line 5: ") and "\n" not in msg and all(w in msg for w in words), msg

    m = run([src], tmp_path / "skip", on_error="skip")
    (r,) = rejects(tmp_path / "skip")
    assert r["file"] == str(src) and r["line"] == 5 and r["kind"] == kind and all(w in r["reason"] for w in words)
    raw = bad if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad)).encode()
    assert r["raw"] == raw.decode("utf-8", "replace")[:200]
    c = m["counts"]
    assert (c["input_docs"], c["packed"], c["rejected"], c["rejected_reasons"]) == (10, 9, 1, {kind: 1})
    assert sorted(read_docs(tmp_path / "skip")) == [0, 1, 2, 3, 5, 6, 7, 8, 9]  # both sides land; ids = records
    check_accounting(m)
    assert verify(tmp_path / "skip").ok, verify(tmp_path / "skip").failures


def test_skip_keeps_tokens_of_good_records_identical(tmp_path):
    """A chunk that fell back to per-line parsing gives the same documents as pyarrow's fast path."""
    a = jsonl(tmp_path / "a.jsonl", good(30))
    b = jsonl(tmp_path / "b.jsonl", [*good(30)[:10], b"{oops", *good(30)[10:]])
    run([a], tmp_path / "a")
    run([b], tmp_path / "b", on_error="skip")
    da, db = read_docs(tmp_path / "a"), read_docs(tmp_path / "b")
    assert [x[0][0].tolist() for _, x in sorted(da.items())] == [x[0][0].tolist() for _, x in sorted(db.items())]


def test_fallback_only_for_the_chunk_that_failed(tmp_path, monkeypatch):
    lines = good(200)
    lines[150] = b'{"text": '
    src = jsonl(tmp_path / "in.jsonl", lines)
    tasks = plan_tasks(resolve_inputs([src]), chunk_bytes=2000)
    assert len(tasks) > 4
    calls = []
    real = jsonl_reader.json_line
    monkeypatch.setattr(jsonl_reader, "json_line", lambda raw: calls.append(raw) or real(raw))
    out, rej = [], []
    for t in tasks:
        out += [d for b in read_task(t, rejects=rej) for d in b.texts]
    assert len(out) == 199 and [r.kind for r in rej] == ["malformed_json"]
    bad_task = next(t for t in tasks if t.start <= sum(len(json.dumps(x)) + 1 for x in lines[:150]) < t.stop)
    assert 0 < len(calls) <= bad_task.stop - bad_task.start  # only the bad chunk's lines were parsed in Python
    assert len(calls) < 60


def test_worker_error_is_one_line_from_the_cli(tmp_path, cli_error):
    lines = good(300)
    lines[222] = {"text": 12}
    src = jsonl(tmp_path / "in.jsonl", lines)
    line = cli_error("build", src, "--out", tmp_path / "o", "--workers", 2, "--seq-len", 256)  # 2 processes
    assert f"{src} line 223: field 'text' holds a number (12), expected text" in line


def test_cli_skip_flag(tmp_path, cli, cli_error):
    src = jsonl(tmp_path / "in.jsonl", [*good(5), "{bad", *good(5, 1)])
    r = cli("build", src, "--out", tmp_path / "o", "--on-error", "skip", "--workers", 1, "--seq-len", 256)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "packprep.json").read_text())
    assert m["config"]["on_error"] == "skip" and m["counts"]["rejected"] == 1
    assert "unknown on_error" in cli_error("build", src, "--out", tmp_path / "o2", "--on-error", "ignore")


def test_rejects_are_deterministic_across_workers(tmp_path):
    lines = good(400)
    for i in (3, 77, 150, 151, 260, 399):
        lines[i] = [b"{x", {"text": 1}, {"text": None}, {"nope": 1}, b'{"text": "\xff"}', "7"][i % 6]
    src = jsonl(tmp_path / "in.jsonl", lines)
    a = run([src], tmp_path / "a", on_error="skip", workers=1)
    b = run([src], tmp_path / "b", on_error="skip", workers=2, chunk_bytes=1500)
    assert a["counts"] == b["counts"] and a["counts"]["rejected"] == 6
    assert (tmp_path / "a" / "rejects.jsonl").read_bytes() == (tmp_path / "b" / "rejects.jsonl").read_bytes()
    assert [r["line"] for r in rejects(tmp_path / "a")] == [4, 78, 151, 152, 261, 400]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


# ---------------------------------------------------------------------------------------------------- chats


def test_unknown_chat_roles(tmp_path):
    convs = [[{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]] * 3
    wizard = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "zap"}]
    src = jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in (convs[0], wizard, *convs[1:])])
    with pytest.raises(RecordError, match=r"chat.jsonl line 2: message 1: unknown role 'wizard'; accepted: "
                                          r"system, developer, user, assistant, tool"):
        run([src], tmp_path / "raise")
    m = run([src], tmp_path / "skip", on_error="skip")
    assert m["counts"]["rejected_reasons"] == {"unknown_role": 1} and m["counts"]["packed"] == 3
    assert rejects(tmp_path / "skip")[0]["line"] == 2 and sorted(read_docs(tmp_path / "skip")) == [0, 2, 3]

    sharegpt = tmp_path / "sg.arrow"  # ShareGPT in Arrow: the location is a row index
    conv = [[{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]] * 4
    conv[2] = [{"from": "human", "value": "a"}, {"from": "alien", "value": "b"}]
    table = pa.table({"conversations": conv})
    with pa.ipc.new_file(str(sharegpt), table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
            w.write_batch(batch)
    with pytest.raises(RecordError, match=r"sg.arrow row 2: message 1: unknown role 'alien'; accepted: human, user"):
        run([sharegpt], tmp_path / "sg-raise")
    m = run([sharegpt], tmp_path / "sg-skip", on_error="skip")
    assert rejects(tmp_path / "sg-skip")[0]["row"] == 2 and m["counts"]["rejected"] == 1


def test_empty_documents_and_conversations_are_dropped_not_rejected(tmp_path):
    src = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]},
        {"messages": []},
    ])  # (content: null reaches the template, which cannot render it: a reject, tests/test_tokenizer.py)
    txt = jsonl(tmp_path / "text.jsonl", [{"text": "alpha"}, {"text": ""}, {"text": "beta"}])
    for mode in ("raise", "skip"):
        m = run([src, txt], tmp_path / mode, on_error=mode)
        c = m["counts"]
        assert (c["input_docs"], c["packed"], c["dropped"]["empty"], c["rejected"]) == (5, 3, 2, 0)
        assert not (tmp_path / mode / "rejects.jsonl").exists() and verify(tmp_path / mode).ok
        check_accounting(m)


def test_wrong_content_type_in_a_message(tmp_path):
    src = jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "b"}]},
        {"messages": "hello"},
    ])
    run([src], tmp_path / "o", on_error="skip")
    # a content-part list reaches the template (as in transformers); this one cannot render it
    assert [(r["line"], r["kind"]) for r in rejects(tmp_path / "o")] == [(2, "chat_template"), (3, "wrong_type")]
    assert "cannot render this conversation: TypeError" in rejects(tmp_path / "o")[0]["reason"]


# ---------------------------------------------------------------------------------------------------- other formats


def test_json_array_with_one_bad_element(tmp_path):
    src = tmp_path / "pc.json"
    recs = [{"prompt": p, "completion": c} for p, c in zip(texts(6, 1), texts(6, 2))]
    recs[3] = {"prompt": "alpha", "completion": 42}
    src.write_text(json.dumps(recs))
    with pytest.raises(RecordError, match=r"pc.json element 3: field 'completion' holds a number \(42\)"):
        run([src], tmp_path / "raise")
    m = run([src], tmp_path / "skip", on_error="skip")
    (r,) = rejects(tmp_path / "skip")
    assert r["element"] == 3 and r["raw"] == json.dumps(recs[3]) and m["counts"]["packed"] == 5
    assert sorted(read_docs(tmp_path / "skip")) == [0, 1, 2, 4, 5]


def test_json_array_split_into_tasks_reports_file_positions(tmp_path):
    """A JSON array is cut into tasks at element boundaries (strings holding brackets and commas included); a bad
    element in a later task is reported with its index in the whole array, malformed JSON with its file line."""
    src = tmp_path / "pc.json"
    recs = [{"prompt": f'p{i} "],[{{,\\', "completion": t} for i, t in enumerate(texts(300, 5))]
    recs[250] = {"prompt": "alpha", "completion": None}
    src.write_text(json.dumps(recs, indent=1))
    tasks = plan_tasks(resolve_inputs([src]), chunk_bytes=2000)
    assert len(tasks) > 5 and all(t.kind == "json" for t in tasks)
    with pytest.raises(RecordError, match=r"pc.json element 250: field 'completion' is null"):
        run([src], tmp_path / "raise", chunk_bytes=2000, workers=2)
    run([src], tmp_path / "skip", chunk_bytes=2000, on_error="skip")
    assert [r["element"] for r in rejects(tmp_path / "skip")] == [250]
    assert sorted(read_docs(tmp_path / "skip")) == [i for i in range(300) if i != 250]
    broken = tmp_path / "broken.json"
    text = json.dumps(recs[:200], indent=1)
    lines = text.split("\n")
    at = next(i for i in range(700, len(lines)) if '"completion"' in lines[i])
    lines[at] = lines[at].replace('"completion"', '"completion" oops')
    broken.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"broken.json: malformed JSON at line {at + 1} column 16: Expecting ':'"):
        run([broken], tmp_path / "broken", chunk_bytes=2000)
    unclosed = tmp_path / "unclosed.json"
    unclosed.write_text(text[:-1])
    with pytest.raises(ValueError, match=r"unclosed.json: malformed JSON at line \d+"):
        run([unclosed], tmp_path / "unclosed")


def test_parquet_null_row(tmp_path):
    src = tmp_path / "t.parquet"
    t = texts(10, 4)
    t[6] = None
    pq.write_table(pa.table({"text": t}), src, row_group_size=4)
    with pytest.raises(RecordError, match=r"t.parquet row 6: field 'text' is null"):
        run([src], tmp_path / "raise")
    m = run([src], tmp_path / "skip", on_error="skip")
    assert rejects(tmp_path / "skip")[0]["row"] == 6 and m["counts"]["rejected_reasons"] == {"null": 1}


def test_csv_row_with_wrong_column_count(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text("prompt,completion\nalpha,beta\ngamma\ndelta,epsilon\n")
    with pytest.raises(RecordError, match=r"a.csv line 3: expected 2 columns, got 1"):
        run([src], tmp_path / "raise")
    m = run([src], tmp_path / "skip", on_error="skip")
    assert rejects(tmp_path / "skip") == [{"file": str(src), "line": 3, "kind": "bad_row",
                                           "reason": "expected 2 columns, got 1", "raw": "gamma"}]
    assert m["counts"]["packed"] == 2 and verify(tmp_path / "skip").ok


def test_empty_input_files_among_good_ones(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_empty.jsonl").write_text("")
    (tmp_path / "in" / "b_blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "in" / "c_empty.json").write_text("[]")
    jsonl(tmp_path / "in" / "d_good.jsonl", good(7))
    m = run([tmp_path / "in"], tmp_path / "out")
    files = {Path(f["path"]).name: f["docs"] for f in m["inputs"]["files"]}
    assert files == {"a_empty.jsonl": 0, "b_blank.jsonl": 0, "c_empty.json": 0, "d_good.jsonl": 7}
    assert m["counts"]["input_docs"] == 7 and verify(tmp_path / "out").ok


def test_first_line_bad_does_not_hide_the_format(tmp_path):
    """Format detection reads the union of the first lines, so a bad first record is reported as a record."""
    src = jsonl(tmp_path / "in.jsonl", [{"id": 1}, *good(4)])
    with pytest.raises(RecordError, match=r"in.jsonl line 1: field 'text' missing \(text format\); fields: \['id'\]"):
        run([src], tmp_path / "raise")
    assert run([src], tmp_path / "skip", on_error="skip")["counts"]["rejected_reasons"] == {"missing_field": 1}
    only_bad = jsonl(tmp_path / "bad.jsonl", ["{nope", *good(2)])
    assert run([only_bad], tmp_path / "skip2", on_error="skip")["counts"]["rejected"] == 1


# ---------------------------------------------------------------------------------------------------- size and length


def test_record_of_tens_of_mb_is_read(tmp_path):
    """A 30 MB line, far over chunk_bytes and pyarrow's default block size: the reader takes it whole."""
    big = " ".join(texts(1, 5, lo=5_500_000, hi=5_500_001))  # ~30 MB
    assert len(big) > 25_000_000
    src = jsonl(tmp_path / "in.jsonl", [*good(3), {"text": big}, *good(3, 1)])
    tasks = plan_tasks(resolve_inputs([src]), chunk_bytes=1 << 16)
    docs = [d for t in tasks for b in read_task(t) for d in b.texts]
    assert len(docs) == 7 and docs[3] == big


def test_large_record_lands_truncated(tmp_path):
    big = " ".join(texts(1, 6, lo=300_000, hi=300_001))  # ~2 MB, spans many 64 KB chunks' worth
    src = jsonl(tmp_path / "in.jsonl", [*good(3), {"text": big}, *good(3, 1)])
    m = run([src], tmp_path / "out", chunk_bytes=1 << 16, seq_len=512)
    c = m["counts"]
    assert (c["input_docs"], c["packed"], c["truncated"]) == (7, 6, 1) and c["truncated_tokens"] > 100_000
    assert [len(p[0]) for p in read_docs(tmp_path / "out")[3]] == [512]
    assert verify(tmp_path / "out").ok


@pytest.mark.slow
def test_30mb_record_builds(tmp_path):
    big = " ".join(texts(1, 5, lo=5_500_000, hi=5_500_001))
    src = jsonl(tmp_path / "in.jsonl", [*good(3), {"text": big}])
    m = run([src], tmp_path / "out", seq_len=512)
    assert m["counts"]["truncated"] == 1 and verify(tmp_path / "out").ok


@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_every_document_is_packed_or_counted(tmp_path, policy):
    """Long, empty and bad documents together: the counts add up under each long-doc policy."""
    short, long = texts(20, 2, lo=2, hi=12), texts(4, 9, lo=150, hi=250)
    lines = [*[{"text": t} for t in short + long], {"text": ""}, {"text": ""}, b"{bad", {"text": 5}, {"text": None}]
    src = jsonl(tmp_path / "in.jsonl", lines)
    m = run([src], tmp_path / "out", seq_len=64, long_docs=policy, on_error="skip")
    c = m["counts"]
    assert (c["input_docs"], c["packed"], c["dropped"]["empty"], c["rejected"]) == (29, 20, 2, 3)
    assert (c["truncated"], c["split"], c["dropped"]["too_long"]) == {
        "truncate": (4, 0, 0), "split": (0, 4, 0), "drop": (0, 0, 4)}[policy]
    check_accounting(m)
    assert verify(tmp_path / "out").ok
    in_shards = set(read_docs(tmp_path / "out"))
    assert in_shards == set(range(20)) | (set(range(20, 24)) if policy != "drop" else set())


# ---------------------------------------------------------------------------------------------------- verify


def test_verify_catches_a_broken_identity(tmp_path, cli):
    src = jsonl(tmp_path / "in.jsonl", [*good(5), b"{bad", {"text": ""}, *good(3, 1)])
    out = tmp_path / "out"
    run([src], out, on_error="skip")
    assert verify(out).ok
    path = out / "packprep.json"
    original = path.read_text()
    m = json.loads(original)
    m["counts"]["rejected"] += 1  # one more reject than records: the identity breaks
    path.write_text(json.dumps(m))
    failures = verify(out).failures
    assert any(f.startswith("doc accounting") for f in failures) and any(f.startswith("rejects") for f in failures)
    r = cli("verify", out)
    assert r.exit_code == 1 and "doc accounting" in r.output
    m = json.loads(original)
    m["counts"]["dropped"]["empty"] = 0  # an empty document gone missing from the counts
    path.write_text(json.dumps(m))
    assert [f.split(":")[0] for f in verify(out).failures] == ["doc accounting"]
    path.write_text(original)
    (out / "rejects.jsonl").write_text("")  # the rejects file lost its record
    assert [f.split(":")[0] for f in verify(out).failures] == ["rejects"]
