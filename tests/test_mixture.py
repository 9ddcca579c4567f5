"""Weighted mixtures ([[sources]]): realized token shares within 0.1% of the weights, epochs (whole copies plus a
seeded subsample), per-source formats and field flags, deterministic bytes, resume after a kill, doc ids unique
across sources and repeats, verify's per-source accounting (and that it catches a tampered count), config errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from build_fixtures import chats, read_docs, texts

from packprep.build import build
from packprep.config import merge
from packprep.mixture import doc_ids, sample, split_ids
from packprep.shards import MANIFEST
from packprep.verify import verify

WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three sources of different formats and sizes: text under a custom field, prompt/completion, chat."""
    d = tmp_path_factory.mktemp("mix")
    (d / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts(3000, 1, 3, 80)))
    pairs = zip(texts(2000, 2, 3, 30), texts(2000, 3, 3, 60))
    (d / "b.jsonl").write_text("".join(json.dumps({"q": p, "a": c}) + "\n" for p, c in pairs))
    (d / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats(800, 4)))
    return d


def toml(corpus: Path, name: str, sizes, key: str = "weight", top: str = "seq_len = 256\nshard_rows = 300\n") -> Path:
    fields = ['text_field = "body"', 'format = "prompt-completion"\nprompt_field = "q"\ncompletion_field = "a"', ""]
    tables = "".join(f'[[sources]]\npaths = ["{corpus / f}"]\n{key} = {v}\n{extra}\n'
                     for f, v, extra in zip(("a.jsonl", "b.jsonl", "c.jsonl"), sizes, fields))
    path = corpus / f"{name}.toml"
    path.write_text(top + tables)
    return path


def run(config: Path, out: Path, **kw) -> dict:
    m = build(merge(config, out=str(out), workers=1, **kw)).manifest
    report = verify(out)
    assert report.ok, report.failures
    return m


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("data-*.arrow"))}


