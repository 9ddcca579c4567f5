"""Load a llamafactory export the way LLaMA-Factory's `tokenized_path` does (its own `get_dataset`), collate it with
its own SFT collator under `neat_packing` for sdpa (block-diagonal 4D mask, two rows a batch) and for
flash_attention_2 (one row a batch: padding cut, mask dropped), and take the documents transformers' flash-attention
path finds from those position_ids; and what the same collator makes of a packprep build folder given as
tokenized_path directly. argv: export_dir tokenizer_dir build_dir out.npz"""

import importlib.machinery
import sys
import types

import numpy as np
import torch

# llamafactory.data.mm_plugin imports torchaudio at the top, for audio inputs only; PyPI's torchaudio is built for a
# CUDA torch and does not load with a CPU one, so text-only collation runs with an empty module in its place
stub = types.ModuleType("torchaudio")
stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)  # transformers' find_spec check reads it
sys.modules.setdefault("torchaudio", stub)
from llamafactory.data import (  # noqa: E402
    SFTDataCollatorWith4DAttentionMask,
    get_dataset,
    get_template_and_fix_tokenizer,
)
from llamafactory.hparams import DataArguments  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids  # noqa: E402

export_dir, tokenizer_dir, build_dir, out = sys.argv[1:5]
data_args = DataArguments(tokenized_path=export_dir, neat_packing=True, template="empty")
# with tokenized_path present, get_dataset returns load_from_disk's dataset before it needs a template or a model
module = get_dataset(None, None, data_args, None, "sft", None)
ds = module["train_dataset"]
tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
template = get_template_and_fix_tokenizer(tokenizer, data_args)


def collator(attn: str) -> SFTDataCollatorWith4DAttentionMask:  # as llamafactory.train.sft.workflow makes it
    return SFTDataCollatorWith4DAttentionMask(template=template, model=None, tokenizer=tokenizer,
                                              pad_to_multiple_of=8, label_pad_token_id=-100, block_diag_attn=True,
                                              attn_implementation=attn, compute_dtype=torch.float32,
                                              neat_packing=True)


rows = [ds[i] for i in range(len(ds))]
sdpa, fa2 = collator("sdpa"), collator("flash_attention_2")
input_ids, labels, allowed = [], [], []
for i in range(0, len(rows), 2):
    batch = sdpa([dict(r) for r in rows[i:i + 2]])
    input_ids.append(batch["input_ids"].numpy())
    labels.append(batch["labels"].numpy())
    allowed.append((batch["attention_mask"][:, 0] == 0).numpy())  # 0 where attention is allowed, dtype min elsewhere
cu, kept, mask_none = [], [], True
for r in rows:
    batch = fa2([dict(r)])
    mask_none &= batch["attention_mask"] is None
    (cu_q, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    cu.append(cu_q.numpy())
    kept.append(batch["input_ids"].shape[1])
raw = get_dataset(None, None, DataArguments(tokenized_path=build_dir, neat_packing=True), None, "sft", None)
try:
    sdpa([dict(raw["train_dataset"][i]) for i in range(2)])
    raw_error = ""
except ValueError as e:  # its collator meets packprep's other columns
    raw_error = str(e)
np.savez(out, raw_error=raw_error, input_ids=np.concatenate(input_ids), labels=np.concatenate(labels),
         allowed=np.concatenate(allowed),
         cu=np.concatenate(cu), cu_counts=np.array([len(c) for c in cu]), kept=np.array(kept),
         mask_none=mask_none, columns=np.array(sorted(ds.column_names)), rows=len(ds))
