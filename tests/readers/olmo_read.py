"""Read an olmo export with ai2-olmo-core's NumpyPackedFSLDataset (boundaries from the .csv.gz metadata, never from
EOS) and its iter_document_indices. argv: export_dir expected.npz work_dir out.npz"""

import glob
import os
import sys

import numpy as np
from olmo_core.data.numpy_dataset import NumpyPackedFSLDataset
from olmo_core.data.utils import iter_document_indices

export_dir, expected, work_dir, out = sys.argv[1:5]
e = np.load(expected)
paths = sorted(glob.glob(os.path.join(export_dir, "token_ids_part_*.npy")))
masks = sorted(glob.glob(os.path.join(export_dir, "labels_mask_part_*.npy")))
dtype = np.uint16 if int(e["vocab_size"]) <= 1 << 16 else np.uint32
pad = int(e["vocab_size"])  # an id no document holds, so padding segments are recognisable
ds = NumpyPackedFSLDataset(*paths, sequence_length=int(e["seq_len"]), pad_token_id=pad, eos_token_id=int(e["eos_id"]),
                           vocab_size=int(e["vocab_size"]), dtype=dtype, label_mask_paths=masks,
                           generate_doc_lengths=True, use_array_if_local=False)
ds.work_dir = work_dir
ds.prepare()
tokens, mask, lengths = [], [], []
for i in range(len(ds)):
    item = ds[i]
    ids, lm = item["input_ids"].numpy(), item["label_mask"].numpy()
    start = 0
    for n in item["doc_lens"].tolist():
        if not (ids[start:start + n] == pad).all():
            tokens.append(ids[start:start + n])
            mask.append(lm[start:start + n])
            lengths.append(n)
        start += n
metadata = [np.array(list(iter_document_indices(p, use_array_if_local=False))) for p in paths]
by_eos = [np.array(list(iter_document_indices(p, use_array_if_local=True, eos_token_id=int(e["eos_id"]),
                                              dtype=dtype))) for p in paths]
np.savez(out, tokens=np.concatenate(tokens).astype(np.int64), mask=np.concatenate(mask).astype(np.uint8),
         lengths=np.array(lengths), instances=len(ds), metadata_docs=sum(len(m) for m in metadata),
         eos_docs=sum(len(m) for m in by_eos),
         metadata_bounds=np.concatenate([m.reshape(-1, 2) for m in metadata]))
