"""trainer: stream packprep shards into variable-length (per-document) attention training of Hugging Face causal LMs.

    from trainer import PackedShards, build_model, model_inputs
    ds = PackedShards("out/", batch_tokens=16384, rank=rank, world_size=world)   # a finished build (packprep.json)
    model = build_model("tiny", attn_backend="auto", shards=ds)      # vocabulary from the build's tokenizer
    for batch in ds:                                                 # VarlenBatch: flat [T] tensors + cu_seqlens
        batch = batch.to("cuda")
        logits = model(**model_inputs(batch)).logits                 # no token attends across a document

Names are imported on first use, so `trainer.config` (read by the CLI's --help) imports no torch.
"""

import importlib

_WHERE = {"PackedShards": "trainer.data", "VarlenBatch": "trainer.data", "build_model": "trainer.model",
          "model_inputs": "trainer.model", "varlen_attention": "trainer.varlen", "TrainConfig": "trainer.config"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
