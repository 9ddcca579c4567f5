"""Read a litdata export with litdata's own StreamingDataset, and write the expected rows with its own BinaryWriter
(what litdata.optimize uses) for a byte comparison. argv: export_dir expected.npz out.npz"""

import filecmp
import json
import os
import sys
import tempfile

from litdata import StreamingDataset
from litdata.streaming.writer import BinaryWriter
from rows import by_source_shard, expected_rows, save_rows

export_dir, expected, out = sys.argv[1:4]
ds = StreamingDataset(export_dir)
rows = [ds[i] for i in range(len(ds))]
# their writer, one BinaryWriter per source shard; its chunk i of source shard k is our chunk number (k, i) in order
theirs_chunks, same_chunks, config = [], [], None
for part in by_source_shard(expected, expected_rows(expected)):
    theirs = tempfile.mkdtemp()
    writer = BinaryWriter(theirs, chunk_bytes=1 << 26)
    for i, row in enumerate(part):
        writer[i] = row
    writer.done()
    writer.merge()
    index = json.load(open(os.path.join(theirs, "index.json")))
    config = index["config"]
    for chunk in index["chunks"]:
        ours_name = f"chunk-0-{len(theirs_chunks)}.bin"
        same_chunks.append(filecmp.cmp(os.path.join(export_dir, ours_name), os.path.join(theirs, chunk["filename"]),
                                       shallow=False))
        chunk["filename"] = ours_name
        theirs_chunks.append(chunk)
ours_index = json.load(open(os.path.join(export_dir, "index.json")))
ours_index.pop("updated_at")
same_index = ours_index == {"chunks": theirs_chunks, "config": config}
save_rows(out, rows, same_index=same_index, same_chunks=all(same_chunks), chunks=len(theirs_chunks))
