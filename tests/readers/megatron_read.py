"""Read a megatron export with megatron-core's own IndexedDataset, and write the expected documents with its own
IndexedDatasetBuilder for a byte comparison. argv: export_dir expected.npz out.npz"""

import filecmp
import os
import sys
import tempfile

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

export_dir, expected, out = sys.argv[1:4]
e = np.load(expected)
result = {}
for key, values in (("text", e["tokens"]), ("loss_mask", e["mask"])):
    prefix = os.path.join(export_dir, f"packprep_{key}_document")
    if not os.path.exists(prefix + ".idx"):
        continue
    ds = IndexedDataset(prefix)
    result[f"{key}_values"] = np.concatenate([ds[i] for i in range(len(ds))])
    result[f"{key}_lengths"] = np.array(ds.sequence_lengths)  # copies: the views die with ds's memory map
    result[f"{key}_document_indices"] = np.array(ds.document_indices)
    result[f"{key}_dtype"] = np.dtype(ds.index.dtype).name
    # their writer, the way tools/preprocess_data.py calls it: one add_document per document
    dtype = DType.optimal_dtype(int(e["vocab_size"])) if key == "text" else np.uint8
    theirs = os.path.join(tempfile.mkdtemp(), "theirs")
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for doc in np.split(values, np.cumsum(e["lengths"])[:-1]):
        builder.add_document(doc, [len(doc)])
    builder.finalize(theirs + ".idx")
    for ext in ("bin", "idx"):
        result[f"{key}_same_{ext}"] = filecmp.cmp(f"{prefix}.{ext}", f"{theirs}.{ext}", shallow=False)
np.savez(out, **result)
