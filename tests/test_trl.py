"""Zero-glue TRL: `SFTTrainer(model, args=SFTConfig(padding_free=True, max_length=None), train_dataset=
load_from_disk(out))` trains on exactly packprep's loss tokens (the shards' `labels`), with position_ids restarting
at every document of a packed row. A tiny random Llama on CPU; a prompt/completion build and a chat build."""

from __future__ import annotations

import math

import numpy as np
import pytest

from packprep.build import build
from packprep.config import BuildConfig
from packprep.tokenizer import BUILTIN

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")


def tiny_model(vocab: int):
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("fmt", ["prompt-completion", "chat"])
def test_sft_trainer_trains_on_the_shards_labels(corpora, tmp_path, fmt):
    from datasets import load_from_disk

    out = tmp_path / "out"
    manifest = build(BuildConfig(inputs=(str(corpora[fmt]),), out=str(out), seq_len=256, workers=1)).manifest
    tok = transformers.AutoTokenizer.from_pretrained(str(BUILTIN))
    ds = load_from_disk(str(out))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), padding_free=True, max_length=None,  # the one setting
                         per_device_train_batch_size=2, max_steps=2, report_to=[], use_cpu=True, logging_steps=1,
                         save_strategy="no")
    trainer = trl.SFTTrainer(tiny_model(len(tok)), args=args, train_dataset=ds, processing_class=tok)
    rows = {tuple(r["input_ids"]): r for r in ds}
    total = 0
    for batch in trainer.get_train_dataloader():
        ids, labels, pos = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        want_labels, want_pos, at = [], [], 0
        while at < len(ids):  # the batch is its rows back to back: find each and rebuild what it must hold
            row = next(r for k, r in rows.items() if tuple(ids[at:at + len(k)]) == k)
            want_labels += row["labels"]
            want_pos += [p for a, b in zip(row["doc_offsets"], row["doc_offsets"][1:]) for p in range(b - a)]
            at += len(row["input_ids"])
        assert labels == want_labels and pos == want_pos
        total += sum(x != -100 for x in labels)
    assert total == manifest["counts"]["label_tokens"] > 0
    assert total == sum(int((np.array(r["labels"]) != -100).sum()) for r in ds)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
