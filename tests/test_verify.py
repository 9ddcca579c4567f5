"""packprep verify: passes on a good build, and catches a flipped byte, a missing shard, broken offsets and a
document-accounting mismatch (exit code 1 from the CLI)."""

from __future__ import annotations

import json
import shutil

import pytest

from packprep.build import build
from packprep.config import BuildConfig
from packprep.shards import make_batch, write_shard
from packprep.verify import verify


@pytest.fixture(scope="module")
def good(tmp_path_factory, corpora):
    out = tmp_path_factory.mktemp("verify") / "good"
    build(BuildConfig(inputs=(str(corpora["chat"]), str(corpora["text"])), out=str(out), seq_len=128, shard_rows=4,
                      workers=1))
    return out


@pytest.fixture
def copy(good, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(good, out)
    return out


def test_good_build_passes(good, cli):
    report = verify(good)
    assert report.ok and len(report.checks) > 6
    assert cli("verify", good).exit_code == 0


def test_flipped_byte_fails(copy, cli):
    shard = sorted(copy.glob("data-*.arrow"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    report = verify(copy)
    assert not report.ok and any("sha256" in f for f in report.failures)
    r = cli("verify", copy)
    assert r.exit_code == 1 and "FAIL" in r.output


def test_missing_shard_and_missing_manifest_fail(copy):
    sorted(copy.glob("data-*.arrow"))[0].unlink()
    assert any("missing" in f for f in verify(copy).failures)
    (copy / "packprep.json").unlink()
    assert not verify(copy).ok


def test_doc_accounting_mismatch_fails(copy):
    m = json.loads((copy / "packprep.json").read_text())
    m["counts"]["input_docs"] += 1
    (copy / "packprep.json").write_text(json.dumps(m))
    assert any(f.startswith("doc accounting") for f in verify(copy).failures)


def test_bad_offsets_fail(copy):
    """A shard rewritten with a row longer than seq_len and a manifest entry to match: the row check fails."""
    import numpy as np

    m = json.loads((copy / "packprep.json").read_text())
    s = m["shards"][0]
    batch = make_batch(np.arange(200, dtype=np.int32), np.array([0, 200]), np.array([200]), np.array([0, 1]),
                       np.array([0]))
    info = write_shard(copy / s["file"], [batch])
    s.update({k: info[k] for k in ("rows", "tokens", "bytes", "sha256")})
    (copy / "packprep.json").write_text(json.dumps(m))
    assert any("row lengths outside" in f for f in verify(copy).failures)


def test_stray_shard_or_temp_file_fails(copy):
    """A finished build holds only its own shards: a leftover half-written temp or a foreign shard is flagged."""
    shard = sorted(copy.glob("data-*.arrow"))[0]
    (copy / (shard.name + ".tmp123")).write_bytes(shard.read_bytes()[:50])
    assert any(f.startswith("no stray shards") for f in verify(copy).failures)
