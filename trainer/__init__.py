"""trainer: stream packprep shards into variable-length (per-document) attention training of Hugging Face causal LMs.

    from trainer import PackedShards, build_model, model_inputs
    ds = PackedShards("out/", batch_tokens=16384, rank=rank, world_size=world)
    model = build_model("Qwen/Qwen2.5-0.5B", attn_backend="auto")   # or a local folder, or "tiny" / "small"
    for batch in ds:                                                 # VarlenBatch: flat [T] tensors + cu_seqlens
        batch = batch.to("cuda")
        logits = model(**model_inputs(batch)).logits                 # no token attends across a document
"""

from trainer.data import PackedShards, VarlenBatch
from trainer.model import build_model, model_inputs
from trainer.varlen import varlen_attention

__all__ = ["PackedShards", "VarlenBatch", "varlen_attention", "build_model", "model_inputs"]
