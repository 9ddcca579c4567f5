"""`packprep export`: every format read back by its stack's own reader, and written byte for byte as that stack's
own writer writes it, on a build of the suite's corpora (several shards, split documents, a text holding the EOS
string, prompt/response loss masks).

Readers (tests/readers/*.py) run in overlay venvs from tests/reader_envs.py (PyPI packages, installed once per
machine, in parallel): megatron-core, ai2-olmo-core, mosaicml-streaming (numpy<2.2, transformers<5: the pins that
conflict with the project's), litdata, megatron-bridge 0.3.1, llamafactory 0.9.5 (its datasets<=4 and
transformers<=5.6). Expected values come from the shards through pyarrow,
independently of packprep.exports.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
from build_fixtures import texts, write_corpora
from reader_envs import READERS, ReaderUnavailable, reader_python, run_reader

from packprep import exports
from packprep.build import build
from packprep.config import BuildConfig
from packprep.exports import export
from packprep.shards import open_shard, shard_files

EOS_TEXT = "alpha beta <|endoftext|> gamma delta"  # the builtin tokenizer's EOS string inside a document


def export_fast(*args, **kwargs) -> dict:
    """export() without fsync (slow on a busy disk, and not what these tests check); the manifest test keeps it."""
    return export(*args, fsync=False, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    files = write_corpora(d / "in", n=40)
    extra = d / "in" / "eos.jsonl"
    long = " ".join(texts(1, seed=9, lo=400, hi=401))  # longer than seq_len: split into pieces
    extra.write_text("".join(json.dumps({"text": t}) + "\n" for t in [EOS_TEXT, long, *texts(20, seed=8)]))
    out = d / "build"
    build(BuildConfig(inputs=(str(files["prompt-completion"]), str(files["chat"]), str(extra)), out=str(out),
                      seq_len=256, long_docs="split", shard_rows=15, workers=1))
    return out


@pytest.fixture(scope="module")
def expected(built, tmp_path_factory) -> dict:
    e = expected_of(built, tmp_path_factory.mktemp("expected"))
    assert len(shard_files(built)) >= 3 and json.loads((built / "packprep.json").read_text())["counts"]["split"] >= 1
    assert 0 < e["mask"].sum() < len(e["mask"])  # prompt/response masks, not all ones
    ends = np.cumsum(e["lengths"]) - 1
    inside = np.flatnonzero(e["tokens"] == e["eos_id"])
    assert len(np.setdiff1d(inside, ends)) >= 1  # some document holds EOS before its end
    return e


def expected_of(built, folder) -> dict:
    """The build's documents in shard row order, read with pyarrow, plus labels from an obvious loop; a padded
    build's documents are their real tokens (each slot cut at doc_offsets_unpadded's length)."""
    tokens, mask, lengths, row_offsets, row_docs, labels, shard_rows, slots = [], [], [], [0], [0], [], [], []
    for f in shard_files(built):
        t = open_shard(f).to_pydict()
        shard_rows.append(len(t["input_ids"]))
        for k, (ids, offs, m) in enumerate(zip(t["input_ids"], t["doc_offsets"], t["loss_mask"])):
            real = np.diff(t.get("doc_offsets_unpadded", t["doc_offsets"])[k])
            slots += np.diff(offs).tolist()
            for a, n in zip(offs[:-1], real):
                tokens += ids[a:a + n]
                mask += m[a:a + n]
                lengths.append(n)
                labels += [-100] + [ids[i] if m[i] else -100 for i in range(a + 1, a + n)]
            row_offsets.append(len(tokens))
            row_docs.append(len(lengths))
    manifest = json.loads((built / "packprep.json").read_text())
    e = {"tokens": np.array(tokens, np.int64), "mask": np.array(mask, np.uint8), "lengths": np.array(lengths),
         "row_offsets": np.array(row_offsets), "row_docs": np.array(row_docs), "labels": np.array(labels),
         "shard_rows": np.array(shard_rows), "slots": np.array(slots),
         "seq_len": manifest["seq_len"], "vocab_size": manifest["tokenizer"]["vocab_size"],
         "eos_id": manifest["tokenizer"]["eos_id"]}
    path = folder / "expected.npz"
    np.savez(path, **e)
    e["path"] = path
    return e


@pytest.fixture(scope="session")
def readers():
    """Install every reader venv once, in parallel; a reader that cannot be installed skips its tests."""
    with ThreadPoolExecutor(len(READERS)) as pool:
        futures = {name: pool.submit(reader_python, name) for name in READERS}
    failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}

    def get(name: str) -> None:
        if name in failed:
            if isinstance(failed[name], ReaderUnavailable):
                pytest.skip(f"{name} reader not installable here: {failed[name]}")
            raise failed[name]

    return get


def docs_of(tokens, mask, lengths) -> list[tuple]:
    cut = np.cumsum(lengths)[:-1]
    return sorted(zip(map(tuple, np.split(np.asarray(tokens), cut)), map(tuple, np.split(np.asarray(mask), cut))))


def test_megatron_read_by_indexed_dataset_and_bytes_match_their_builder(built, expected, readers, tmp_path):
    readers("megatron")
    manifest = export_fast(built, "megatron", tmp_path / "m")
    assert manifest["token_dtype"] == "uint16" and manifest["loss_mask"]
    run_reader("megatron", "megatron_read.py", tmp_path / "m", expected["path"], tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    n = len(expected["lengths"])
    assert r["text_values"].tolist() == expected["tokens"].tolist()
    assert r["text_lengths"].tolist() == expected["lengths"].tolist()
    assert r["text_document_indices"].tolist() == list(range(n + 1))  # one sequence per document
    assert r["loss_mask_values"].tolist() == expected["mask"].tolist()
    assert r["loss_mask_lengths"].tolist() == expected["lengths"].tolist()
    assert str(r["text_dtype"]) == "uint16" and str(r["loss_mask_dtype"]) == "uint8"
    for key in ("text", "loss_mask"):
        assert r[f"{key}_same_bin"] and r[f"{key}_same_idx"], key


def test_olmo_read_by_packed_fsl_dataset_with_explicit_boundaries(built, expected, readers, tmp_path):
    readers("olmo")
    manifest = export_fast(built, "olmo", tmp_path / "o")
    assert manifest["token_dtype"] == "uint16"
    run_reader("olmo", "olmo_read.py", tmp_path / "o", expected["path"], tmp_path / "work", tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    # OLMo-core re-packs the documents into its own instances: compare them as a set, each with its mask
    assert docs_of(r["tokens"], r["mask"], r["lengths"]) == docs_of(expected["tokens"], expected["mask"],
                                                                     expected["lengths"])
    bounds = r["metadata_bounds"]
    assert (bounds[:, 1] - bounds[:, 0]).tolist() == expected["lengths"].tolist()  # in order, part after part
    assert r["metadata_docs"] == len(expected["lengths"])
    # what OLMo-core infers from EOS instead: chat documents (no EOS appended) merge, the EOS text splits
    assert r["eos_docs"] != r["metadata_docs"]


def test_nemo_parquet_matches_their_packing_function(built, expected, readers, tmp_path):
    readers("nemo")
    manifest = export_fast(built, "nemo", tmp_path / "n")
    assert all(f.endswith(".idx.parquet") for f in manifest["files"][:-1])
    run_reader("nemo", "nemo_read.py", tmp_path / "n", expected["path"], tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    assert r["same_seq_start_id"] and r["same_documents"]
    assert int(r["rows"]) == len(expected["row_docs"]) - 1
    schema = str(r["schema"])
    assert "input_ids: list<element: int32>" in schema and "loss_mask: list<element: int8>" in schema
    meta = json.loads(str(r["metadata"]))[0]
    per_doc = expected["lengths"] - 1
    assert meta["dataset_max_seqlen"] == per_doc.max() and meta["pack_size"] == expected["seq_len"]
    assert meta["max_samples_per_bin"] == np.diff(expected["row_docs"]).max()


def test_nemo_npy_read_by_their_packed_dataset(built, expected, readers, tmp_path):
    readers("nemo")
    export_fast(built, "nemo", tmp_path / "n", container="npy")
    run_reader("nemo", "nemo_read.py", tmp_path / "n", expected["path"], tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    cut = np.cumsum(expected["lengths"])[:-1]
    docs, masks = np.split(expected["tokens"], cut), np.split(expected["mask"], cut)
    inputs = np.concatenate([d[:-1] for d in docs])
    assert r["tokens"].tolist() == inputs.tolist()
    assert r["labels"].tolist() == np.concatenate([d[1:] for d in docs]).tolist()
    # their loss mask: the label's mask; their collate also zeroes positions whose input is EOS
    want = np.concatenate([m[1:] for m in masks]) * (inputs != expected["eos_id"])
    assert r["loss_mask"].tolist() == want.tolist()
    rows = [expected["lengths"][a:b] - 1 for a, b in zip(expected["row_docs"][:-1], expected["row_docs"][1:])]
    assert r["cu_seqlens"].tolist() == np.concatenate([np.concatenate([[0], np.cumsum(x)]) for x in rows]).tolist()


@pytest.mark.parametrize("fmt", ["mds", "litdata"])
def test_row_formats_read_by_streaming_dataset_and_bytes_match_their_writer(fmt, built, expected, readers, tmp_path):
    readers(fmt)
    export_fast(built, fmt, tmp_path / fmt)
    run_reader(fmt, f"{fmt}_read.py", tmp_path / fmt, expected["path"], tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    rows = len(expected["row_docs"]) - 1
    assert r["input_ids"].tolist() == expected["tokens"].tolist()
    assert r["labels"].tolist() == expected["labels"].tolist()
    assert r["loss_mask"].tolist() == expected["mask"].tolist()
    assert r["input_ids_counts"].tolist() == np.diff(expected["row_offsets"]).tolist()
    offsets = np.split(r["doc_offsets"], np.cumsum(r["doc_offsets_counts"])[:-1])
    assert len(offsets) == rows
    assert np.concatenate([np.diff(o) for o in offsets]).tolist() == expected["lengths"].tolist()
    assert str(r["input_ids_dtype"]) == "int32" and str(r["loss_mask_dtype"]) == "uint8"
    # byte for byte what their writer makes of each source shard's rows
    same = "same_shards" if fmt == "mds" else "same_chunks"
    assert r["same_index"] and r[same]


def test_llamafactory_loaded_by_tokenized_path_and_collated_per_document(built, expected, readers, tmp_path):
    """LLaMA-Factory's own get_dataset(tokenized_path) and SFT collator (neat_packing): rows as packed, no attention
    across documents (sdpa's 4D mask, flash-attention's cu_seqlens from position_ids), packprep's labels; the build
    folder given as tokenized_path directly fails in that collator."""
    readers("llamafactory")
    from packprep.exports.llamafactory import COLUMNS
    from packprep.tokenizer import BUILTIN

    export_fast(built, "llamafactory", tmp_path / "lf")
    run_reader("llamafactory", "llamafactory_read.py", tmp_path / "lf", BUILTIN, built, tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    assert "doc_offsets" in str(r["raw_error"])  # the build folder itself is no tokenized_path: why the export exists
    seq_len, rows = expected["seq_len"], len(expected["row_docs"]) - 1
    assert int(r["rows"]) == rows and sorted(r["columns"].tolist()) == sorted(COLUMNS)
    assert r["input_ids"].shape == (rows, seq_len) and bool(r["mask_none"])
    cu = np.split(r["cu"], np.cumsum(r["cu_counts"])[:-1])
    for i in range(rows):
        a, b = expected["row_offsets"][i], expected["row_offsets"][i + 1]
        n = b - a
        assert r["input_ids"][i, :n].tolist() == expected["tokens"][a:b].tolist()
        assert r["labels"][i].tolist() == expected["labels"][a:b].tolist() + [-100] * (seq_len - n)
        ends = np.cumsum(expected["lengths"][expected["row_docs"][i]:expected["row_docs"][i + 1]])
        assert cu[i].tolist() == [0, *ends.tolist()] and r["kept"][i] == n  # flash-attention: padding cut
        doc = np.full(seq_len, -1)
        for d, (s, e) in enumerate(zip([0, *ends[:-1]], ends)):
            doc[s:e] = d
        want = (doc[:, None] == doc[None, :]) & (doc[None, :] >= 0) & np.tri(seq_len, dtype=bool)
        assert np.array_equal(r["allowed"][i], want), f"row {i}: 4D mask is not block-diagonal causal"


def shifted_rows(expected) -> list[tuple]:
    """(input_ids, labels, positions) per row in torchtitan's convention, from the obvious loops: the row shifted by
    one, positions restarting at each document."""
    out = []
    for r in range(len(expected["row_docs"]) - 1):
        a, b = expected["row_offsets"][r], expected["row_offsets"][r + 1]
        lengths = expected["lengths"][expected["row_docs"][r]:expected["row_docs"][r + 1]]
        positions = [i for n in lengths for i in range(n)]
        out.append((expected["tokens"][a:b - 1].tolist(), expected["labels"][a + 1:b].tolist(), positions[:-1]))
    return out


def test_shifted_rows_contract(built, expected):
    from packprep.integrations.rows import ShiftedRows

    rows = ShiftedRows(str(built))
    want = shifted_rows(expected)
    assert len(rows) == len(want) and rows.seq_len == expected["seq_len"]
    for i in (0, 1, len(want) // 2, len(want) - 1, -1):
        r = rows[i]
        assert (r["input_ids"].tolist(), r["labels"].tolist(), r["positions"].tolist()) == want[i]
    with pytest.raises(IndexError, match="of a build of"):
        rows[len(want)]
    docs = sum(int((rows[i]["positions"] == 0).sum()) for i in range(len(rows)))
    # every document starts at a 0 except one-token documents that end a row (their only token has no target)
    assert docs <= len(expected["lengths"]) and docs >= len(expected["lengths"]) - len(rows)


def test_torchtitan_loader_reads_rows_with_packprep_boundaries(built, expected, readers, tmp_path):
    """torchtitan 0.3's loader machinery (ParallelAwareDataloader, built as its trainer builds config.dataloader) with
    packprep's dataset: one packed row per sample as packed, positions restarting at packprep's document offsets
    (EOS inside a text does not split it), the documents its varlen and flex attention find, and a resume from its
    state dict with 0 and 2 workers, and two data-parallel ranks."""
    readers("torchtitan")
    seq_len = int(expected["seq_len"])
    run_reader("torchtitan", "torchtitan_read.py", built, seq_len, tmp_path / "r.npz")
    r = np.load(tmp_path / "r.npz")
    rows = shifted_rows(expected)
    assert len(r["inputs"]) == len(rows)
    padded = []
    for i, (ids, labels, pos) in enumerate(rows):
        pad = seq_len - len(ids)
        padded.append(pos + list(range(pad)))
        assert r["inputs"][i].tolist() == ids + [0] * pad
        assert r["labels"][i].tolist() == labels + [-100] * pad
        assert r["positions"][i].tolist() == padded[-1]
        doc = np.cumsum(np.array(padded[-1]) == 0)
        assert np.array_equal(r["same_doc"][i], doc[:, None] == doc[None, :])  # its flex document mask
    cu = np.split(r["cu"], np.cumsum(r["cu_counts"])[:-1])
    for k, batch in enumerate(cu):  # its varlen metadata: cu_seqlens over the batch's flattened rows
        part = padded[2 * k:2 * k + 2]
        want = [j * seq_len + i for j, pos in enumerate(part) for i, p in enumerate(pos) if p == 0]
        assert batch.tolist() == want + [len(part) * seq_len]
    assert bool(r["resume_same_0"]) and bool(r["resume_same_2"])
    # two ranks: the same number of rows each (the odd one out is left out), disjoint, all from this epoch's rows
    seen = [set(map(bytes, r[f"rank{k}"])) for k in range(2)]
    assert len(r["rank0"]) == len(r["rank1"]) == len(rows) // 2 and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(map(bytes, r["inputs"]))


def test_labels_and_target_aligned_mask():
    # documents [3, 2]: tokens 5 6 7 | 8 9, mask 0 1 1 | 1 1
    rows = exports.Rows(np.array([5, 6, 7, 8, 9], np.int32), np.array([0, 1, 1, 1, 1], np.uint8),
                        np.array([0, 5]), np.array([3, 2], np.int32), np.array([0, 2]))
    assert rows.labels().tolist() == [-100, 6, 7, -100, 9]
    from packprep.exports.nemo import seq_start_ids, target_aligned

    assert target_aligned(rows).tolist() == [1, 1, 0, 1, 0]
    assert seq_start_ids(rows).tolist() == [0, 3]


@pytest.mark.parametrize("fmt", ["megatron", "olmo", "nemo", "mds", "litdata", "llamafactory"])
def test_interrupted_export_resumes_to_the_same_bytes(fmt, built, tmp_path, monkeypatch):
    clean = export_fast(built, fmt, tmp_path / "clean")
    mod = exports.writer(fmt)
    real, calls = mod.write_part, []

    def crash_on_third(index, batches, out, state, info):
        calls.append(index)
        if index == 2:
            next(batches)  # part of the shard is read (megatron: some bytes appended), then the process dies
            if fmt == "megatron":
                with open(out / exports.WORK / "text.bin.partial", "ab") as f:
                    f.write(b"\x01\x02\x03")
            (out / "half.tmp123").write_bytes(b"x")
            raise KeyboardInterrupt
        return real(index, batches, out, state, info)

    monkeypatch.setattr(mod, "write_part", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        export_fast(built, fmt, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / exports.MANIFEST).exists()
    monkeypatch.setattr(mod, "write_part", real)
    lines = []
    resumed = export_fast(built, fmt, tmp_path / "resumed", echo=lines.append)
    assert lines[0].startswith("resuming: 2 of")
    assert sorted(resumed["files"]) == sorted(clean["files"])
    for name in clean["files"]:
        if name == "index.json" and fmt == "litdata":  # holds a timestamp
            continue
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted([*clean["files"], exports.MANIFEST])


def test_manifest_rerun_refusal_and_overwrite(built, tmp_path):
    m = export(built, "olmo", tmp_path / "o")
    build_manifest = json.loads((built / "packprep.json").read_text())
    assert m["build_fingerprint"] == build_manifest["fingerprint"] and m["format"] == "olmo"
    assert m["format_version"] == 1 and m["counts"]["tokens"] == build_manifest["counts"]["tokens"]
    assert json.loads((tmp_path / "o" / exports.MANIFEST).read_text()) == m
    lines = []
    assert export(built, "olmo", tmp_path / "o", echo=lines.append) == m and "already holds" in lines[0]
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(built, "megatron", tmp_path / "o")
    assert export(built, "megatron", tmp_path / "o", overwrite=True)["format"] == "megatron"
    assert not list((tmp_path / "o").glob("token_ids_part_*"))  # the other export is gone
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export(built, "mds", tmp_path / "other")


def test_user_errors(built, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'parquet'; choose one of: megatron"):
        export(built, "parquet", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a finished packprep build"):
        export(tmp_path, "mds", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown nemo container"):
        export(built, "nemo", tmp_path / "x", container="json")


def test_by_size_closes_groups_like_the_stack_writers():
    items = [b"a" * n for n in (4, 4, 4, 12, 1)]
    assert [[len(x) for x in g] for g in exports.by_size(items, 10)] == [[4, 4], [4], [12], [1]]
    assert [[len(x) for x in g] for g in exports.by_size(items, 10, base=1, overhead=1)] == [[4], [4], [4], [12], [1]]


def test_token_dtypes_follow_each_stack():
    from packprep.exports import megatron, olmo

    assert megatron.token_dtype(65499) == np.uint16 and megatron.token_dtype(65500) == np.int32
    assert olmo.token_dtype(65536) == np.uint16 and olmo.token_dtype(151_936) == np.uint32


def test_rows_are_zero_copy_views_of_the_shard(built):
    list_array = pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32())).slice(1)
    values, offsets = exports._flat(list_array)
    assert values.tolist() == [4, 5] and offsets.tolist() == [0, 2]
    assert np.shares_memory(values, np.frombuffer(list_array.values.buffers()[1], np.int32))
    shard = shard_files(built)[0]
    assert sum(len(r.row_offsets) - 1 for r in exports.iter_rows(shard)) == open_shard(shard).num_rows


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_append_copies_shard_ranges_or_writes(built, expected, tmp_path, monkeypatch, kernel_copy):
    """megatron/olmo output bytes through `append`: file ranges of the shard handed to copy_file_range, or (another
    filesystem) plain writes; both give the shard's own bytes. int32 ids (a vocabulary >= 65,500) are ranges too."""
    import os

    from packprep.exports import megatron

    calls = []
    real = os.copy_file_range

    def copy_range(*args):
        calls.append(args[2])
        if not kernel_copy:
            raise OSError(18, "Invalid cross-device link")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", copy_range)
    monkeypatch.setattr(megatron, "token_dtype", lambda vocab_size: np.dtype(np.int32))
    export_fast(built, "megatron", tmp_path / "m")
    ids = np.fromfile(tmp_path / "m" / "packprep_text_document.bin", np.int32)
    mask = np.fromfile(tmp_path / "m" / "packprep_loss_mask_document.bin", np.uint8)
    assert ids.tolist() == expected["tokens"].tolist() and mask.tolist() == expected["mask"].tolist()
    assert sum(calls) >= ids.nbytes + mask.nbytes  # every byte was offered to the kernel copy first


def test_cli_export(built, tmp_path):
    from typer.testing import CliRunner

    from packprep.cli import app

    result = CliRunner().invoke(app, ["export", str(built), "--to", "olmo", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / exports.MANIFEST).exists()
    result = CliRunner().invoke(app, ["export", str(built), "--to", "bogus", "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "unknown export format 'bogus'" in result.output
    assert "Traceback" not in result.output
