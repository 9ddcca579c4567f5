"""trainer.data: batch invariants, exact epoch coverage, rank/worker sharding, O(1) resume (StatefulDataLoader too),
the manifest checks, static (filler-padded) batches and compute-balanced steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_fixtures import one_torch_thread, random_lengths, write_packed

from trainer.balance import step_imbalance, token_plan
from trainer.data import IGNORE_INDEX, BuildInfo, PackedShards, VarlenBatch, budget_batches, make_varlen_batch

SEQ = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    info = write_packed(out, random_lengths(300, SEQ, seed=1), SEQ, num_shards=3, rows_per_batch=5)
    return out, info


def row_tuples(batch: VarlenBatch) -> list[tuple]:
    ids, cu = batch.input_ids.numpy(), batch.cu_rows.numpy()
    return [tuple(ids[a:b]) for a, b in zip(cu[:-1], cu[1:])]


def expected_rows(info) -> list[tuple]:
    return [tuple(np.concatenate([info["docs"][d] for d in row]).tolist()) for row in info["rows"]]


def test_make_varlen_batch_worked_example():
    b = make_varlen_batch(np.array([5, 6, 7, 8, 9, 1, 2, 3, 4]), np.array([0, 3, 5, 9]),
                          np.array([1, 1, 1, 0, 1, 1, 1, 1, 1]), np.array([0, 5, 9]))
    assert b.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert b.labels.tolist() == [-100, 6, 7, -100, 9, -100, 2, 3, 4]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 5, 9]
    assert b.max_seqlen == 4 and b.num_docs == 3 and b.num_loss_tokens() == 6


def test_budget_batches():
    assert budget_batches(np.array([3, 4, 2, 5]), 7).tolist() == [0, 2, 4]
    lengths = np.random.default_rng(0).integers(1, 50, 1000)
    b = budget_batches(lengths, 120)
    sums = np.add.reduceat(lengths, b[:-1])
    assert (sums <= 120).all() and b[-1] == 1000
    assert (sums[:-1] + lengths[b[1:-1]] > 120).all()  # greedy: the next row would not have fit


def test_batch_invariants(shards):
    out, info = shards
    ds = PackedShards(out, batch_tokens=3 * SEQ, seed=3)
    n = 0
    for b in ds:
        n += 1
        T = b.num_tokens
        cu = b.cu_seqlens.numpy().astype(np.int64)
        lens = np.diff(cu)
        assert 0 < T <= 3 * SEQ and cu[0] == 0 and cu[-1] == T and (lens > 0).all()
        assert b.max_seqlen == lens.max()
        assert b.input_ids.dtype == b.position_ids.dtype == b.labels.dtype == torch.int64
        pos = b.position_ids.numpy()
        assert (pos[cu[:-1]] == 0).all() and (np.diff(pos)[np.diff(pos) != 1] <= 0).all()
        assert (pos == np.concatenate([np.arange(n) for n in lens])).all()
        labels = b.labels.numpy()
        assert (labels[cu[:-1]] == IGNORE_INDEX).all()  # no prediction crosses a document boundary
        keep = labels != IGNORE_INDEX
        assert (labels[keep] == b.input_ids.numpy()[keep]).all()
        assert set(b.cu_rows.tolist()) <= set(cu.tolist())  # rows end on document boundaries
    assert n == ds.num_batches() > 5


def test_labels_follow_loss_mask(shards):
    out, info = shards
    by_row = {r: i for i, r in enumerate(expected_rows(info))}
    for b in PackedShards(out, batch_tokens=2 * SEQ):
        labels, cu = b.labels.numpy(), b.cu_rows.numpy()
        for row, (a, c) in zip(row_tuples(b), zip(cu[:-1], cu[1:])):
            docs = info["rows"][by_row[row]]
            mask = np.concatenate([info["masks"][d] for d in docs]).copy()
            mask[np.cumsum([0] + [len(info["docs"][d]) for d in docs[:-1]])] = 0
            assert ((labels[a:c] != IGNORE_INDEX) == (mask == 1)).all()


def test_epoch_yields_every_row_exactly_once(shards):
    out, info = shards
    ds = PackedShards(out, batch_tokens=4 * SEQ, seed=7)
    got = [r for b in ds for r in row_tuples(b)]
    assert sorted(got) == sorted(expected_rows(info))
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["position"] == 0  # rolled over to the next epoch
    again = [r for b in PackedShards(out, batch_tokens=4 * SEQ, seed=7) for r in row_tuples(b)]
    other_epoch = [r for b in ds for r in row_tuples(b)]
    assert got == again and got != other_epoch and sorted(other_epoch) == sorted(got)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_equal_counts(shards, world):
    out, info = shards
    full = PackedShards(out, batch_tokens=2 * SEQ, seed=5)
    per_rank = [list(PackedShards(out, batch_tokens=2 * SEQ, seed=5, rank=r, world_size=world))
                for r in range(world)]
    n = len(per_rank[0])
    assert {len(p) for p in per_rank} == {n} and n == full.num_batches() // world > 0
    rows = [r for p in per_rank for b in p for r in row_tuples(b)]
    assert len(rows) == len(set(rows))  # disjoint (rows are distinct random sequences)
    # Global batch g went to rank g % world; only the last num_batches % world batches are dropped.
    full_batches = list(full)
    assert len(full_batches) - n * world < world
    for j in range(n):
        for r in range(world):
            assert row_tuples(per_rank[r][j]) == row_tuples(full_batches[j * world + r])


def test_workers_give_the_same_stream(shards):
    out, _ = shards
    ds = PackedShards(out, batch_tokens=2 * SEQ, seed=2, rank=1, world_size=2)
    ref = [row_tuples(b) for b in PackedShards(out, batch_tokens=2 * SEQ, seed=2, rank=1, world_size=2)]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert [row_tuples(b) for b in loader] == ref


def test_resume_mid_epoch_without_replay(shards):
    out, _ = shards
    ds = PackedShards(out, batch_tokens=2 * SEQ, seed=4)
    ref = [row_tuples(b) for b in PackedShards(out, batch_tokens=2 * SEQ, seed=4)]
    it = iter(ds)
    head = [row_tuples(next(it)) for _ in range(5)]
    state = ds.state_dict()
    assert state["position"] == 5 and state["version"] == 1 and state["world_size"] == 1
    assert all(isinstance(v, (int, float, bool)) for v in state.values())  # a small dict, no row lists
    fresh = PackedShards(out, batch_tokens=2 * SEQ, seed=4)
    fresh.load_state_dict(state)
    assert head + [row_tuples(b) for b in fresh] == ref
    with pytest.raises(ValueError, match="seed"):
        PackedShards(out, batch_tokens=2 * SEQ, seed=99).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size=1, this loader has world_size=2"):
        PackedShards(out, batch_tokens=2 * SEQ, seed=4, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict({**state, "version": 0})


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_through_stateful_dataloader(shards, workers):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    out, _ = shards

    def loader():
        ds = PackedShards(out, batch_tokens=2 * SEQ, seed=6)
        return sdl.StatefulDataLoader(ds, batch_size=None, num_workers=workers)

    ref = [row_tuples(b) for b in loader()]
    first = loader()
    it = iter(first)
    head = [row_tuples(next(it)) for _ in range(7)]
    state = first.state_dict()
    del it
    second = loader()
    second.load_state_dict(state)
    assert head + [row_tuples(b) for b in second] == ref


def test_errors_are_user_errors(shards, tmp_path):
    out, _ = shards
    with pytest.raises(ValueError, match="longest row"):
        PackedShards(out, batch_tokens=8)
    with pytest.raises(ValueError, match="rank"):
        PackedShards(out, batch_tokens=SEQ, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="packprep build"):
        PackedShards(tmp_path, batch_tokens=SEQ)


def test_manifest_is_required_and_checked(tmp_path):
    import json
    import shutil

    out = tmp_path / "b"
    write_packed(out, random_lengths(60, SEQ, seed=2), SEQ, num_shards=2)
    info = BuildInfo.read(out)
    assert info.seq_len == SEQ and info.vocab_size == 1000 and len(info.shards) == 2
    PackedShards(out, batch_tokens=SEQ, verify=True)  # intact: sizes and sha256 agree

    bare = tmp_path / "no_manifest"
    shutil.copytree(out, bare)
    (bare / "packprep.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished packprep build"):
        PackedShards(bare, batch_tokens=SEQ)  # state.json and shards alone are an unfinished build

    shard = out / info.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit: same size, other sha256
    shard.write_bytes(bytes(data))
    PackedShards(out, batch_tokens=SEQ)  # the size check alone cannot see it...
    with pytest.raises(ValueError, match="fails its sha256 check"):
        PackedShards(out, batch_tokens=SEQ, verify=True)  # ...the sha256 check does
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="truncated or replaced"):
        PackedShards(out, batch_tokens=SEQ)
    (out / "packprep.json").write_text(json.dumps({"seq_len": SEQ}))
    with pytest.raises(ValueError, match="malformed"):
        PackedShards(out, batch_tokens=SEQ)


def test_static_batches_end_in_one_filler_document_without_loss(shards):
    out, info = shards
    budget = 3 * SEQ
    plain = list(PackedShards(out, batch_tokens=budget, seed=1))
    static = list(PackedShards(out, batch_tokens=budget, seed=1, static=True))
    assert len(plain) == len(static) and any(b.num_tokens < budget for b in plain)
    for p, s in zip(plain, static):
        assert s.num_tokens == budget and s.filler == budget - p.num_tokens
        n = p.num_tokens
        assert torch.equal(s.input_ids[:n], p.input_ids) and torch.equal(s.labels[:n], p.labels)
        assert (s.labels[n:] == IGNORE_INDEX).all() and (s.input_ids[n:] == 0).all()
        if s.filler:  # exactly one more document and one more row, covering the residue
            assert s.cu_seqlens[:-1].tolist() == p.cu_seqlens.tolist() and s.num_docs == p.num_docs + 1
            assert s.cu_rows.tolist()[-2:] == [n, budget] and (s.position_ids[n:] == torch.arange(s.filler)).all()
            assert s.max_seqlen == max(p.max_seqlen, s.filler)
        assert s.num_loss_tokens() == p.num_loss_tokens()


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_steps_cover_every_row_once_with_equal_cost(tmp_path, world):
    """Heavy-tailed documents: balancing lowers each step's max/mean rank cost, keeps every row exactly once per
    epoch within the token budget, and is deterministic and resumable."""
    rng = np.random.default_rng(world)
    seq = 512
    lengths = np.minimum(rng.lognormal(4.0, 1.3, 3000).astype(int) + 2, seq)
    out = tmp_path / "long"
    info = write_packed(out, lengths, seq, num_shards=2, rows_per_batch=16)
    budget = 2 * seq
    kw = dict(batch_tokens=budget, seed=3, world_size=world, balance_alpha=64.0, balance_window=16)
    ds = PackedShards(out, balance=True, **kw)
    order, bounds = ds._plan(0)
    assert sorted(order.tolist()) == list(range(ds.num_rows))  # every row exactly once
    assert np.add.reduceat(ds.row_lengths[order], bounds[:-1]).max() <= budget and (np.diff(bounds) > 0).all()
    base_order = np.random.default_rng([3, 0]).permutation(ds.num_rows)
    costs = ds.row_costs()
    before = step_imbalance(base_order, token_plan(ds.row_lengths[base_order], budget), costs, world)
    after = step_imbalance(order, bounds, costs, world)
    assert after.mean() < 1.02 < before.mean()
    expected = sorted(tuple(np.concatenate([info["docs"][d] for d in r]).tolist()) for r in info["rows"])
    per_rank = [list(PackedShards(out, balance=True, rank=r, **kw)) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1
    assert sorted(r for p in per_rank for b in p for r in row_tuples(b)) == expected
    again = PackedShards(out, balance=True, rank=1, **kw)
    it = iter(again)
    head = [row_tuples(next(it)) for _ in range(3)]
    resumed = PackedShards(out, balance=True, rank=1, **kw)
    resumed.load_state_dict(again.state_dict())
    assert head + [row_tuples(b) for b in resumed] == [row_tuples(b) for b in per_rank[1]]
    with pytest.raises(ValueError, match="balance"):
        PackedShards(out, rank=1, **kw).load_state_dict(again.state_dict())


def test_pickles_without_the_corpus(shards):
    import pickle

    out, _ = shards
    ds = PackedShards(out, batch_tokens=2 * SEQ)
    next(iter(ds))
    assert len(pickle.dumps(ds)) < 20_000  # memory maps are re-opened in workers, not copied


def test_to_device_and_pin():
    b = make_varlen_batch(np.arange(1, 6), np.array([0, 2, 5]), np.ones(5), np.array([0, 5]))
    c = b.to("cpu")  # documented: tensors already on the CPU come back as they are, neither copied nor pinned
    assert c.input_ids is b.input_ids and c.max_seqlen == b.max_seqlen and not c.input_ids.is_pinned()
    if not torch.cuda.is_available():
        return
    pinned = b.pin_memory()
    assert all(t.is_pinned() for t in (pinned.input_ids, pinned.labels, pinned.cu_seqlens, pinned.cu_rows))
    g = b.to("cuda")
    torch.cuda.synchronize()
    assert all(t.device.type == "cuda" for t in (g.input_ids, g.position_ids, g.labels, g.cu_seqlens, g.cu_rows))
    assert torch.equal(g.input_ids.cpu(), b.input_ids) and g.max_seqlen == b.max_seqlen
