"""Compressed inputs: .gz .zst .bz2 .xz around JSONL, JSON arrays and CSV give byte-identical shards to the same
corpus uncompressed, for any --workers; multi-member files (zstd frames, bgzip blocks) are cut between members at line
ends only; detection by magic bytes; a lying suffix and rejects in a compressed file are reported with the line."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from build_fixtures import texts

from packprep.build import build
from packprep.config import BuildConfig
from packprep.inputs import plan_tasks, resolve_inputs
from packprep.readers import compressed, read_task
from packprep.records import Reject

SETTINGS = dict(seq_len=256, shard_rows=150, chunk_bytes=16 << 10)


def zstd(data: bytes) -> bytes:
    return pa.Codec("zstd").compress(data, asbytes=True)


def bgzip(data: bytes, block: int = 1 << 14) -> bytes:
    """BGZF as `bgzip` writes it: gzip members with a 'BC' extra field holding the member size, then an empty one."""
    out = b""
    for k in range(0, len(data) + 1, block):
        piece = data[k : k + block]
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = c.compress(piece) + c.flush()
        size = 12 + 6 + len(body) + 8
        out += (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00" + (size - 1).to_bytes(2, "little")
                + body + zlib.crc32(piece).to_bytes(4, "little") + len(piece).to_bytes(4, "little"))
    return out


def frames(data: bytes, every: int) -> bytes:
    """zstd frames of about `every` bytes: every other one extended to a line end, the others cut mid-line."""
    cuts, k = [0], 0
    while cuts[-1] + every < len(data):
        cut = cuts[-1] + every
        k += 1
        cuts.append(data.index(b"\n", cut) + 1 if k % 2 else cut)
    return b"".join(zstd(data[a:b]) for a, b in zip(cuts, cuts[1:] + [len(data)]))


CODECS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstd}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain")
    t = texts(2500, 21, lo=3, hi=60)
    files = {"jsonl": root / "a.jsonl", "json": root / "b.json", "csv": root / "c.csv"}
    files["jsonl"].write_text("".join(json.dumps({"text": x}) + "\n" for x in t))
    files["json"].write_text(json.dumps([{"prompt": a, "completion": b} for a, b in zip(t[:400], t[400:800])]))
    files["csv"].write_text("instruction,input,output\n" + "".join(f'"{a}",,"{b}"\n' for a, b in zip(t[:300], t[1:])))
    return files


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("data-*.arrow"))}


def _build(inputs, out: Path, workers: int = 1) -> dict[str, str]:
    build(BuildConfig(inputs=tuple(map(str, inputs)), out=str(out), workers=workers, **SETTINGS))
    return _digests(out)


def _docs(src) -> list:
    return [d for t in plan_tasks(resolve_inputs([src]), chunk_bytes=SETTINGS["chunk_bytes"])
            for b in read_task(t) for d in (b.texts or list(zip(b.prompts, b.completions)))]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_every_codec_same_documents(plain, kind, tmp_path):
    ref = _docs(plain[kind])
    assert len(ref) >= 300
    for suffix, compress in CODECS.items():
        src = tmp_path / (plain[kind].name + suffix)
        src.write_bytes(compress(plain[kind].read_bytes()))
        assert _docs(src) == ref, suffix


def test_same_shards_per_format(plain, tmp_path):
    """A build over compressed JSONL, JSON and CSV writes the bytes of the same build uncompressed."""
    ref = _build(plain.values(), tmp_path / "ref")
    srcs = []
    for (kind, p), suffix in zip(plain.items(), (".xz", ".gz", ".bz2")):
        srcs.append(tmp_path / (p.name + suffix))
        srcs[-1].write_bytes(CODECS[suffix](p.read_bytes()))
    assert _build(srcs, tmp_path / "out", workers=2) == ref


def test_members_cut_at_line_ends_any_workers(plain, tmp_path):
    data = plain["jsonl"].read_bytes()
    ref = _build([plain["jsonl"]], tmp_path / "ref")
    zst, bgz = tmp_path / "a.jsonl.zst", tmp_path / "a.jsonl.gz"
    zst.write_bytes(frames(data, 3001))  # frames end mid-line; some end on a newline by chance
    bgz.write_bytes(bgzip(data))
    for src in (zst, bgz):
        tasks = plan_tasks(resolve_inputs([src]), chunk_bytes=SETTINGS["chunk_bytes"])
        assert len(tasks) > 3, src  # cut inside the file
        sizes = compressed.members(str(src))
        starts = {off for off, _, _ in sizes}
        assert all(t.start in starts for t in tasks) and tasks[-1].stop == src.stat().st_size
        docs = [d for t in tasks for b in read_task(t) for d in b.texts]
        assert docs == [json.loads(x)["text"] for x in data.decode().splitlines()]
        workers = 2 if src is zst else 1
        assert _build([src], tmp_path / f"{src.suffix}{workers}", workers=workers) == ref


def test_one_frame_is_one_task_and_magic_decides(plain, tmp_path):
    data = plain["jsonl"].read_bytes()
    one = tmp_path / "one.jsonl.zst"
    one.write_bytes(zstd(data))
    assert len(plan_tasks(resolve_inputs([one]), chunk_bytes=4096)) == 1
    hidden = tmp_path / "hidden.jsonl"  # gzip data without the suffix: the magic bytes decide
    hidden.write_bytes(gzip.compress(data))
    tasks = plan_tasks(resolve_inputs([hidden]), chunk_bytes=1 << 20)
    assert sum(len(b.texts) for t in tasks for b in read_task(t)) == 2500
    liar = tmp_path / "liar.jsonl.zst"
    liar.write_bytes(data)
    with pytest.raises(ValueError, match=r"liar.jsonl.zst: the name says zstd but the data is not zstd-compressed"):
        resolve_inputs([liar]) and plan_tasks(resolve_inputs([liar]), chunk_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"unknown input format '\.txt'"):
        resolve_inputs([tmp_path / "x.txt.gz"] if (tmp_path / "x.txt.gz").write_bytes(gzip.compress(b"x")) else [])


def test_reject_line_numbers_in_a_cut_file(tmp_path):
    lines = [json.dumps({"text": x}) for x in texts(3000, 5)]
    lines[2222] = "{not json"
    src = tmp_path / "bad.jsonl.zst"
    src.write_bytes(frames(("\n".join(lines) + "\n").encode(), 4000))
    rejects: list[Reject] = []
    tasks = plan_tasks(resolve_inputs([src]), chunk_bytes=8 << 10)
    assert len(tasks) > 2 and tasks[-1].start > 0
    n = sum(len(b.texts) for t in tasks for b in read_task(t, rejects=rejects))
    assert n == 2999 and len(rejects) == 1
    assert (rejects[0].where, rejects[0].at, rejects[0].kind) == ("line", 2223, "malformed_json")
