"""packprep.hf: packed rows through transformers.Trainer give each document exactly its own logits; HF's
DataCollatorWithFlattening does not (it takes a packed row for one sequence)."""

from __future__ import annotations

import numpy as np
import pytest
from trainer_fixtures import one_torch_thread, random_lengths, write_packed

from packprep.hf import IGNORE_INDEX, PackedCollator, flat_batch

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

VOCAB = 1000
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_shards")
    truth = write_packed(out, random_lengths(40, 128, seed=3), 128, vocab=VOCAB, seed=3, num_shards=1)
    ds = datasets.load_from_disk(str(out))
    assert any(len(r["doc_offsets"]) > 2 for r in ds)  # several documents share a row
    return ds, truth


def tiny_llama(attn: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def per_document_logits(model, rows) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.as_tensor(np.asarray(r["input_ids"][a:b]), dtype=torch.long)[None],
                                use_cache=False).logits[0]
                          for r in rows for a, b in zip(r["doc_offsets"][:-1], r["doc_offsets"][1:])])


def test_flat_batch_layout():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "doc_offsets": [0, 3, 5], "loss_mask": [1, 1, 0, 1, 1]},
            {"input_ids": [6, 7, 8, 9], "doc_offsets": [0, 4]}]
    b = flat_batch(rows, "np")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[-100, 2, -100, -100, 5, -100, 7, 8, 9]]
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == [0, 3, 5, 9]
    assert b["max_length_q"] == b["max_length_k"] == 4 and b["use_cache"] is False
    # a labels column wins over loss_mask, but never predicts across a boundary
    given = flat_batch([{"input_ids": [1, 2, 3], "doc_offsets": [0, 1, 3], "labels": [1, 2, -100],
                         "loss_mask": [0, 0, 0]}], "np")
    assert given["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        flat_batch([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="do not cut"):
        flat_batch([{"input_ids": [1, 2], "doc_offsets": [0, 3]}])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trainer_packed_logits_equal_per_document_logits(packed, attn, tmp_path):
    ds, _ = packed
    model = tiny_llama(attn)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[],
                                          remove_unused_columns=False, use_cpu=True, eval_accumulation_steps=1)
    trainer = transformers.Trainer(model=model, args=args, data_collator=PackedCollator())
    n = 6
    pred = trainer.predict(ds.select(range(n)))
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    for batch_start in range(0, n, 2):
        rows = [ds[i] for i in range(batch_start, batch_start + 2)]
        want = per_document_logits(model, rows)
        got = torch.as_tensor(logits[batch_start // 2, : len(want)])
        assert torch.allclose(got, want, atol=1e-5), (attn, (got - want).abs().max())
        # the same tokens as one sequence really differ: the equality above is not vacuous
        with torch.no_grad():
            whole = model(input_ids=flat_batch(rows)["input_ids"], use_cache=False).logits[0]
        assert (whole - want).abs().max() > 1e-3


def test_trainer_trains_on_exactly_the_loss_tokens(packed, tmp_path):
    ds, truth = packed
    seen = []

    class Counting(PackedCollator):
        def __call__(self, rows):
            batch = super().__call__(rows)
            seen.append((int((batch["labels"] != IGNORE_INDEX).sum()), rows))
            return batch

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=3,
                                          report_to=[], remove_unused_columns=False, use_cpu=True, logging_steps=1,
                                          learning_rate=1e-3, save_strategy="no")
    trainer = transformers.Trainer(model=tiny_llama("sdpa").train(), args=args, train_dataset=ds,
                                   data_collator=Counting())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))
    for count, rows in seen:
        # loss tokens: loss_mask 1 and not a document's first token
        assert count == sum(int(np.sum(r["loss_mask"])) - sum(r["loss_mask"][o] for o in r["doc_offsets"][:-1])
                            for r in rows)
        assert count > 0


def test_data_collator_with_flattening_takes_a_packed_row_for_one_sequence(packed):
    """The trap the README documents: HF's flattening collator restarts positions per row, not per document, so
    attention crosses the documents packed in a row; packprep.hf restarts them per document."""
    ds, _ = packed
    rows = [ds[i] for i in range(2)]
    model = tiny_llama("sdpa")
    want = per_document_logits(model, rows)
    hf = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": r["input_ids"]} for r in rows])
    row_lens = [len(r["input_ids"]) for r in rows]
    assert hf["position_ids"][0].tolist() == [p for n in row_lens for p in range(n)]
    assert hf["cu_seq_lens_q"].tolist() == [0, row_lens[0], sum(row_lens)]  # rows, not documents
    ours = PackedCollator()(rows)
    with torch.no_grad():
        flat = model(input_ids=hf["input_ids"], position_ids=hf["position_ids"], use_cache=False).logits[0]
        good = model(**{k: v for k, v in ours.items() if k != "labels"}).logits[0]
        # transformers (5.x) only separates documents by position_ids without a KV cache; the config's
        # use_cache=True builds one, which is why the collator's batch says use_cache=False
        cached = model(input_ids=ours["input_ids"], position_ids=ours["position_ids"]).logits[0]
    assert model.config.use_cache and (cached - want).abs().max() > 1e-3
    assert (flat - want).abs().max() > 1e-3
    assert torch.allclose(good, want, atol=1e-5)
