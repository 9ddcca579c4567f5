"""Readers: every format behind one signature, chunking that never changes documents, line-aligned JSONL ranges,
the JSON array scan (kernel and ranges) against json.loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from build_fixtures import docs_of, texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from packprep._kernels import json_array_cuts
from packprep.inputs import plan_tasks, resolve_inputs
from packprep.readers import READERS, SUFFIXES, json_array, read_task
from packprep.readers.base import open_input


def test_every_suffix_has_a_reader_with_the_one_signature():
    assert set(SUFFIXES.values()) == set(READERS)
    for kind, reader in READERS.items():
        assert callable(reader.plan) and callable(reader.read), kind


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
        starts = {t.start for t in tasks}
        assert starts <= {sum(map(len, lines[:k])) for k in range(len(lines))}  # every task starts a line
        assert [d for t in tasks for b in read_task(t) for d in b.texts] == texts(200, 3)


def test_json_array_kernel_skips_strings_and_nesting():
    data = b'[{"a": "x,]"}, 2]'
    state = np.array([0, 0, 0, 1], np.int64)
    cuts = np.zeros(4, np.int64)
    num_cuts, commas, end = json_array_cuts(np.frombuffer(data, np.uint8), 0, state, 1, cuts)
    assert (num_cuts, commas, end, cuts[0]) == (1, 1, 16, 13)
    state = np.array([0, 0, 0, 1], np.int64)  # the same bytes in two blocks: the state carries over
    first = json_array_cuts(np.frombuffer(data[:9], np.uint8), 0, state, 1, cuts)
    assert first == (0, 0, -1) and state.tolist()[:3] == [2, 1, 0]  # inside the string, two brackets deep
    assert json_array_cuts(np.frombuffer(data[9:], np.uint8), 9, state, 1, cuts) == (1, 1, 16)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab,[]{}"\\: \n\u00e9', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k,]"\\', max_size=3), inner,
                                                                  max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_json_values, max_size=12), chunk=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]))
def test_json_array_ranges_parse_to_the_array(tmp_path, values, chunk, indent):
    """Any JSON array (strings full of brackets, commas, quotes and backslashes), cut at any chunk size, parses
    range by range to the same elements, and the commas before a range start count the elements before it."""
    p = tmp_path / "a.json"
    p.write_text(json.dumps(values, indent=indent, ensure_ascii=False))
    with open_input(p) as f:
        ranges = json_array.ranges(f, p, chunk)
        parts = [json_array.elements(f, p, a, b) for a, b in ranges]
        assert [v for part in parts for v in part] == values
        firsts = [json_array.scan(f, p, 1 << 62, stop_at=a)[3] for a, _ in ranges]
    if values:
        assert firsts == [sum(map(len, parts[:k])) for k in range(len(parts))]
