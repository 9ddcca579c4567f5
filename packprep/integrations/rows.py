"""Random access to a build's packed rows in the next-token convention (inputs and targets already shifted).

    rows = ShiftedRows("out")            # memory-maps the shards (a remote build is staged first, as verify does)
    len(rows), rows.seq_len
    r = rows[17]                         # dict of numpy arrays, each len(row) - 1 long:
    r["input_ids"]   int64               #   the row's tokens but the last
    r["labels"]      int64               #   the next token where it carries loss, else -100; -100 where the next
                                         #   token starts another document (no prediction crosses a boundary)
    r["positions"]   int64               #   position inside its document: 0 at every document start

Example: documents [a0 a1 a2 | b0 b1] with loss everywhere -> input_ids [a0 a1 a2 b0], labels [a1 a2 -100 b1],
positions [0 1 2 0]. The targets are the ones each document's own shift gives; the only extra is that a document's
last token (EOS) stays an input, with no target. Loaders that find documents where positions is 0 (torchtitan) see
packprep's boundaries exactly, whatever the tokens hold. Cost: a row read is a few numpy slices of the memory map.
"""

from __future__ import annotations

import numpy as np

from packprep.exports import IGNORE_INDEX, iter_rows, read_build


class ShiftedRows:
    """The packed rows of a finished build (a folder or a URL), in shard order, shifted for next-token training."""

    def __init__(self, build: str):
        info, files = read_build(build)
        self.seq_len = info.seq_len
        self._batches = [rows for f in files for rows in iter_rows(f)]
        counts = [len(rows.row_offsets) - 1 for rows in self._batches]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._doc_ends = [np.cumsum(rows.doc_lengths, dtype=np.int64) for rows in self._batches]

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a build of {len(self)} rows")
        b = int(np.searchsorted(self._first, index, side="right")) - 1
        rows, r = self._batches[b], index - int(self._first[b])
        a, z = int(rows.row_offsets[r]), int(rows.row_offsets[r + 1])
        tokens = rows.tokens[a:z].astype(np.int64)
        ends = self._doc_ends[b][rows.row_docs[r]:rows.row_docs[r + 1]] - a  # doc ends inside the row
        starts = np.concatenate([[0], ends[:-1]])
        positions = np.arange(z - a, dtype=np.int64) - np.repeat(starts, ends - starts)
        labels = np.where(rows.loss_mask[a:z].view(bool), tokens, IGNORE_INDEX)
        labels[starts] = IGNORE_INDEX  # a document's first token is no target of the one before it
        return {"input_ids": tokens[:-1], "labels": labels[1:], "positions": positions[:-1]}
