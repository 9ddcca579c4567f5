"""packprep.pack and packprep.stats: invariants for every strategy, exact agreement with tests/reference.py,
edge cases and error messages. Also run with NUMBA_DISABLE_JIT=1 in CI, so inputs stay small."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packprep.pack import STRATEGIES, Plan, offsets_dtype, pack
from packprep.stats import lower_bound_rows, plan_stats

sys.path.insert(0, str(Path(__file__).parent))
import reference  # noqa: E402

pack_module = sys.modules["packprep.pack"]  # the module (packprep.pack the attribute may be the function)

REAL_LENGTHS = Path(__file__).parents[1] / "benchmarks" / "data" / "sft_lengths_qwen.npy"
REFERENCES = {
    "ffd": reference.ffd_rows,
    "bfd": reference.bfd_rows,
    "greedy": reference.greedy_rows,
    "none": reference.none_rows,
    "b2f": reference.b2f_rows,
    "random": lambda lengths, seq_len: reference.random_rows(lengths, seq_len, seed=0),
}


@st.composite
def packing_inputs(draw, max_docs=40):
    seq_len = draw(st.integers(1, 64))
    lengths = draw(st.lists(st.integers(1, seq_len), min_size=1, max_size=max_docs))
    return lengths, seq_len


def check_invariants(plan: Plan, lengths, seq_len):
    """Every token of every document in exactly one piece, no row over seq_len, no empty row, int32 arrays."""
    for name in ("row_offsets", "doc", "start", "length"):
        assert getattr(plan, name).dtype == np.int32, name
        assert getattr(plan, name).ndim == 1, name
    offsets = plan.row_offsets
    assert offsets[0] == 0 and offsets[-1] == plan.num_pieces
    assert np.all(np.diff(offsets) >= 1), "empty row"
    assert np.all(plan.length >= 1)
    assert plan.row_tokens().tolist() == [int(plan.length[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert plan.row_tokens().max(initial=0) <= seq_len
    covered = {}
    for d, s, n in zip(plan.doc.tolist(), plan.start.tolist(), plan.length.tolist()):
        covered.setdefault(d, []).append((s, n))
    assert sorted(covered) == list(range(len(lengths)))
    for d, pieces in covered.items():
        position = 0
        for s, n in sorted(pieces):
            assert s == position, f"doc {d}: gap or overlap at token {position}"
            position += n
        assert position == lengths[d]
    assert plan.num_rows >= lower_bound_rows(sum(lengths), seq_len)
    assert plan.num_docs == len(lengths)


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=40, deadline=None)
@given(inputs=packing_inputs())
def test_invariants_and_reference(strategy, inputs):
    lengths, seq_len = inputs
    plan = pack(np.array(lengths), seq_len=seq_len, strategy=strategy)
    check_invariants(plan, lengths, seq_len)
    assert reference.plan_rows(plan) == REFERENCES[strategy](lengths, seq_len)
    again = pack(lengths, seq_len=seq_len, strategy=strategy)  # a list works too; same plan
    assert reference.plan_rows(again) == reference.plan_rows(plan)


@settings(max_examples=40, deadline=None)
@given(inputs=packing_inputs(max_docs=30), seed=st.integers(0, 2**32))
def test_random_is_seeded(inputs, seed):
    lengths, seq_len = inputs
    plan = pack(lengths, seq_len=seq_len, strategy="random", seed=seed)
    check_invariants(plan, lengths, seq_len)
    assert plan.num_rows == lower_bound_rows(sum(lengths), seq_len)  # only the last row may be short
    assert reference.plan_rows(plan) == reference.random_rows(lengths, seq_len, seed)


def test_random_seed_changes_order():
    lengths = np.arange(1, 41)
    a, b = (pack(lengths, 64, "random", seed=s) for s in (0, 1))
    assert not np.array_equal(a.doc, b.doc)
    assert np.array_equal(a.doc, pack(lengths, 64, "random", seed=0).doc)


def test_greedy_closes_row_at_first_misfit():
    # sorted: 6 5 3 2 2 (seq_len 8): [6] closes at 5 (6+5>8); [5, 3]; [2, 2]. FFD instead: [6, 2], [5, 3], [2].
    lengths = [3, 6, 2, 5, 2]
    assert reference.plan_rows(pack(lengths, 8, "greedy")) == [[(1, 0, 6)], [(3, 0, 5), (0, 0, 3)],
                                                                [(2, 0, 2), (4, 0, 2)]]
    assert reference.plan_rows(pack(lengths, 8, "ffd")) == [[(1, 0, 6), (2, 0, 2)], [(3, 0, 5), (0, 0, 3)],
                                                             [(4, 0, 2)]]


def test_bfd_prefers_tightest_row_then_oldest():
    # seq_len 10, sorted 7 6 3 3 2 -> rows free 3, 4; the 3 goes to row 0 (free 3, tightest), the next 3 to row 1
    # (free 4 -> 1); the 2 finds no row with >= 2 free -> new row.
    plan = pack([3, 7, 2, 6, 3], 10, "bfd")
    assert reference.plan_rows(plan) == [[(1, 0, 7), (0, 0, 3)], [(3, 0, 6), (4, 0, 3)], [(2, 0, 2)]]
    # equal free space: the row that reached it first wins (FIFO, as TRL's deque)
    plan = pack([6, 6, 6, 2, 2], 8, "bfd")
    assert reference.plan_rows(plan) == [[(0, 0, 6), (3, 0, 2)], [(1, 0, 6), (4, 0, 2)], [(2, 0, 6)]]


@pytest.mark.parametrize("strategy", ["ffd", "bfd"])
def test_many_rows_grow_the_trees(strategy):
    # 2,500 rows opened by docs of 3 (seq_len 4), then 2,500 docs of 1 close them in order (trees grow twice)
    lengths = np.array([3] * 2500 + [1] * 2500)
    plan = pack(lengths, 4, strategy)
    assert plan.num_rows == 2500
    expected = np.stack([np.arange(2500), np.arange(2500, 5000)], axis=1).ravel()
    assert np.array_equal(plan.doc, expected)
    check_invariants(plan, lengths.tolist(), 4)


@pytest.mark.parametrize("strategy", ["ffd", "bfd", "b2f"])
def test_real_sft_mix_near_lower_bound(strategy):
    lengths = np.load(REAL_LENGTHS)
    for seq_len in (1024, 4096):
        plan = pack(lengths, seq_len, strategy)
        check_invariants(plan, lengths, seq_len)  # thousands of rows: the kernels' growth paths, not toy sizes
        stats = plan_stats(plan, seq_len)
        assert stats["lower_bound"] > 100  # guards against passing vacuously
        assert stats["rows"] <= stats["lower_bound"] * 1.0002 + 1


def test_b2f_reaches_lower_bound_where_ffd_does_not():
    lengths = np.random.default_rng(0).choice(np.load(REAL_LENGTHS), 50_000)  # a larger real mix
    plans = {s: pack(lengths, 1024, s) for s in ("ffd", "b2f")}
    check_invariants(plans["b2f"], lengths, 1024)
    ffd, b2f = (plan_stats(plans[s], 1024) for s in ("ffd", "b2f"))
    assert b2f["rows"] <= b2f["lower_bound"] * 1.0002 + 1 < ffd["rows"]


def test_b2f_repairs_a_row():
    # seq_len 9, sorted 5 3 3 3 2 2: ffd [5, 3] (1 free) [3, 3, 2] [2] = 3 rows; b2f puts the 3 back for 2 + 2
    lengths = [5, 3, 3, 3, 2, 2]
    assert pack(lengths, 9, "ffd").num_rows == 3
    assert reference.plan_rows(pack(lengths, 9, "b2f")) == [[(0, 0, 5), (4, 0, 2), (5, 0, 2)],
                                                             [(1, 0, 3), (2, 0, 3), (3, 0, 3)]]


def test_offsets_dtype_switches_to_int64_past_int32():
    assert offsets_dtype(0) is np.int32
    assert offsets_dtype(2**31 - 1) is np.int32  # the largest piece index that int32 offsets can end at
    assert offsets_dtype(2**31) is np.int64
    assert offsets_dtype(5 * 2**31) is np.int64


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_int64_offsets_give_the_same_plan(strategy, monkeypatch):
    # what a plan of > 2^31 pieces gets, forced on a small one: the kernels write either dtype alike
    lengths = np.random.default_rng(3).integers(1, 100, 2000)
    expected = reference.plan_rows(pack(lengths, 128, strategy))
    monkeypatch.setattr(pack_module, "offsets_dtype", lambda num_pieces: np.int64)
    plan = pack(lengths, 128, strategy)
    assert plan.row_offsets.dtype == np.int64
    assert reference.plan_rows(plan) == expected


@pytest.mark.parametrize("strategy", ["ffd", "bfd", "greedy", "b2f", "none"])
def test_uncut_plans_share_one_zero_for_start(strategy):
    plan = pack(np.full(1000, 7), 64, strategy)
    assert plan.start.dtype == np.int32 and plan.start.shape == (1000,) and plan.start.strides == (0,)
    assert not plan.start.any() and not plan.start.flags.writeable


def test_plan_does_not_alias_the_input():
    lengths = np.array([5, 3, 4, 2], np.int32)
    for strategy in STRATEGIES:
        plan = pack(lengths, 8, strategy)
        assert not any(np.shares_memory(lengths, a) for a in (plan.row_offsets, plan.doc, plan.start, plan.length))


def test_huge_seq_len_uses_argsort_same_plan():
    lengths = [5, 900_000, 5, 300_000, 700_000, 1]
    for strategy in ("ffd", "bfd", "greedy", "b2f"):
        plan = pack(lengths, 1_000_000, strategy)
        assert reference.plan_rows(plan) == REFERENCES[strategy](lengths, 1_000_000)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_edge_cases(strategy):
    one = pack([7], 10, strategy)
    assert reference.plan_rows(one) == [[(0, 0, 7)]]
    full = pack([10] * 5, 10, strategy)
    assert full.num_rows == 5 and np.all(full.row_tokens() == 10)
    ones = pack(np.ones(25, np.int32), 10, strategy)
    assert ones.num_rows == (25 if strategy == "none" else 3)
    unit = pack([1, 1, 1], 1, strategy)
    assert unit.num_rows == 3 and np.all(unit.length == 1)
    empty = pack(np.zeros(0, np.int64), 10, strategy)
    assert empty.num_rows == 0 and empty.num_pieces == 0 and list(empty.row_offsets) == [0]
    assert plan_stats(empty, 10)["rows"] == 0


@pytest.mark.parametrize("dtype", [np.int8, np.uint16, np.int32, np.int64, np.uint64])
def test_integer_dtypes_accepted(dtype):
    assert pack(np.array([3, 4, 5], dtype), 8).num_rows == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lengths": [1.0, 2.0]}, "lengths must be integers, got dtype float64 (use lengths.astype"),
        ({"lengths": np.array([True])}, "lengths must be integers, got dtype bool"),
        ({"lengths": ["3"]}, "lengths must be integers, got dtype <U1"),
        ({"lengths": [[1, 2]]}, "lengths must be a 1-D array of token counts, got an array of shape (1, 2)"),
        ({"lengths": [4, 0, -1]}, "2 documents have length <= 0 (first: index 1, length 0); every document"),
        (
            {"lengths": [5, 9, 8, 11], "seq_len": 8},
            "2 documents exceed seq_len=8 (first: index 1, length 9); use --long-docs split|truncate|drop",
        ),
        ({"seq_len": 0}, "seq_len must be between 1 and 2147483647, got 0"),
        ({"seq_len": 4.0}, "seq_len must be an integer, got 4.0"),
        ({"seq_len": True}, "seq_len must be an integer, got True"),
        ({"strategy": "fdd"}, "unknown strategy 'fdd'; choose one of: ffd, bfd, greedy, random, none, b2f"),
        ({"strategy": "random", "seed": 0.5}, "seed must be an integer, got 0.5"),
    ],
)
def test_errors(kwargs, message):
    args = {"lengths": [1, 2], "seq_len": 8, **kwargs}
    with pytest.raises(ValueError) as excinfo:
        pack(**args)
    assert message in str(excinfo.value)


def test_plan_stats_hand_example():
    plan = pack([3, 3, 3, 3], 6, "ffd")
    stats = plan_stats(plan, 6)
    assert json.loads(json.dumps(stats)) == stats
    assert stats == {
        "strategy": "ffd", "seq_len": 6, "docs": 4, "pieces": 4, "split_docs": 0, "rows": 2, "tokens": 12,
        "efficiency": 1.0, "lower_bound": 2, "rows_over_lb": 1.0, "docs_per_row_mean": 2.0, "docs_per_row_max": 2,
        "max_row_tokens": 6, "padding_tokens": 0, "padded_rows": 4, "padding_tokens_saved": 12, "rows_saved": 2,
        "steps_reduction": 2.0,
    }


def test_plan_stats_random_split_and_greedy_waste():
    lengths = [5, 5, 5]
    rnd = plan_stats(pack(lengths, 8, "random"), 8)
    assert (rnd["rows"], rnd["docs"], rnd["pieces"], rnd["split_docs"]) == (2, 3, 4, 1)
    greedy = plan_stats(pack(lengths, 8, "greedy"), 8)
    assert greedy["rows"] == 3 and greedy["efficiency"] == pytest.approx(15 / 24)
    assert greedy["steps_reduction"] == 1.0 and greedy["padding_tokens_saved"] == 0


def test_plan_helpers():
    plan = pack([3, 6, 2, 5, 2], 8, "ffd")
    assert plan.doc[plan.row(0)].tolist() == [1, 2]
    assert plan.row_tokens().tolist() == [8, 8, 2]
    assert "rows=3" in repr(plan) and plan.num_tokens == 18



MEMORY_CHILD = """
import sys
from pathlib import Path
import numpy as np
from packprep.pack import pack

def kib(field):
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

lengths = np.random.default_rng(0).choice(np.load(sys.argv[1]), 4_000_000).astype(np.int32)
pack(lengths[:1000], 4096, sys.argv[2])  # JIT cache load
before = kib("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
plan = pack(lengths, 4096, sys.argv[2])
print((kib("VmHWM:") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc RSS high-water marks")
@pytest.mark.parametrize("strategy", ["ffd", "bfd"])  # the two ways to slots: fill_rows, rows_to_slots
def test_peak_memory_beside_the_lengths_is_8_bytes_per_document(strategy):
    # 4M real-mix documents at 4096 (26 a row) in a fresh process: slots + doc (the slots become `length`) + rows;
    # with int64 plans and an order array it was ~24 bytes/document
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}  # measured with the compiled kernels
    extra = int(subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(REAL_LENGTHS), strategy], check=True,
                               capture_output=True, text=True, env=env).stdout)
    assert extra <= 8.5 * 4_000_000 + 8 * 2**20, f"{strategy}: {extra / 4e6:.1f} bytes/document beside the lengths"
