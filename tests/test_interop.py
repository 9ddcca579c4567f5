"""Shards feed existing stacks as is: HF datasets opens them and TRL's padding-free collator turns their rows into
the same per-document boundaries (cu_seq_lens, position ids) that packprep's own trainer uses."""

from __future__ import annotations

import numpy as np
import pytest

from packprep.build import build
from packprep.config import BuildConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpora):
    out = tmp_path_factory.mktemp("interop") / "out"
    build(BuildConfig(inputs=(str(corpora["prompt-completion"]), str(corpora["chat"])), out=str(out), seq_len=256,
                      workers=1))
    return out


def test_trl_padding_free_collator_reads_rows_as_is(shards):
    datasets = pytest.importorskip("datasets")
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
    ds = datasets.load_from_disk(str(shards))
    rows = [ds[i] for i in range(min(4, len(ds)))]
    assert any(len(r["seq_lengths"]) > 1 for r in rows)  # really packed: several documents in a row
    batch = trl_sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)

    ids = np.concatenate([r["input_ids"] for r in rows])
    assert batch["input_ids"][0].tolist() == ids.tolist()
    lengths = np.concatenate([r["seq_lengths"] for r in rows])
    cu = np.concatenate([[0], np.cumsum(lengths)])
    assert batch["cu_seq_lens_q"].tolist() == cu.tolist()
    positions = np.concatenate([np.arange(n) for n in lengths])
    assert batch["position_ids"][0].tolist() == positions.tolist()
    # doc_offsets is the per-row cu_seqlens that seq_lengths summarises
    for r in rows:
        assert np.diff(r["doc_offsets"]).tolist() == list(r["seq_lengths"])
        assert r["doc_offsets"][-1] == len(r["input_ids"])


def test_trainer_batch_agrees_with_trl(shards):
    pytest.importorskip("torch")
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
    datasets = pytest.importorskip("datasets")
    from trainer import PackedShards

    ds = datasets.load_from_disk(str(shards))
    batch = next(iter(PackedShards(str(shards), batch_tokens=256, seed=0)))
    # which rows went into the batch: match them by content against the dataset
    by_ids = {tuple(r["input_ids"]): r for r in ds}
    cu = batch.cu_seqlens.tolist()
    ids = batch.input_ids.tolist()
    rows, start = [], 0
    while start < len(ids):
        for r_ids, r in by_ids.items():
            if tuple(ids[start:start + len(r_ids)]) == r_ids and start + len(r_ids) in cu:
                rows.append(r)
                start += len(r_ids)
                break
        else:
            raise AssertionError(f"batch tokens from {start} match no row of the dataset")
    trl = trl_sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert trl["cu_seq_lens_q"].tolist() == cu
    assert trl["position_ids"][0].tolist() == batch.position_ids.tolist()
