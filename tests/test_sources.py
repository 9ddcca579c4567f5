"""Sources: input resolution (globs, folders, HF folders), task planning (chunking does not change documents),
format detection and its errors."""

from __future__ import annotations

import json

import pytest
from build_fixtures import texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packprep.sources import plan_tasks, read_task, resolve_inputs


def docs_of(tasks):
    out = []
    for t in tasks:
        for d in read_task(t, batch_rows=7):
            out += d.texts or d.chats or list(zip(d.prompts, d.completions))
    return out


@pytest.mark.parametrize("fmt", ["text", "chat", "sharegpt", "hf", "prompt-completion", "alpaca"])
def test_chunking_does_not_change_documents(corpora, fmt):
    files = resolve_inputs([corpora[fmt]])
    whole = plan_tasks(files, chunk_bytes=1 << 30)
    small = plan_tasks(files, chunk_bytes=300)
    assert len(small) >= len(whole)
    assert docs_of(whole) == docs_of(small) and len(docs_of(whole)) == 40
    if fmt in ("text", "chat", "sharegpt", "hf", "prompt-completion"):  # prompt-completion: a JSON array
        assert len(small) > 1


def test_jsonl_chunks_are_line_aligned(tmp_path):
    lines = [json.dumps({"text": t}) + "\n" for t in texts(200, 3)]
    p = tmp_path / "a.jsonl"
    p.write_text("".join(lines))
    for chunk in (1, 37, 100, 10_000):
        tasks = plan_tasks(resolve_inputs([p]), chunk_bytes=chunk)
        assert [d for t in tasks for b in read_task(t) for d in b.texts] == texts(200, 3)


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


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab,[]{}"\\: \n\u00e9', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k,]"\\', max_size=3), inner,
                                                                  max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_json_values, max_size=12), chunk=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]))
def test_json_array_ranges_parse_to_the_array(tmp_path, values, chunk, indent):
    """Any JSON array (strings full of brackets, commas, quotes and backslashes), cut at any chunk size, parses
    range by range to the same elements."""
    from packprep.sources import _json_range, _json_ranges

    p = tmp_path / "a.json"
    p.write_text(json.dumps(values, indent=indent, ensure_ascii=False))
    assert [v for a, b in _json_ranges(p, chunk) for v in _json_range(p, a, b)] == values
