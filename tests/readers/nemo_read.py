"""Read a nemo export with Megatron-Bridge's own code (megatron-bridge 0.3.1, the newest on PyPI).
argv: export_dir expected.npz out.npz

- .npy container: their GPTSFTPackedDataset loads it and its collate_fn makes the model batch (tokens, labels,
  loss_mask, cu_seqlens) of every row; with a 4th argument N, as `pad_seq_to_mult=N` (context parallelism), which
  adds cu_seqlens_unpadded.
- .idx.parquet container: their parquet loader (GPTSFTPackedParquetDataset) is newer than any PyPI release, so the
  rows are read with pyarrow (which is all that loader does) and compared with the output of their own packing
  function, fill_packing_strategy, run on the same documents with the same bins.

megatron-bridge's package __init__ imports its whole model zoo (transformer-engine, CUDA only), so it is bypassed
and only the data modules are imported from the installed package."""

import glob
import importlib.util
import json
import os
import sys
import types

import numpy as np

spec = importlib.util.find_spec("megatron.bridge")
package = types.ModuleType("megatron.bridge")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["megatron.bridge"] = package
from megatron.bridge.data.datasets.packing_utils import create_hist, fill_packing_strategy  # noqa: E402
from megatron.bridge.data.datasets.sft import GPTSFTPackedDataset  # noqa: E402

export_dir, expected, out = sys.argv[1:4]
pad_seq_to_mult = int(sys.argv[4]) if len(sys.argv) > 4 else 1  # a --pad-docs-to-multiple build's N
e = np.load(expected)
result = {"metadata": json.dumps(json.load(open(os.path.join(export_dir, "packing_metadata.json"))))}


class Tokenizer:  # the only tokenizer facts their packed loader uses
    eos_id = int(e["eos_id"])
    eod = eos_id


npy = os.path.join(export_dir, "packed.npy")
if os.path.exists(npy):
    # the prompt template / label key / truncation field are create_sft_dataset's defaults (packed rows ignore them)
    ds = GPTSFTPackedDataset(npy, Tokenizer(), max_seq_length=int(e["seq_len"]), answer_only_loss=True,
                             pack_metadata_file_path=os.path.join(export_dir, "packing_metadata.json"),
                             prompt_template="{input} {output}", label_key="output", truncation_field="input",
                             pad_seq_to_mult=pad_seq_to_mult)
    batches = [ds.collate_fn([ds[i]]) for i in range(len(ds))]
    for key in ("tokens", "labels", "loss_mask"):  # without the collate's padding to a multiple of 16
        result[key] = np.concatenate([b[key][0, : b["token_count"][0]].numpy() for b in batches])
    cu = [b["cu_seqlens"][0].numpy() for b in batches]
    # without the -1 fill after cu_seqlens_argmin and the extra boundary the collate adds for its padding
    cu = [c[: int(b["cu_seqlens_argmin"][0, 0])] for c, b in zip(cu, batches)]
    result["cu_seqlens"] = np.concatenate([c[c <= b["token_count"][0]] for c, b in zip(cu, batches)])
    if pad_seq_to_mult > 1:  # the real lengths their collate finds (one entry per cu_seqlens entry kept above)
        result["cu_seqlens_unpadded"] = np.concatenate([b["cu_seqlens_unpadded"][0, :len(c[c <= b["token_count"][0]])]
                                                        .numpy() for c, b in zip(cu, batches)])
    result["rows"] = len(ds)
    result["token_count"] = np.array([b["token_count"][0] for b in batches])
else:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(glob.glob(os.path.join(export_dir, "*.idx.parquet"))))
    result["schema"] = str(table.schema)
    ours = table.to_pylist()
    # their packing function on the expected documents, bins = the exported rows' documents
    docs = np.split(np.arange(len(e["tokens"])), np.cumsum(e["lengths"])[:-1])
    dataset = [{"input_ids": e["tokens"][d].tolist(), "loss_mask": e["mask"][d].astype(bool).tolist()} for d in docs]
    sequences, _ = create_hist(dataset, int(e["seq_len"]))
    assignments = [(e["lengths"][e["row_docs"][r]:e["row_docs"][r + 1]] - 1).tolist()
                   for r in range(len(e["row_docs"]) - 1)]
    theirs = fill_packing_strategy(assignments, sequences, int(e["seq_len"]), Tokenizer.eos_id)

    def pieces(rows):  # (row's document lengths, each document's input_ids and loss_mask) -> comparable, sorted
        out = []
        for r in rows:
            b = list(r["seq_start_id"]) + [len(r["input_ids"])]
            out += [(tuple(r["input_ids"][b[i]:b[i + 1]]), tuple(int(x) for x in r["loss_mask"][b[i]:b[i + 1]]))
                    for i in range(len(b) - 1)]
        return sorted(out)
    result["same_seq_start_id"] = [r["seq_start_id"] for r in ours] == [list(r["seq_start_id"]) for r in theirs]
    result["same_documents"] = pieces(ours) == pieces(theirs)
    result["rows"] = len(ours)
np.savez(out, **result)
