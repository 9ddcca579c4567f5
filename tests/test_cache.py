"""The cache folder (`packprep.cache`): the auto backend's verdict is reused for the same tokenizer and sample and
checked again for another; the tiktoken rank table is reused; corrupt or foreign files are ignored, never fatal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from build_fixtures import texts

from packprep import cache
from packprep.backend import choose_backend
from packprep.build import build
from packprep.config import BuildConfig
from packprep.inputs import plan_tasks, resolve_inputs
from packprep.tiktoken_backend import TiktokenBackend, _check, _head, _ranks
from packprep.tokenizer import BUILTIN

pytest.importorskip("tiktoken")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PACKPREP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def corpus(path, seed: int):
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in zip(texts(30, seed), texts(30, seed + 1))))
    return path


def choose(tok, path):
    tasks = plan_tasks(resolve_inputs([str(path)]), chunk_bytes=1 << 20)
    backend, why, loaded = choose_backend(tok, "auto", tasks)
    assert loaded.backend == backend
    return backend, why


def test_verdict_hit_and_misses(folder, tmp_path):
    a, b = corpus(tmp_path / "a.jsonl", 1), corpus(tmp_path / "b.jsonl", 5)
    first, again = choose(BUILTIN, a), choose(BUILTIN, a)
    assert first[0] == "tiktoken" and "checked now" in first[1]
    assert again[0] == "tiktoken" and "verdict cached in" in again[1] and "checked now" not in again[1]
    fresh = choose(BUILTIN, b)  # another sample
    assert fresh[0] == "tiktoken" and "checked now" in fresh[1]
    other = tmp_path / "tok"  # another tokenizer: the same vocabulary, another tokenizer_config.json
    shutil.copytree(BUILTIN, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 123}))
    assert "checked now" in choose(other, a)[1]
    assert "verdict cached in" in choose(other, a)[1] and "verdict cached in" in choose(BUILTIN, b)[1]


def test_corrupt_or_unwritable_cache_is_ignored(folder, tmp_path):
    a = corpus(tmp_path / "a.jsonl", 1)
    choose(BUILTIN, a)
    files = sorted(folder.iterdir())
    assert {f.name.split("-")[0] for f in files} == {"backend", "ranks"}
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2] + b"\x00garbage")
    backend, why = choose(BUILTIN, a)
    assert backend == "tiktoken" and "checked now" in why  # both files ignored and written again
    assert "verdict cached in" in choose(BUILTIN, a)[1]
    shutil.rmtree(folder)
    folder.write_text("a file where the folder should be")
    assert choose(BUILTIN, a)[0] == "tiktoken"


def test_rank_table_round_trip_and_tampering(folder):
    spec = json.loads((BUILTIN / "tokenizer.json").read_text())
    head, ranks = _head(spec), _ranks(spec["model"], _check(spec)[1])
    cache.write_table("k", head, ranks)
    assert cache.read_table("k") == (head, ranks)
    path = folder / "ranks-k.npz"
    with np.load(path) as f:
        arrays = dict(f)
    arrays["ids"] = arrays["ids"][::-1].copy()  # a well-formed file whose arrays do not hash to its sha256
    np.savez(path, **arrays)
    assert cache.read_table("k") is None
    path.write_bytes(b"not a zip")
    assert cache.read_table("k") is None and cache.read_table("absent") is None
    built, loaded = TiktokenBackend(BUILTIN), TiktokenBackend(BUILTIN)  # the second from the cached table
    assert loaded.encoding._mergeable_ranks == built.encoding._mergeable_ranks == ranks
    assert (loaded.token_sizes == built.token_sizes).all() and loaded.head == built.head == head


def test_build_logs_whether_the_verdict_was_cached(folder, tmp_path):
    a = corpus(tmp_path / "a.jsonl", 1)
    reasons, shas = [], []
    for out in ("one", "two"):
        m = build(BuildConfig(inputs=(str(a),), out=str(tmp_path / out), workers=1, seq_len=256)).manifest
        reasons.append(m["tokenizer"]["backend_reason"])
        shas.append([s["sha256"] for s in m["shards"]])
    assert "checked now" in reasons[0] and "verdict cached in" in reasons[1] and shas[0] == shas[1]
