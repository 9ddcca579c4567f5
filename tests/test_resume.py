"""Crash safety: `packprep build` killed with SIGKILL at every stage (tokenize, after pack, between shards, mid-shard),
or stopped by a full disk, finishes on the rerun of the same command with the same shard bytes as an uninterrupted
build, reusing the finished work (checked by file identity, not just by the result); other settings on an unfinished
folder are refused or restart; verify passes on every resumed build."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from build_fixtures import texts
from typer.testing import CliRunner

import packprep.write as write_mod
from packprep.build import build
from packprep.cli import app
from packprep.config import BuildConfig
from packprep.inputs import content_hash
from packprep.verify import verify
from packprep.workdir import WORK, BuildLockedError, DiskFullError

SETTINGS = dict(seq_len=256, shard_rows=200, chunk_bytes=64 << 10)  # ~18 tokenize tasks, 8 shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    src = root / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(6000, 11, lo=3, hi=60)))
    (root / "build.toml").write_text("".join(f"{k} = {v}\n" for k, v in SETTINGS.items()))
    return src


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, str]:
    """The uninterrupted build's shard digests."""
    out = tmp_path_factory.mktemp("ref") / "out"
    m = build(_config(corpus, out)).manifest
    assert len(m["shards"]) >= 6 and m["counts"]["rows"] > 200
    assert m["inputs"]["specs"][0]["files"] == [[str(corpus), corpus.stat().st_size, content_hash(corpus)]]
    return _digests(out)


def _config(corpus: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(inputs=(str(corpus),), out=str(out), **{"workers": 1, **SETTINGS, **kw})


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("data-*.arrow"))}


def _cli(corpus: Path, out: Path, kill_at: str | None = None, workers: int = 2, kill_group: bool = True) -> None:
    """`python -m packprep.cli build` in its own session; with kill_at the build SIGKILLs itself there, and the rest
    of its process group (forked workers) is killed too, as a preempted job would be. kill_group=False: only the
    driver dies (the OOM killer's way), and its workers must go by themselves."""
    env = {**os.environ, "PACKPREP_TEST_KILL_AT": kill_at or ""}
    cmd = [sys.executable, "-m", "packprep.cli", "build", str(corpus), "--out", str(out), "--workers", str(workers),
           "--config", str(corpus.parent / "build.toml"), "-q"]
    log = out.parent / "build.log"
    with open(log, "w") as f:  # a file, not a pipe: orphaned workers must not keep the test waiting for EOF
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=120)
            if not kill_group:
                _wait_group_gone(p.pid)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if kill_at:
        assert rc == -signal.SIGKILL, (rc, log.read_text()[-2000:])
        assert not (out / "packprep.json").exists() and not verify(out).ok
    else:
        assert rc == 0, log.read_text()[-2000:]


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("the build's workers outlived their driver")


def _files(folder: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns): a file rewritten by a rerun (temp name + rename) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob(pattern)}


def _finish_and_check(corpus: Path, out: Path, reference: dict[str, str], **kw) -> dict:
    _cli(corpus, out, **kw)
    assert _digests(out) == reference
    report = verify(out)
    assert report.ok, report.failures
    assert not (out / WORK).exists() and not list(out.glob("*.tmp*"))
    return json.loads((out / "packprep.json").read_text())


def test_kill_at_each_stage_then_resume(corpus, reference, tmp_path):
    """Killed in tokenize, after pack and between shards, resumed each time: finished work is never redone."""
    out, spool, layout = tmp_path / "out", tmp_path / "out" / WORK / "spool", tmp_path / "out" / WORK / "layout"
    _cli(corpus, out, kill_at="tokenize:3", kill_group=False)  # the workers die with the driver
    finished = {n.split(".")[0] for n in _files(spool, "*.done.json")}  # >= 3 of ~18 tasks (a killed one may
    done = {n: v for n, v in _files(spool, "*.npy").items() if n.split(".")[0] in finished}  # have .npy, no marker)
    assert len(finished) >= 3 and len(done) == 3 * len(finished) and not layout.exists()

    _cli(corpus, out, kill_at="pack")
    assert {k: v for k, v in _files(spool, "*.npy").items() if k in done} == done  # not re-tokenized
    plan = _files(layout, "*")
    assert "done.json" in plan and not (out / WORK / "shards").exists()

    _cli(corpus, out, kill_at="write:2")
    assert _files(layout, "*") == plan  # the packing plan was reused, not recomputed
    marked = {int(n[1:6]) for n in _files(out / WORK / "shards", "*.done.json")}
    shards = {n: v for n, v in _files(out, "data-*.arrow").items() if int(n[5:10]) in marked}
    assert len(shards) >= 2

    m = _finish_and_check(corpus, out, reference)
    assert {k: v for k, v in _files(out, "data-*.arrow").items() if k in shards} == shards  # not rewritten
    assert m["resumed"]["layout"] and m["resumed"]["shards"] >= 2 and m["resumed"]["tokenize_tasks"] >= 3


def test_kill_mid_shard_leaves_no_finished_looking_file(corpus, reference, tmp_path):
    out = tmp_path / "out"
    _cli(corpus, out, kill_at="shard:1", workers=1)
    tmp = list(out.glob("data-00001-*.arrow.tmp*"))
    assert len(tmp) == 1 and tmp[0].stat().st_size > 0  # the half-written shard, under its temporary name only
    assert not list(out.glob("data-00001-*.arrow")) and not (out / WORK / "shards" / "s00001.done.json").exists()
    m = _finish_and_check(corpus, out, reference, workers=1)
    assert m["resumed"]["shards"] == 1


