"""torchtitan (0.3) training on a packprep build: the rows as packed, each document where packprep put it.

    from packprep.integrations.torchtitan import PackprepDataLoader
    config.dataloader = PackprepDataLoader.Config(dataset_path="out")    # in your config_registry function

torchtitan 0.3's data contract (`components/dataloader.py`, `hf_datasets/text_datasets.py`): the trainer builds
`config.dataloader` with `build(dp_world_size, dp_rank, tokenizer, seq_len, local_batch_size,
snapshot_every_n_steps)`; the loader is a torchdata `StatefulDataLoader` over an `IterableDataset` + `Stateful` whose
samples are `({"input": int64[seq_len], "positions": int64[seq_len]}, labels int64[seq_len])`, already shifted
(labels[i] is the target of input[i], -100 for no loss). Its flex and varlen attention start a document wherever
`positions` is 0 (`get_document_mask_mod`, `create_varlen_metadata_for_document`); RoPE reads the same positions.

Here a sample is one packed row (`ShiftedRows`: the row shifted by one, positions restarting at packprep's document
offsets), padded to training.seq_len (input 0, label -100, positions 0, 1, ... so the padding is a document of its
own). So documents are never inferred from EOS and nothing is re-packed. A row of the build holds up to its
--seq-len tokens and loses one to the shift: build with `--seq-len` = training.seq_len + 1 to fill every sample.
Rows are split evenly across data-parallel ranks (the remainder is left out, so every rank runs the same number of
steps) and across DataLoader workers; the order is a seeded permutation per epoch. State: {epoch, next} per worker,
through StatefulDataLoader. Cost: a row read is a few numpy slices of the memory-mapped shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info

from packprep.integrations.rows import ShiftedRows

try:
    from torchtitan.components.dataloader import ParallelAwareDataloader
except ImportError as e:
    raise ImportError(f"packprep.integrations.torchtitan needs torchtitan >= 0.3 ({e}): pip install torchtitan"
                      ) from None

IGNORE_INDEX = -100


class PackedRowsDataset(IterableDataset, Stateful):
    """One rank's share of a build's packed rows as torchtitan samples, resumable."""

    def __init__(self, path: str, seq_len: int, dp_rank: int = 0, dp_world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, infinite: bool = True) -> None:
        self.rows = ShiftedRows(path)
        self.seq_len, self.seed, self.shuffle, self.infinite = seq_len, seed, shuffle, infinite
        self.rank, self.per_rank = dp_rank, len(self.rows) // dp_world_size
        if self.per_rank == 0:
            raise ValueError(f"{path} has {len(self.rows)} rows: fewer than the {dp_world_size} data-parallel ranks")
        self.epoch, self.next = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """This rank's rows in epoch `epoch`: a contiguous slice of the (seeded, per-epoch) permutation."""
        rows = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)) if self.shuffle \
            else np.arange(len(self.rows))
        return rows[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def sample(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        row = self.rows[index]
        n = len(row["input_ids"])
        if n > self.seq_len:
            raise ValueError(f"packed row {index} holds {n + 1} tokens, more than training.seq_len + 1 = "
                             f"{self.seq_len + 1}; build with --seq-len <= {self.seq_len + 1}")
        pad = self.seq_len - n
        ids = np.concatenate([row["input_ids"], np.zeros(pad, np.int64)])
        labels = np.concatenate([row["labels"], np.full(pad, IGNORE_INDEX, np.int64)])
        positions = np.concatenate([row["positions"], np.arange(pad, dtype=np.int64)])
        return {"input": torch.from_numpy(ids), "positions": torch.from_numpy(positions)}, torch.from_numpy(labels)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        while True:
            order = self.order(self.epoch)
            while self.next < len(order):
                k = self.next
                self.next += 1
                if k % workers == worker:
                    yield self.sample(int(order[k]))
            if not self.infinite:
                return
            self.epoch, self.next = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"version": 1, "epoch": self.epoch, "next": self.next, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1 or state["rows"] != len(self.rows):
            raise ValueError(f"loader state {state} is not for this build ({len(self.rows)} rows)")
        self.epoch, self.next = state["epoch"], state["next"]


class PackprepDataLoader(ParallelAwareDataloader):
    """torchtitan's dataloader over a packprep build (`config.dataloader`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "packprep"
        seed: int = 0
        """Seed of the per-epoch row order."""
        shuffle: bool = True
        """Shuffle the rows each epoch (False: shard order)."""
        infinite: bool = True
        """Start another epoch when the rows run out (False: stop)."""

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer=None, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs) -> None:
        if not config.dataset_path:
            raise ValueError("PackprepDataLoader.Config needs dataset_path: a packprep build folder or URL")
        dataset = PackedRowsDataset(config.dataset_path, seq_len, dp_rank, dp_world_size, config.seed,
                                    config.shuffle, config.infinite)
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=config.num_workers,
                         persistent_workers=config.persistent_workers, pin_memory=config.pin_memory,
                         prefetch_factor=config.prefetch_factor, snapshot_every_n_steps=snapshot_every_n_steps,
                         batch_size=local_batch_size)
