"""Inputs: resolution (globs, folders, HF folders), task planning (the tail split), format detection and its
errors, fingerprints."""

from __future__ import annotations

import json
import os

import pytest
from build_fixtures import docs_of, texts

from packprep.inputs import DEFAULT_CORPUS, content_hash, fingerprint, plan_tasks, resolve_inputs
from packprep.readers import read_task


def test_globs_folders_and_order(corpora, tmp_path):
    folder = corpora["text"].parent
    found = [p.name for p, _ in resolve_inputs([folder])]
    assert [n for n in found if not n.startswith("data-")] == ["alpaca.csv", "chat.parquet", "pc.json", "qa.jsonl",
                                                               "sharegpt.arrow", "text.jsonl"]
    assert found[2].startswith("data-")  # hf_text/ sorts between chat.parquet and pc.json; its files follow state.json
    assert [p.name for p, _ in resolve_inputs([str(folder / "*.jsonl")])] == ["qa.jsonl", "text.jsonl"]
    hf = resolve_inputs([corpora["hf"]])
    assert len(hf) > 1 and all(k == "arrow" for _, k in hf)  # the files state.json lists, in its order


def test_format_detection_and_missing_fields(corpora):
    fmt = {k: plan_tasks(resolve_inputs([corpora[k]]), chunk_bytes=1 << 20)[0].format.name
           for k in ("text", "prompt-completion", "qa", "chat", "sharegpt", "alpaca", "hf")}
    assert fmt == {"text": "text", "prompt-completion": "prompt-completion", "qa": "prompt-completion",
                   "chat": "chat", "sharegpt": "sharegpt", "alpaca": "alpaca", "hf": "text"}
    with pytest.raises(ValueError, match=r"field 'body' not found \(text format\); fields: \['text', 'id'\]"):
        plan_tasks(resolve_inputs([corpora["text"]]), chunk_bytes=1 << 20, text_field="body")
    with pytest.raises(ValueError, match="field 'messages' not found"):
        plan_tasks(resolve_inputs([corpora["text"]]), chunk_bytes=1 << 20, format="chat")


def test_empty_file_among_good_ones(corpora, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    files = resolve_inputs([tmp_path / "empty.jsonl", corpora["text"]])
    assert len(docs_of(plan_tasks(files, chunk_bytes=1 << 20))) == 40


def test_last_chunks_are_split_finer(tmp_path):
    """The last 2 chunks' worth of JSONL input comes as quarter chunks (so workers finish together), across files,
    contiguous, with indices in order; earlier chunks keep their size."""
    paths = []
    for k in range(2):
        p = tmp_path / f"part{k}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(300, 10 + k)))
        paths.append(p)
    tasks = plan_tasks(resolve_inputs(paths), chunk_bytes=2000)
    assert [t.index for t in tasks] == list(range(len(tasks)))
    for path in paths:  # each file covered exactly, in order
        mine = [t for t in tasks if t.path == str(path)]
        assert mine[0].start == 0 and all(a.stop == b.start for a, b in zip(mine, mine[1:]))
        assert mine[-1].stop == path.stat().st_size
    sizes = [t.stop - t.start for t in tasks]
    assert max(sizes[-8:]) < 1000 and min(sizes[:5]) >= 2000  # quarter chunks at the end only
    assert sum(sizes[-9:]) >= 4000 - 1000  # about 2 chunks' worth split
    assert [d for t in tasks for b in read_task(t) for d in b.texts] == texts(300, 10) + texts(300, 11)


def test_input_errors_are_one_line(corpora, tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found: .*nope.jsonl"):
        resolve_inputs([tmp_path / "nope.jsonl"])
    with pytest.raises(FileNotFoundError, match="no input matches"):
        resolve_inputs([str(tmp_path / "*.parquet")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt: unknown input format '.txt'; expected one of .arrow, .csv"):
        resolve_inputs([tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match="no input files found in"):
        resolve_inputs([tmp_path])  # a folder holding only a .txt file
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"dd is a DatasetDict folder; pass one split folder, e.g. .*dd/train"):
        resolve_inputs([tmp_path / "dd"])
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"ARROW1\0\0garbage")
    with pytest.raises(ValueError, match=r"broken.arrow: cannot read as arrow: "):
        plan_tasks(resolve_inputs([broken]), chunk_bytes=1 << 20)


def test_json_suffix_holds_lines_or_an_array(tmp_path):
    lines, array = tmp_path / "lines.json", tmp_path / "array.json"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(30, 1)))
    array.write_text(" \n" + json.dumps([{"text": t} for t in texts(30, 1)]))
    for p, kind in ((lines, "jsonl"), (array, "json")):
        tasks = plan_tasks(resolve_inputs([p]), chunk_bytes=200)
        assert {t.kind for t in tasks} == {kind} and len(tasks) > 1
        assert docs_of(tasks) == texts(30, 1)


def test_fingerprint_follows_size_and_content(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n')
    before = fingerprint(str(p))
    assert before["files"] == [[str(p), p.stat().st_size, content_hash(p)]]
    p.write_text('{"text": "ab"}\n')
    middle, stat = fingerprint(str(p)), p.stat()
    assert middle != before
    p.write_text('{"text": "ba"}\n')  # same size, mtime put back (cp -p, rsync -t): still another input
    os.utime(p, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(str(p)) != middle
    assert set(fingerprint(DEFAULT_CORPUS)) == {"input", "python", "stdlib"}  # the stdlib is not listed file by file


def test_a_build_lists_each_spec_once_and_hashes_each_file_twice(tmp_path, monkeypatch):
    """Once for the build's identity at the start, once after tokenizing (an input changed under the build)."""
    from packprep import build as build_module
    from packprep import inputs
    from packprep.config import BuildConfig

    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(20, k)))
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(20, 9)))
    calls = {"hash": [], "expand": 0}

    def counting_hash(path):
        calls["hash"].append(str(path))
        return content_hash(path)

    def counting_expand(specs):
        calls["expand"] += 1
        return inputs.expand_inputs(specs)

    monkeypatch.setattr(inputs, "content_hash", counting_hash)
    monkeypatch.setattr(inputs, "resolve_inputs", lambda specs: pytest.fail("a spec was listed again"))
    monkeypatch.setattr(build_module, "expand_inputs", counting_expand)
    build_module.build(BuildConfig(inputs=(str(folder), str(single)), out=str(tmp_path / "out"), workers=1,
                                   seq_len=256))
    assert calls["expand"] == 2  # one listing per spec
    assert sorted(calls["hash"]) == sorted([str(folder / f"{k}.jsonl") for k in range(3)] * 2 + [str(single)] * 2)