def _fill_disk_at(monkeypatch, shard: int) -> None:
    """The k-th shard write fails with ENOSPC after its schema is written (in-process: workers=1)."""
    real, calls = write_mod.write_shard, [0]

    def failing(path, batches, **options):
        calls[0] += 1

        def gen():
            if calls[0] == shard + 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            yield from batches

        return real(path, gen(), **options)

    monkeypatch.setattr(write_mod, "write_shard", failing)


def test_disk_full_is_one_clean_line_and_resumable(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fill_disk_at(monkeypatch, 3)
    r = CliRunner().invoke(app, ["build", str(corpus), "--out", str(out), "--workers", "1", "--config",
                                 str(corpus.parent / "build.toml"), "-q"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full writing "), r.output
    assert "bytes free" in lines[0] and "rerun the same command to resume" in lines[0]
    assert not list(out.glob("*.tmp*")) and len(_digests(out)) == 3  # no partial file left; 3 shards done
    monkeypatch.undo()
    m = build(_config(corpus, out, workers=2)).manifest  # resumed with another worker count: same bytes
    assert _digests(out) == reference and verify(out).ok
    assert m["resumed"]["shards"] == 3


def test_other_settings_on_an_unfinished_folder(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fill_disk_at(monkeypatch, 2)
    with pytest.raises(DiskFullError, match="disk full writing"):
        build(_config(corpus, out))
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match=r"unfinished build of different settings \(seq_len: 256 -> 128\)"):
        build(_config(corpus, out, seq_len=128))
    assert len(_digests(out)) == 2  # refused before touching anything
    m = build(_config(corpus, out, seq_len=128, overwrite=True)).manifest
    assert m["seq_len"] == 128 and m["resumed"] is None and verify(out).ok
    assert not any(n.startswith("data-") and n not in {s["file"] for s in m["shards"]} for n in _digests(out))


def test_damaged_or_unmarked_shards_are_rewritten(corpus, reference, tmp_path, monkeypatch):
    """A shard whose size differs from its marker, or that has no marker (killed between rename and marker), and a
    stale temp file are never taken for finished work."""
    out = tmp_path / "out"
    _fill_disk_at(monkeypatch, 3)
    with pytest.raises(DiskFullError):
        build(_config(corpus, out))
    monkeypatch.undo()
    shards = sorted(out.glob("data-*.arrow"))
    shards[0].write_bytes(shards[0].read_bytes()[:-100])  # truncated
    (out / WORK / "shards" / "s00001.done.json").unlink()  # no marker
    (out / (shards[2].name + ".tmp4242")).write_bytes(b"half a shard")
    m = build(_config(corpus, out)).manifest
    assert _digests(out) == reference and verify(out).ok and not list(out.glob("*.tmp*"))
    assert m["resumed"]["shards"] == 1


def test_finished_folder_leftovers(corpus, reference, tmp_path):
    """Killed after the manifest, before the work folder was removed: 'already built', and the leftovers go. Killed
    while --overwrite removed an old build (shards left, no manifest, no work folder): still ours, and rebuilt."""
    out = tmp_path / "out"
    build(_config(corpus, out))
    (out / WORK / "spool").mkdir(parents=True)
    r = build(_config(corpus, out))
    assert r.already_built and not (out / WORK).exists()
    (out / "packprep.json").unlink()
    shutil.copy(out / "state.json", out / "state.json.tmp77")
    build(_config(corpus, out))
    assert _digests(out) == reference and verify(out).ok and not list(out.glob("*.tmp*"))
    (out / "packprep.json").unlink()
    info = json.loads((out / "dataset_info.json").read_text())
    (out / "dataset_info.json").write_text(json.dumps({**info, "description": ""}))  # a datasets folder, not ours
    with pytest.raises(FileExistsError, match="is not a packprep output folder"):
        build(_config(corpus, out))
    assert _digests(out) == reference  # nothing of it was touched


def test_one_build_at_a_time_per_folder(corpus, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds it
    try:
        with pytest.raises(BuildLockedError, match="another packprep build is writing to"):
            build(_config(corpus, out))
    finally:
        os.close(fd)
    assert build(_config(corpus, out)).manifest["counts"]["input_docs"] == 6000


def test_a_tokenizer_retrained_in_place_is_a_different_build(tmp_path):
    from packprep.tokenizer import BUILTIN

    tok = tmp_path / "tok"
    shutil.copytree(BUILTIN, tok)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(30)))
    cfg = dict(inputs=(str(data),), out=str(tmp_path / "out"), tokenizer=str(tok), seq_len=256, workers=1)
    build(BuildConfig(**cfg))
    assert build(BuildConfig(**cfg)).already_built
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf["chat_template"] = "{{ messages }}"  # a changed chat template changes a chat build's tokens
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(FileExistsError, match="tokenizer's files changed"):
        build(BuildConfig(**cfg))
    assert not build(BuildConfig(**cfg, overwrite=True)).already_built


def test_a_build_where_every_document_is_dropped_fails_clearly(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * 400}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match="nothing left to pack: all 3 documents"):
        build(BuildConfig(inputs=(str(data),), out=str(tmp_path / "out"), seq_len=64, long_docs="drop", workers=1))


def test_an_unreadable_manifest_is_one_clear_error(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a b c"}\n')
    cfg = dict(inputs=(str(data),), out=str(tmp_path / "out"), seq_len=64, workers=1)
    build(BuildConfig(**cfg))
    manifest = tmp_path / "out" / "packprep.json"
    m = json.loads(manifest.read_text())
    m["config"]["from_a_future_version"] = 1
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a manifest this packprep version reads"):
        build(BuildConfig(**cfg))
    assert not build(BuildConfig(**cfg, overwrite=True)).already_built
    del m["counts"]
    manifest.write_text(json.dumps(m))
    assert not verify(tmp_path / "out").ok
