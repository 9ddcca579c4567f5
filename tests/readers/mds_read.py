"""Read an mds export with mosaicml-streaming's own StreamingDataset, and write the expected rows with its own
MDSWriter for a byte comparison. argv: export_dir expected.npz out.npz

`streaming/__init__.py` also imports its vision and text datasets (torchvision, which PyPI only has as a CUDA
build); only `streaming.base` (the MDS reader and writer) is needed, so the package's __init__ is bypassed."""

import filecmp
import importlib.util
import json
import os
import sys
import tempfile
import types

spec = importlib.util.find_spec("streaming")
package = types.ModuleType("streaming")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["streaming"] = package
from rows import by_source_shard, expected_rows, save_rows  # noqa: E402
from streaming.base import MDSWriter, StreamingDataset  # noqa: E402

export_dir, expected, out = sys.argv[1:4]
ds = StreamingDataset(local=export_dir, shuffle=False, batch_size=1)
rows = [ds[i] for i in range(len(ds))]
columns = {"input_ids": "ndarray:int32", "labels": "ndarray:int32", "doc_offsets": "ndarray:int32",
           "loss_mask": "ndarray:uint8"}
# their writer, one MDSWriter per source shard; its shard i of source shard k is our shard number (k, i) in order
theirs_shards, same_shards = [], []
for part in by_source_shard(expected, expected_rows(expected)):
    theirs = tempfile.mkdtemp()
    with MDSWriter(out=theirs, columns=columns) as writer:
        for row in part:
            writer.write(row)
    for shard in json.load(open(os.path.join(theirs, "index.json")))["shards"]:
        ours_name = f"shard.{len(theirs_shards):05d}.mds"
        same_shards.append(filecmp.cmp(os.path.join(export_dir, ours_name),
                                       os.path.join(theirs, shard["raw_data"]["basename"]), shallow=False))
        shard["raw_data"]["basename"] = ours_name
        theirs_shards.append(shard)
ours_index = json.load(open(os.path.join(export_dir, "index.json")))
same_index = ours_index == {"version": 2, "shards": theirs_shards}
save_rows(out, rows, same_index=same_index, same_shards=all(same_shards), shards=len(theirs_shards))