@pytest.fixture(scope="module")
def weighted(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("w") / "out"
    return out, run(toml(corpus, "w", WEIGHTS), out)


def test_shares_match_the_weights(weighted):
    out, m = weighted
    sources = m["counts"]["sources"]
    assert [s["target_share"] for s in sources] == pytest.approx(WEIGHTS)
    for s, w in zip(sources, WEIGHTS):
        assert abs(s["share"] - w) < 1e-3, (s["share"], w)
        assert s["loss_tokens"] <= s["tokens"] and s["loss_tokens"] > 0
    assert sum(s["tokens"] for s in sources) == m["counts"]["tokens"]
    assert sum(s["loss_tokens"] for s in sources) == m["counts"]["loss_tokens"]
    # the default total: the source that runs out first at its weight is taken whole, the others subsampled
    full = [s["tokens"] == s["input_tokens"] and s["unique_docs"] == s["docs"] for s in sources]
    assert sum(full) == 1 and all(s["docs"] == s["unique_docs"] for s in sources)
    assert any(s["docs"] < s["input_docs"] for s in sources)
    # per-source formats and field flags: the text source's documents carry loss everywhere, the others only in part
    assert sources[0]["loss_tokens"] == sources[0]["tokens"] and sources[2]["loss_tokens"] < sources[2]["tokens"]


def test_doc_ids_unique_and_rows_mixed(weighted):
    out, m = weighted
    docs = read_docs(out)
    assert len(docs) == sum(s["docs"] for s in m["counts"]["sources"])
    assert all(len(pieces) == 1 for pieces in docs.values())  # truncate: one piece per copy, no id twice
    source, repeat, record = split_ids(np.array(list(docs)))
    assert set(source) == {0, 1, 2} and not repeat.any()
    for i, s in enumerate(m["counts"]["sources"]):
        assert record[source == i].max() < s["input_docs"]
    # packing is global and rows are shuffled: rows mix sources
    from packprep.shards import open_shard, shard_files

    rows = open_shard(shard_files(out)[0]).column("doc_ids").to_pylist()
    assert any(len(set(split_ids(np.array(r))[0])) > 1 for r in rows)


def test_max_tokens_repeats_small_sources(corpus, tmp_path):
    m = run(toml(corpus, "big", WEIGHTS), tmp_path / "out", max_tokens=1_500_000)
    sources = m["counts"]["sources"]
    assert abs(m["counts"]["tokens"] - 1_500_000) < 100
    for s, w in zip(sources, WEIGHTS):
        assert abs(s["share"] - w) < 1e-3
    c = sources[2]  # 0.2 x 1.5M = 300k tokens from a ~145k-token source: 2 whole copies and a part
    assert c["docs"] > 2 * c["input_docs"] and c["unique_docs"] == c["input_docs"]
    source, repeat, record = split_ids(np.array(list(read_docs(tmp_path / "out"))))
    assert set(repeat[source == 2]) == {0, 1, 2}


def test_epochs(corpus, tmp_path):
    out = tmp_path / "out"
    m = run(toml(corpus, "ep", (2.0, 0.5, 1), key="epochs", top="seq_len = 64\nlong_docs = \"split\"\n"), out)
    a, b, c = m["counts"]["sources"]
    assert a["tokens"] == 2 * a["input_tokens"] and a["docs"] == 2 * a["unique_docs"] == 2 * a["input_docs"]
    assert abs(b["tokens"] - b["input_tokens"] / 2) <= 2 and b["docs"] == b["unique_docs"] < b["input_docs"]
    assert c["tokens"] == c["input_tokens"] and c["docs"] == c["input_docs"]
    docs = read_docs(out)
    source, repeat, record = split_ids(np.array(list(docs)))
    assert set(repeat[source == 0]) == {0, 1} and not repeat[source > 0].any()
    # a repeat is the same document: both copies hold the same tokens (split documents: all their pieces)
    for rec in record[source == 0][:50]:
        copies = [sorted(p[0].tolist() for p in docs[int(doc_ids(0, np.array(r), np.array(rec)))]) for r in (0, 1)]
        assert copies[0] == copies[1]  # pieces in shard order, which differs between the copies
    assert any(len(p) > 1 for p in docs.values())  # split documents share one id across their pieces


def test_deterministic_and_seeded(corpus, weighted, tmp_path):
    out, m = weighted
    again = run(toml(corpus, "w", WEIGHTS), tmp_path / "again")
    assert digests(tmp_path / "again") == digests(out) and again["counts"] == m["counts"]
    other = run(toml(corpus, "w", WEIGHTS), tmp_path / "seed", seed=1)
    ids = [set(read_docs(o)) for o in (out, tmp_path / "seed")]
    assert ids[0] != ids[1]
    for s, w in zip(other["counts"]["sources"], WEIGHTS):
        assert abs(s["share"] - w) < 1e-3


@pytest.mark.parametrize("kill_at", ["pack", "write:1"])
def test_resume_after_kill(corpus, weighted, tmp_path, kill_at):
    config, out = toml(corpus, "w", WEIGHTS), tmp_path / "out"
    cmd = [sys.executable, "-m", "packprep.cli", "build", "--config", str(config), "--out", str(out), "--workers",
           "2", "-q"]
    for kill in (kill_at, ""):
        p = subprocess.run(cmd, env={**os.environ, "PACKPREP_TEST_KILL_AT": kill}, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == (-signal.SIGKILL if kill else 0), p.stderr[-2000:]
        assert (out / MANIFEST).exists() == (not kill)
    assert digests(out) == digests(weighted[0])
    assert json.loads((out / MANIFEST).read_text())["counts"] == weighted[1]["counts"]
    assert verify(out).ok


@pytest.mark.parametrize("edit", [("tokens", 1), ("loss_tokens", -1), ("docs", 1), ("unique_docs", -1),
                                  ("input_docs", 1)])
def test_verify_catches_tampered_counts(weighted, tmp_path, edit):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(weighted[0], out)
    m = json.loads((out / MANIFEST).read_text())
    m["counts"]["sources"][1][edit[0]] += edit[1]
    (out / MANIFEST).write_text(json.dumps(m))
    report = verify(out)
    assert not report.ok and any(f.startswith(("sources", "docs in shards")) for f in report.failures), report.checks


def test_sample_hits_the_target():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 2000, 5000)
    tokens[::7] = 0  # empty or dropped records are never sampled
    for seed in range(20):
        target = int(rng.integers(1, 3 * tokens.sum()))
        rec, rep = sample(tokens, target, np.random.default_rng(seed))
        assert abs(int(tokens[rec].sum()) - target) <= 2
        assert (tokens[rec] > 0).all() and len(set(zip(rec.tolist(), rep.tolist()))) == len(rec)
    again = sample(tokens, 123_456, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(again, sample(tokens, 123_456, np.random.default_rng(3))))


def test_doc_ids_round_trip():
    ids = doc_ids(np.array([0, 3, 32767]), np.array([0, 1, 65535]), np.array([5, 0, 2**32 - 1]))
    assert ids[0] == 5 and (ids > 0).all()
    assert [a.tolist() for a in split_ids(ids)] == [[0, 3, 32767], [0, 1, 65535], [5, 0, 2**32 - 1]]


@pytest.mark.parametrize("tables, top, message", [
    ('weight = 1\nepochs = 2', "", "give either weight"),
    ("weight = -0.5", "", "weight must be a number > 0"),
    ("weight = 0", "", "weight must be a number > 0"),
    ('weight = "half"', "", "expected a number"),
    ("", "", "give either weight"),
    ("wieght = 1", "", "unknown key(s) wieght"),
    ('weight = 1\nformat = "text"\nprompt_field = "q"', "", "does not apply to --format text"),
    ("weight = 1", 'inputs = ["x.jsonl"]\n', "either as INPUTS or as [[sources]]"),
    ("weight = 1", 'format = "chat"\n', "set format and field flags in each [[sources]] table"),
    ("epochs = 1", "max_tokens = 100\n", "--max-tokens applies to weighted"),
])
def test_config_errors(corpus, cli_error, tmp_path, tables, top, message):
    config = tmp_path / "bad.toml"
    config.write_text(f'{top}[[sources]]\npaths = ["{corpus / "a.jsonl"}"]\n{tables}\n')
    assert message in cli_error("build", "--config", config, "--out", tmp_path / "out")


def test_build_errors(corpus, cli_error, tmp_path):
    a, b = corpus / "a.jsonl", corpus / "b.jsonl"
    cases = {
        f'[[sources]]\npaths = ["{a}"]\nweight = 1\n[[sources]]\npaths = ["{b}"]\nepochs = 1\n': "mix weight and",
        f'[[sources]]\npaths = ["{a}"]\nweight = 1\n[[sources]]\npaths = ["{corpus}/*.jsonl"]\nweight = 1\n':
            "give each file to one source",
        f'[[sources]]\npaths = ["{corpus}/none*.jsonl"]\nweight = 1\n': "no input matches",
    }
    for text, message in cases.items():
        (tmp_path / "c.toml").write_text(text)
        assert message in cli_error("build", "--config", tmp_path / "c.toml", "--out", tmp_path / "out")
    assert "--max-tokens sets the size of a [[sources]] mixture" in cli_error("build", a, "--max-tokens", 10)


def test_inspect_lists_sources(weighted, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    r = cli("inspect", weighted[0])
    assert r.exit_code == 0, r.output
    assert all(f"source {i}" in r.output for i in (1, 2, 3)) and "target 50.0000%" in r.output


def test_pipeline_recipe_parses():
    cfg = merge(Path(__file__).resolve().parent.parent / "pipelines" / "sft_mixture.toml")
    assert [s.weight for s in cfg.sources] == list(WEIGHTS) and cfg.sources[2].prompt_field == "question"
