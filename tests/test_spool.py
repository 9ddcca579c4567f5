"""The spool format: what `spool.write` stores, `spool.Reader` and `spool.lengths` give back, marker last."""

from __future__ import annotations

import json

import numpy as np

from packprep import spool


def test_spool_round_trip_with_an_empty_task_and_rejects(tmp_path):
    ids = np.arange(5, 70_005, dtype=np.int32)
    mask = (ids % 3 == 0).astype(np.uint8)
    assert spool.finished(tmp_path, 1) is None
    empty = spool.write(tmp_path, 0, np.zeros(0, np.int32), np.zeros(0, np.uint8), np.array([0, -1], np.int32),
                        [{"file": "a.jsonl", "line": 2, "kind": "null", "reason": "text is null", "raw": "é"}])
    full = spool.write(tmp_path, 1, ids, mask, np.array([30_000, 40_000], np.int32))
    assert empty == spool.TaskResult(0, 2, 0, 0, 1, {"null": 1}) == spool.finished(tmp_path, 0)
    assert full == spool.TaskResult(1, 2, 70_000, int(mask.sum()), 0, {}) == spool.finished(tmp_path, 1)
    assert not spool.paths(tmp_path, 1)["rejects"].exists() and not list(tmp_path.glob("*.tmp*"))
    reader = spool.Reader(tmp_path)
    assert len(reader[0][0]) == 0 and len(reader[0][1]) == 0
    got_ids, got_mask = reader[1]
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_mask, mask)
    assert not got_ids.flags.writeable
    reader.release(1)  # drops this process's pages; the data stays readable
    assert int(got_ids[-1]) == 70_004
    np.testing.assert_array_equal(spool.lengths(tmp_path, 2), [0, -1, 30_000, 40_000])
    dest = tmp_path / "rejects.jsonl"
    with open(dest, "wb") as f:
        spool.copy_rejects(tmp_path, 0, f)
    assert json.loads(dest.read_text(encoding="utf-8"))["raw"] == "é"
    spool.delete(tmp_path)
    assert not tmp_path.exists()
