"""packprep build end to end on generated corpora: every format, loss masks, EOS, long-doc policies, shards that
datasets opens, determinism across --workers, the no-argument default build and the CLI's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from build_fixtures import read_docs, texts

from packprep.build import build
from packprep.config import BuildConfig, merge
from packprep.shards import shard_files
from packprep.tokenizer import BUILTIN, Tokenizer
from packprep.verify import verify

TOK = Tokenizer(BUILTIN)
EOS = TOK.eos_id


def run(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("seq_len", 1024)
    return build(BuildConfig(inputs=tuple(map(str, inputs)), out=str(out), **kw)).manifest


@pytest.mark.parametrize("fmt", ["text", "prompt-completion", "qa", "chat", "sharegpt", "alpaca", "hf"])
def test_every_format_builds_verifies_and_loads(corpora, tmp_path, fmt):
    from datasets import load_from_disk

    m = run([corpora[fmt]], tmp_path / "out")
    want = {"qa": "prompt-completion", "hf": "text"}.get(fmt, fmt)
    assert [f["format"] for f in m["inputs"]["files"]] == [want] * len(m["inputs"]["files"])
    assert m["counts"]["input_docs"] == 40 and m["counts"]["packed"] == 40
    assert verify(tmp_path / "out").ok, verify(tmp_path / "out").failures
    ds = load_from_disk(str(tmp_path / "out"))
    assert ds.column_names == ["input_ids", "doc_offsets", "seq_lengths", "loss_mask", "doc_ids", "labels"]
    assert len(ds) == m["counts"]["rows"]
    assert sum(len(r) for r in ds["input_ids"]) == m["counts"]["tokens"]
    docs = read_docs(tmp_path / "out")
    assert sorted(docs) == list(range(40))
    if fmt not in ("chat", "sharegpt"):  # chats end as their template ends them (nothing appended)
        assert all(pieces[-1][0][-1] == EOS for pieces in docs.values())  # EOS ends every document


def test_text_tokens_and_mask(corpora, tmp_path):
    run([corpora["text"]], tmp_path / "out")
    docs = read_docs(tmp_path / "out")
    for i, text in enumerate(texts(40, 1)):
        (ids, mask), = docs[i]
        assert ids.tolist() == TOK.rust.encode(text, add_special_tokens=False).ids + [EOS]
        assert mask.all()


@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_long_doc_policies(tmp_path, policy):
    long_texts = texts(30, 7, lo=2, hi=12) + texts(5, 8, lo=150, hi=250)  # the last 5 exceed seq_len=64
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in long_texts))
    m = run([src], tmp_path / "out", seq_len=64, long_docs=policy)
    c = m["counts"]
    full = [TOK.rust.encode(t, add_special_tokens=False).ids + [EOS] for t in long_texts]
    n_long = sum(len(f) > 64 for f in full)
    assert n_long == 5 and c["input_docs"] == 35 and c["packed"] == 30
    assert (c["truncated"], c["split"], c["dropped"]["too_long"]) == {
        "truncate": (5, 0, 0), "split": (0, 5, 0), "drop": (0, 0, 5)}[policy]
    assert verify(tmp_path / "out").ok
    docs = read_docs(tmp_path / "out")
    for d, f in enumerate(full):
        if len(f) <= 64:
            assert np.concatenate([p[0] for p in docs[d]]).tolist() == f
        elif policy == "truncate":
            assert [p[0].tolist() for p in docs[d]] == [f[:64]]
        elif policy == "split":
            sizes = sorted(len(p[0]) for p in docs[d])  # all pieces but one are full
            assert sizes[1:] == [64] * (len(sizes) - 1) and sum(sizes) == len(f) and len(sizes) == -(-len(f) // 64)
        else:
            assert d not in docs
    assert all(len(r) <= 64 for f in shard_files(tmp_path / "out") for r in _rows(f))


def _rows(path):
    from packprep.shards import open_shard

    return open_shard(path).column("input_ids").to_pylist()


def test_empty_documents_are_dropped_and_counted(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "alpha"}\n{"text": ""}\n{"text": "beta"}\n')
    m = run([src], tmp_path / "out")
    assert m["counts"]["dropped"]["empty"] == 1 and m["counts"]["packed"] == 2
    assert sorted(read_docs(tmp_path / "out")) == [0, 2]  # doc ids keep the input's numbering
    assert verify(tmp_path / "out").ok


def test_bytes_identical_across_workers_and_chunking(corpora, tmp_path):
    inputs = [corpora["text"], corpora["chat"], corpora["prompt-completion"], corpora["hf"]]
    a = run(inputs, tmp_path / "a", workers=1, shard_rows=3)
    b = run(inputs, tmp_path / "b", workers=2, shard_rows=3, chunk_bytes=512)  # many tasks, 2 processes
    assert len(a["shards"]) > 1 and a["shards"] == b["shards"] and a["counts"] == b["counts"]
    for fa, fb in zip(shard_files(tmp_path / "a"), shard_files(tmp_path / "b")):
        assert fa.read_bytes() == fb.read_bytes()
    assert not (tmp_path / "a" / ".packprep-work").exists()  # the spool is removed at the end


def test_shuffle_and_seed(corpora, tmp_path):
    a = run([corpora["text"]], tmp_path / "a", shard_rows=2, seq_len=64)
    b = run([corpora["text"]], tmp_path / "b", shard_rows=2, seq_len=64, shuffle=False)
    c = run([corpora["text"]], tmp_path / "c", shard_rows=2, seq_len=64, seed=1)
    assert a["counts"] == b["counts"] == c["counts"]
    assert a["fingerprint"] != b["fingerprint"] and a["fingerprint"] != c["fingerprint"]
    rows = {k: [tuple(r) for f in shard_files(tmp_path / k) for r in _rows(f)] for k in "abc"}
    assert sorted(rows["a"]) == sorted(rows["b"]) == sorted(rows["c"])  # the same rows ...
    assert rows["a"] != rows["b"] and rows["a"] != rows["c"]  # ... in a seeded order


def test_rerun_same_config_is_a_no_op_and_other_config_is_refused(corpora, tmp_path):
    out = tmp_path / "out"
    m = run([corpora["text"]], out)
    r = build(BuildConfig(inputs=(str(corpora["text"]),), out=str(out), workers=2, seq_len=1024))
    assert r.already_built and r.manifest == m
    with pytest.raises(FileExistsError, match="seq_len: 1024 -> 128"):
        run([corpora["text"]], out, seq_len=128)
    m2 = run([corpora["text"]], out, seq_len=128, overwrite=True)
    assert m2["seq_len"] == 128 and verify(out).ok


def test_config_file_and_flags_win(tmp_path):
    (tmp_path / "c.toml").write_text('seq-len = 512\nstrategy = "bfd"\ninputs = ["x.jsonl"]\n')
    (tmp_path / "c.yaml").write_text("seq_len: 512\nstrategy: bfd\n")
    for name in ("c.toml", "c.yaml"):
        cfg = merge(tmp_path / name, strategy="greedy", seed=None)
        assert (cfg.seq_len, cfg.strategy) == (512, "greedy")
    (tmp_path / "bad.toml").write_text("sequence_length = 3\n")
    with pytest.raises(ValueError, match="unknown setting"):
        merge(tmp_path / "bad.toml")


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="session")
def default_build(tmp_path_factory, cli):
    """`packprep build` with no arguments, in an empty folder (the embedded default corpus and tokenizer)."""
    import os

    cwd = tmp_path_factory.mktemp("default")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = cli("build", "--workers", 2)
    finally:
        os.chdir(old)
    return cwd / "packprep_out", result


def test_default_build_no_arguments(default_build, cli):
    out, result = default_build
    assert result.exit_code == 0, result.output
    assert "packprep verify packprep_out" in result.output and "packprep train packprep_out" in result.output
    m = json.loads((out / "packprep.json").read_text())
    assert m["counts"]["input_docs"] > 5000 and m["packing"]["rows_over_lb"] <= 1.0002 + 1 / m["counts"]["rows"]
    assert m["tokenizer"]["name"] == "builtin" and len(m["tokenizer"]["sha256"]) == 64
    r = cli("verify", out)
    assert r.exit_code == 0 and "all" in r.output


def test_inspect_and_plot(default_build, tmp_path, cli):
    out, _ = default_build
    r = cli("inspect", out, "--plot", tmp_path / "r.png")
    assert r.exit_code == 0, r.output
    assert "efficiency" in r.output and (tmp_path / "r.png").stat().st_size > 10_000


def test_cli_errors_are_one_line(corpora, tmp_path, cli_error):
    def _error(args, tmp_path):
        return cli_error("build", *args, "--out", tmp_path / "o", "--workers", 1)

    text = str(corpora["text"])
    assert "input not found" in _error([str(tmp_path / "missing.jsonl")], tmp_path)
    assert "no input matches" in _error([str(tmp_path / "*.parquet")], tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    assert "unknown input format" in _error([str(tmp_path / "x.txt")], tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert "malformed JSON" in _error([str(tmp_path / "bad.jsonl")], tmp_path)
    line = _error([text, "--text-field", "body"], tmp_path)
    assert "'body' not found" in line and "'text'" in line and "'id'" in line  # names the fields that exist
    (tmp_path / "odd.jsonl").write_text('{"foo": "a"}\n')
    assert "cannot tell the record format" in _error([str(tmp_path / "odd.jsonl")], tmp_path)
    line = _error([text, "--tokenizer", str(tmp_path / "no-such-tokenizer")], tmp_path)
    assert "not found" in line and "local" in line
    assert "seq_len must be an integer >= 1" in _error([text, "--seq-len", "0"], tmp_path)
    assert "unknown strategy" in _error([text, "--strategy", "best"], tmp_path)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    assert "empty corpus" in _error([str(tmp_path / "empty.jsonl")], tmp_path)
    (tmp_path / "nothing").mkdir()
    assert "no input files" in _error([str(tmp_path / "nothing")], tmp_path)


def test_error_lines_keep_square_brackets(tmp_path, monkeypatch, cli):
    """Messages such as 'pip install "packprep[plot]"' must reach the user whole (rich would eat '[plot]' as markup)."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a b c"}\n')
    build(BuildConfig(inputs=(str(data),), out=str(tmp_path / "out"), seq_len=64, workers=1))
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = cli("inspect", tmp_path / "out", "--plot", tmp_path / "p.png")
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert 'packprep[plot]' in r.output, r.output


def test_build_does_not_import_pandas(corpora, tmp_path):
    """`pa.array` imports pandas on its first call (~0.25 s per process, just to check for pandas objects); the
    build path wraps numpy buffers instead. A fresh process builds and checks."""
    import subprocess
    import sys

    code = ("import sys; from packprep.build import build; from packprep.config import BuildConfig; "
            f"build(BuildConfig(inputs=({str(corpora['qa'])!r},), out={str(tmp_path / 'out')!r}, "
            "workers=1, seq_len=256)); assert 'pandas' not in sys.modules, 'the build imported pandas'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_exit_codes_and_output(tmp_path):
    """`python -m packprep.cli` in a fresh process: piped output arrives, the exit code is the command's, and an
    error is one line on stderr, not a traceback."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "packprep.cli", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("packprep ")
    bad = subprocess.run([sys.executable, "-m", "packprep.cli", "build", str(tmp_path / "missing.jsonl"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
