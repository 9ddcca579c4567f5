"""Read a packprep build through torchtitan 0.3's own loader machinery: packprep.integrations.torchtitan's
PackprepDataLoader, built as its trainer builds config.dataloader; the documents its varlen attention and flex mask
find from the positions; a resume from the loader's state dict (0 and 2 workers); two data-parallel ranks.
argv: build seq_len out.npz"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's packprep

import importlib  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

# torchtitan.models.common's __init__ imports its MoE kernels, which need triton (a GPU package); attention.py does
# not: register the package without running its __init__, then import attention.py, torchtitan's own file
common = types.ModuleType("torchtitan.models.common")
common.__path__ = [str(Path(importlib.import_module("torchtitan.models").__path__[0]) / "common")]
sys.modules["torchtitan.models.common"] = common
from torchtitan.models.common.attention import (  # noqa: E402
    create_varlen_metadata_for_document,
    get_document_mask_mod,
)

from packprep.integrations.torchtitan import PackprepDataLoader  # noqa: E402

build, seq_len, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]


def loader(shuffle: bool, workers: int = 0) -> PackprepDataLoader:
    config = PackprepDataLoader.Config(dataset_path=build, shuffle=shuffle, infinite=shuffle, seed=3,
                                       num_workers=workers)
    return config.build(dp_world_size=1, dp_rank=0, tokenizer=None, seq_len=seq_len, local_batch_size=2,
                        snapshot_every_n_steps=1)


inputs, labels, positions, cu, same_doc = [], [], [], [], []
for batch, target in loader(shuffle=False):
    assert batch["input"].dtype == target.dtype == batch["positions"].dtype == torch.int64
    inputs.append(batch["input"].numpy())
    positions.append(batch["positions"].numpy())
    labels.append(target.numpy())
    cu.append(create_varlen_metadata_for_document(batch["positions"]).cu_seq_q.numpy())
    mask = get_document_mask_mod(batch["positions"])
    b, q, k = torch.meshgrid(torch.arange(len(target)), torch.arange(seq_len), torch.arange(seq_len), indexing="ij")
    same_doc.append(mask(b, None, q, k).numpy())

resume = {}
for workers in (0, 2):
    first = loader(shuffle=True, workers=workers)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    after = [next(it)[0]["input"].numpy() for _ in range(4)]
    second = loader(shuffle=True, workers=workers)
    second.load_state_dict(state)
    it = iter(second)
    resume[f"resume_same_{workers}"] = all(np.array_equal(a, next(it)[0]["input"].numpy()) for a in after)
# two data-parallel ranks, one shuffled epoch each
ranks = []
for r in range(2):
    config = PackprepDataLoader.Config(dataset_path=build, shuffle=True, infinite=False, seed=3)
    dp = config.build(dp_world_size=2, dp_rank=r, tokenizer=None, seq_len=seq_len, local_batch_size=2)
    ranks.append([x.numpy() for b, _ in dp for x in b["input"]])
np.savez(out, rank0=np.stack(ranks[0]), rank1=np.stack(ranks[1]), inputs=np.concatenate(inputs),
         labels=np.concatenate(labels), positions=np.concatenate(positions),
         cu=np.concatenate(cu), cu_counts=np.array([len(c) for c in cu]),
         same_doc=np.concatenate(same_doc), **resume)
