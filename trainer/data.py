"""Stream packprep shards as flat varlen batches: seeded, rank/worker-sharded, token-budgeted, resumable in O(1).

Shards are memory-mapped through pyarrow (nothing is copied until a batch is assembled), so the corpus never sits
in RAM and DataLoader workers share the page cache. Per epoch the rows are permuted with a seeded generator and cut
into batches of at most `batch_tokens` tokens (greedy in permuted order). Global batch g goes to rank
g % world_size; the last `num_batches % world_size` batches of each epoch are DROPPED so that every rank yields
the same number of batches (the dropped rows change every epoch because the order does). Inside a rank, batch j goes
to DataLoader worker j % num_workers, which is exactly the order the DataLoader's round-robin reads them back in,
so the stream is the same for any number of workers.

The folder must be a finished build: its `packprep.json` manifest gives the shard list, each shard's byte size
(checked at open) and sha256 (checked with `verify=True`), the seq_len and the tokenizer (`BuildInfo`: what sizes and
checks the model). `static=True` makes every batch exactly `batch_tokens` long (the residue is one filler document
without loss), so a compiled model sees one shape. `balance=True` plans each global step's per-rank batches for equal
attention + token cost instead (trainer.balance). A --pad-docs-to-multiple build streams as it is: its doc_offsets
are the padded slots (each document's real tokens, then pads without loss), so cu_seqlens and position ids restart
per slot and no real token sees a pad or another document.

Costs: opening reads only the list offsets of `input_ids` (4 bytes per row; with `balance`, also `doc_offsets`);
planning an epoch is one permutation plus one `searchsorted` per batch (~0.1 s for 1M rows); a batch costs one copy
of its tokens. The state dict is {version, epoch, position} plus the settings and world size it was made with:
resuming recomputes the epoch plan and skips ahead without replaying any batch.

Legend: T tokens in a batch, D documents in a batch, R rows in a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from packprep.remote import stage
from packprep.shards import MANIFEST, open_shard, sha256_file

IGNORE_INDEX = -100
STATE_VERSION = 1
FILLER_TOKEN = 0  # the filler document's token id (it carries no loss; any id in the vocabulary would do)


@dataclass(frozen=True)
class BuildInfo:
    """What a finished build's packprep.json promises the trainer."""

    seq_len: int
    vocab_size: int  # the tokenizer's, added tokens included
    tokenizer: str  # the name it was built with
    tokenizer_sha256: str | None
    shards: tuple[dict, ...]  # {"file", "rows", "tokens", "bytes", "sha256"} per shard, in order

    @classmethod
    def read(cls, folder: str | Path) -> BuildInfo:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a finished packprep build (no {MANIFEST}); run `packprep "
                                    "build` first, or rerun it to finish an interrupted one")
        try:
            m = json.loads(path.read_text())
            tok = m["tokenizer"]
            return cls(int(m["seq_len"]), int(tok["vocab_size"]), str(tok.get("name")), tok.get("sha256"),
                       tuple({k: s[k] for k in ("file", "rows", "tokens", "bytes", "sha256")} for s in m["shards"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is malformed ({type(e).__name__}: {e}); rebuild with `packprep build`") from None

    def check_files(self, folder: Path, verify: bool = False) -> list[Path]:
        """The shard paths, after checking that each exists with the manifest's size (and sha256 if `verify`)."""
        paths = []
        for s in self.shards:
            p = folder / s["file"]
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing (listed in {MANIFEST}); rerun `packprep build` to restore it")
            if p.stat().st_size != s["bytes"]:
                raise ValueError(f"{p} has {p.stat().st_size} bytes, {MANIFEST} says {s['bytes']}: the shard is "
                                 "truncated or replaced; rerun `packprep build` (or `packprep verify`) to repair it")
            if verify and sha256_file(p) != s["sha256"]:
                raise ValueError(f"{p} fails its sha256 check against {MANIFEST}: the shard changed after the "
                                 "build; rerun `packprep build` to rewrite it")
            paths.append(p)
        return paths


@dataclass
class VarlenBatch:
    """One flat batch of packed rows in Hugging Face's unshifted label convention (the model shifts).

    Example: rows [[a a a b b], [c c c c]] -> input_ids [a a a b b c c c c], position_ids [0 1 2 0 1 0 1 2 3],
    labels [-100 a a -100 b -100 c c c] (and -100 wherever loss_mask is 0), cu_seqlens [0 3 5 9], max_seqlen 4.
    """

    input_ids: torch.Tensor  # int64 [T]
    position_ids: torch.Tensor  # int64 [T], restart at 0 for every document
    labels: torch.Tensor  # int64 [T], -100 at every document's first token and where loss_mask == 0
    cu_seqlens: torch.Tensor  # int32 [D+1], document boundaries
    max_seqlen: int  # longest document in the batch
    cu_rows: torch.Tensor  # int32 [R+1], row boundaries (whole-row causal attention, the "no document mask" case)
    filler: int = 0  # tokens of the filler document at the end (static batches), part of input_ids, without loss

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_docs(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def _map(self, fn) -> VarlenBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return VarlenBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    def pin_memory(self) -> VarlenBatch:
        """Page-locked copies (the DataLoader's `pin_memory=True` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> VarlenBatch:
        """Move to `device`. To CUDA, the tensors are pinned first (unless already pinned) and copied
        asynchronously; to the CPU, tensors already there are returned as they are (no copy, no pinning)."""
        device = torch.device(device)
        if device.type == "cuda" and not self.input_ids.is_pinned():
            return self.pin_memory().to(device, non_blocking)
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


def make_varlen_batch(tokens: np.ndarray, doc_offsets: np.ndarray, loss_mask: np.ndarray,
                      row_offsets: np.ndarray) -> VarlenBatch:
    """Build a VarlenBatch from flat arrays: tokens/loss_mask [T], doc_offsets [D+1] and row_offsets [R+1]."""
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    lengths = np.diff(doc_offsets)
    assert doc_offsets[0] == 0 and doc_offsets[-1] == len(tokens) and (lengths > 0).all(), "bad document offsets"
    # lengths [3, 2, 4] -> position_ids [0 1 2 0 1 0 1 2 3]
    position_ids = np.arange(len(tokens), dtype=np.int64) - np.repeat(doc_offsets[:-1], lengths)
    labels = np.where(np.asarray(loss_mask) != 0, tokens, IGNORE_INDEX).astype(np.int64)
    labels[doc_offsets[:-1]] = IGNORE_INDEX  # no prediction crosses a document boundary
    return VarlenBatch(
        input_ids=torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
        position_ids=torch.from_numpy(position_ids),
        labels=torch.from_numpy(labels),
        cu_seqlens=torch.from_numpy(doc_offsets.astype(np.int32)),
        max_seqlen=int(lengths.max()),
        cu_rows=torch.from_numpy(np.asarray(row_offsets, dtype=np.int32)),
    )


def budget_batches(lengths: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Greedy token-budget batching: boundaries b[0..B] so rows b[i]:b[i+1] (in the given order) sum <= batch_tokens.

    lengths [3, 4, 2, 5], batch_tokens 7 -> [0, 2, 4]; one searchsorted per batch.
    """
    cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    bounds = [0]
    while bounds[-1] < len(lengths):
        end = int(np.searchsorted(cum, cum[bounds[-1]] + batch_tokens, side="right")) - 1
        assert end > bounds[-1], "a row longer than batch_tokens"
        bounds.append(end)
    return np.asarray(bounds, dtype=np.int64)


def _square_sums(offsets_off: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per row, the sum of its squared document lengths, from the flat `doc_offsets` list column.

    rows [0 3 5] and [0 4] -> values [0 3 5 0 4], offsets [0 3 5] -> [3*3 + 2*2, 4*4] = [13, 16].
    """
    if len(offsets_off) < 2:
        return np.zeros(0, np.int64)
    sq = np.diff(offsets[: offsets_off[-1]].astype(np.int64)) ** 2
    sq[offsets_off[1:-1] - 1] = 0  # the step from one row's last offset to the next row's 0 is no document
    return np.add.reduceat(sq, offsets_off[:-1]).astype(np.int64)


class _Chunk:
    """Zero-copy numpy views of one record batch's list columns (offsets index into values)."""

    def __init__(self, batch):
        def views(name):
            col = batch.column(name)
            return col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=True)

        self.ids_off, self.ids = views("input_ids")
        self.doc_off_off, self.doc_off = views("doc_offsets")
        self.mask_off, self.mask = views("loss_mask")


class PackedShards(torch.utils.data.IterableDataset):
    """A packprep output folder as an iterable of VarlenBatch; see the module docstring for order and sharding.

    Iterating yields the rest of the current epoch; when it runs to the end the dataset moves on to the next epoch
    (with DataLoader workers, call `set_epoch` in the main process instead, as with DistributedSampler).
    """

    def __init__(self, path: str | Path, batch_tokens: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, *, verify: bool = False, static: bool = False, balance: bool = False,
                 balance_alpha: float = 27500.0, balance_window: int = 64):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens={batch_tokens} must be positive")
        self.path = stage(str(path))  # a remote build (s3://...) is copied to a local cache once
        self.info = BuildInfo.read(self.path)
        self.files = self.info.check_files(self.path, verify)
        self.batch_tokens, self.seed, self.rank, self.world_size = int(batch_tokens), int(seed), rank, world_size
        self.static, self.balance = bool(static), bool(balance)
        self.balance_alpha, self.balance_window = float(balance_alpha), int(balance_window)
        self.epoch, self.position = int(epoch), 0  # position: batches this (rank, worker) stream has yielded
        self._chunks: list[_Chunk] | None = None
        chunks = self._open()
        lengths = [np.diff(c.ids_off) for c in chunks]
        self.chunk_start = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)
        self.row_lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        if len(self.row_lengths) != sum(s["rows"] for s in self.info.shards):
            raise ValueError(f"{self.path}: the shards hold {len(self.row_lengths)} rows, {MANIFEST} says "
                             f"{sum(s['rows'] for s in self.info.shards)}; rerun `packprep build` to repair it")
        if len(self.row_lengths) == 0:
            raise ValueError(f"{self.path} holds no rows")
        if self.row_lengths.max() > self.batch_tokens:
            raise ValueError(f"batch_tokens={batch_tokens} is smaller than the longest row "
                             f"({self.row_lengths.max()} tokens); use --batch-tokens >= the build's seq_len "
                             f"({self.info.seq_len})")
        self.row_sq = None  # per row: sum of squared document lengths (the attention term), only when balancing
        if self.balance:
            self.row_sq = np.concatenate([_square_sums(c.doc_off_off, c.doc_off) for c in chunks])
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _open(self) -> list[_Chunk]:
        if self._chunks is None:
            self._chunks = [_Chunk(b) for f in self.files for b in open_shard(f).to_batches()]
        return self._chunks

    def __getstate__(self):  # workers re-open the memory maps instead of pickling the tables
        state = dict(self.__dict__)
        state["_chunks"] = None
        return state

    @property
    def num_rows(self) -> int:
        return len(self.row_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.row_lengths.sum())

    def row_costs(self) -> np.ndarray:
        """alpha * tokens + sum of squared document lengths, per row (float64); needs `balance=True`."""
        assert self.row_sq is not None, "row costs need PackedShards(..., balance=True)"
        return self.balance_alpha * self.row_lengths + self.row_sq

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(row order, batch boundaries into it) for one epoch: the same on every rank and worker. Global batch g
        is order[bounds[g]:bounds[g + 1]] and goes to rank g % world_size."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.num_rows)
            if self.balance:
                from trainer.balance import balanced_plan

                order, bounds = balanced_plan(order, self.row_lengths, self.row_costs(), self.batch_tokens,
                                              self.world_size, self.balance_window, rng)
            else:
                bounds = budget_batches(self.row_lengths[order], self.batch_tokens)
            self._plan_cache = (epoch, order, bounds)
        return self._plan_cache[1], self._plan_cache[2]

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches each rank yields in `epoch` (all ranks the same; the tail that does not divide is dropped)."""
        return (len(self._plan(self.epoch if epoch is None else epoch)[1]) - 1) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_tokens": self.batch_tokens,
                "num_rows": self.num_rows, "static": self.static, "balance": self.balance,
                "balance_alpha": self.balance_alpha, "balance_window": self.balance_window}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, this loader reads {STATE_VERSION}; "
                             "resume with the packprep version that saved it")
        for key in ("world_size", "rank", "seed", "batch_tokens", "num_rows", "static", "balance", "balance_alpha",
                    "balance_window"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state.get(key)}, this loader has "
                                 f"{key}={getattr(self, key)}; resume with the same data, settings and ranks")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def batch(self, rows: np.ndarray) -> VarlenBatch:
        """Assemble the given global row indices into one VarlenBatch (padded by one filler document if static)."""
        chunks = self._open()
        which = np.searchsorted(self.chunk_start, rows, side="right") - 1
        tokens, masks, docs, row_off = [], [], [], [0]
        for c_idx, r in zip(which.tolist(), (rows - self.chunk_start[which]).tolist()):
            c = chunks[c_idx]
            a, b = c.ids_off[r], c.ids_off[r + 1]
            tokens.append(c.ids[a:b])
            masks.append(c.mask[c.mask_off[r]:c.mask_off[r + 1]])
            docs.append(c.doc_off[c.doc_off_off[r]:c.doc_off_off[r + 1] - 1] + row_off[-1])
            row_off.append(row_off[-1] + (b - a))
        filler = self.batch_tokens - row_off[-1] if self.static else 0
        if filler:  # one document of FILLER_TOKEN without loss: every batch is exactly batch_tokens long
            tokens.append(np.full(filler, FILLER_TOKEN, np.int32))
            masks.append(np.zeros(filler, np.uint8))
            docs.append([row_off[-1]])
            row_off.append(row_off[-1] + filler)
        docs.append([row_off[-1]])
        batch = make_varlen_batch(np.concatenate(tokens), np.concatenate(docs), np.concatenate(masks),
                                  np.asarray(row_off))
        batch.filler = filler
        return batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order, bounds = self._plan(self.epoch)
        per_rank = (len(bounds) - 1) // self.world_size
        while True:
            j = worker + self.position * num_workers  # this rank's j-th batch
            if j >= per_rank:
                break
            g = j * self.world_size + self.rank  # global batch index
            self.position += 1
            yield self.batch(order[bounds[g]:bounds[g + 1]])
        self.set_epoch(self.epoch + 1)
