"""Shard format v1's writer: rows built from flat arrays keep tokens, masks, offsets and doc ids aligned."""

from __future__ import annotations

import numpy as np

from packprep.shards import make_batch


def test_make_batch_from_a_slice_of_the_flat_arrays():
    # rows [[a a a b b], [c c c c]] stored at tokens[5:14] of a larger flat buffer, with pieces 1..3 of a larger list
    tokens = np.arange(20, dtype=np.int32)
    mask = (np.arange(20) % 3 == 0).astype(np.uint8)
    batch = make_batch(tokens, np.array([5, 10, 14]), np.array([9, 3, 2, 4]), np.array([1, 3, 4]),
                       np.array([70, 71, 72, 73]), mask).to_pydict()
    assert batch["input_ids"] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    assert batch["loss_mask"] == [mask[5:10].tolist(), mask[10:14].tolist()]
    assert batch["doc_offsets"] == [[0, 3, 5], [0, 4]]
    assert batch["seq_lengths"] == [[3, 2], [4]]
    assert batch["doc_ids"] == [[71, 72], [73]]


def test_make_batch_without_mask_is_all_loss():
    batch = make_batch(np.arange(9), np.array([0, 5, 9]), np.array([3, 2, 4]), np.array([0, 2, 3]),
                       np.array([0, 1, 2])).to_pydict()
    assert batch["loss_mask"] == [[1] * 5, [1] * 4]
    assert batch["doc_offsets"] == [[0, 3, 5], [0, 4]]
