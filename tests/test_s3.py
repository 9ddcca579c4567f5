"""A real S3 endpoint: moto's standalone server on 127.0.0.1 (started here), s3fs speaking HTTP to it, credentials and
endpoint from the standard AWS_* environment. Inputs are read from the bucket (a glob over compressed and plain
files), the build is written to the bucket, killed mid-upload and resumed to the same bytes, verified and inspected
remotely, and opened by datasets through fsspec; a Ray build whose tasks run "elsewhere" (their own spool folder,
outputs shipped back through Ray) writes the same bytes. `packprep export` reads a remote build and publishes to a
remote --out (export.json last), resuming an interrupted upload."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from build_fixtures import texts

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from packprep.build import build  # noqa: E402
from packprep.config import BuildConfig  # noqa: E402
from packprep.remote import IDENTITY, PROGRESS, stage  # noqa: E402
from packprep.verify import verify  # noqa: E402

SETTINGS = dict(seq_len=256, shard_rows=150, chunk_bytes=32 << 10)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An s3fs filesystem on a fresh moto server with bucket 'corp' holding the corpus; the AWS_* environment set."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
    fs.mkdir("corp")
    local = tmp_path_factory.mktemp("s3corpus")
    lines = [json.dumps({"text": t}) + "\n" for t in texts(3000, 31, lo=3, hi=60)]
    (local / "a.jsonl").write_text("".join(lines[:1500]))
    (local / "b.jsonl").write_text("".join(lines[1500:]))
    import gzip

    fs.pipe("corp/in/a.jsonl", (local / "a.jsonl").read_bytes())
    fs.pipe("corp/in/b.jsonl.gz", gzip.compress((local / "b.jsonl").read_bytes()))
    yield fs, local
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def reference_out(s3, tmp_path_factory) -> Path:
    _, local = s3
    out = tmp_path_factory.mktemp("ref") / "out"
    build(BuildConfig(inputs=(str(local / "a.jsonl"), str(local / "b.jsonl")), out=str(out), workers=1, **SETTINGS))
    return out


@pytest.fixture(scope="module")
def reference(reference_out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(reference_out.glob("data-*.arrow"))}


def _remote_digests(fs, prefix: str) -> dict[str, str]:
    return {p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
            for p in sorted(fs.glob(f"{prefix}/data-*"))}


def build_cmd(url: str, work: Path) -> list[str]:
    """The CLI build of the bucket's inputs to `url`, one worker, in the local work folder `work`."""
    return [sys.executable, "-m", "packprep.cli", "build", "s3://corp/in/*.jsonl*", "--out", url, "--work-dir",
            str(work), "--workers", "1", "-q", *[f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]]


def test_inputs_and_output_on_s3(s3, reference, tmp_path):
    fs, _ = s3
    cfg = BuildConfig(inputs=("s3://corp/in/*.jsonl*",), out="s3://corp/builds/one", workers=2,
                      work_dir=str(tmp_path / "work"), **SETTINGS)
    m = build(cfg).manifest
    assert len(m["shards"]) >= 3 and _remote_digests(fs, "corp/builds/one") == reference
    specs = m["inputs"]["specs"][0]["files"]
    assert [f[0] for f in specs] == ["s3://corp/in/a.jsonl", "s3://corp/in/b.jsonl.gz"] and all(f[2] for f in specs)
    assert not fs.exists(f"corp/builds/one/{IDENTITY}") and not list((tmp_path / "work").glob("data-*"))
    assert build(cfg).already_built  # the remote manifest says so
    report = verify("s3://corp/builds/one")
    assert report.ok, report.failures
    from datasets import load_from_disk

    ds = load_from_disk("s3://corp/builds/one", storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    assert len(ds) == m["counts"]["rows"]
    from packprep.report import load_manifest, row_histograms

    assert load_manifest("s3://corp/builds/one")["fingerprint"] == m["fingerprint"]
    assert row_histograms("s3://corp/builds/one")["row_tokens"].sum() == m["counts"]["tokens"]
    assert stage("s3://corp/builds/one", tmp_path / "cache") == tmp_path / "cache"


def test_remote_line_cuts_are_the_local_ones_from_one_round_of_reads(s3, monkeypatch):
    """Planning a remote JSONL file fetches the bytes after every grid point at once and finds the same cuts as
    the local file; the file itself is read only where a prefetched block holds no newline."""
    from packprep.readers import base, jsonl

    fs, local = s3
    data = (local / "a.jsonl").read_bytes()
    with base.open_input(local / "a.jsonl") as f:
        want = jsonl.line_cuts(f, 0, len(data), 997)
    seeks = []

    class Counting:  # line_cuts reads through seek + read only
        def __init__(self, f):
            self.f = f

        def seek(self, pos):
            seeks.append(pos)
            return self.f.seek(pos)

        def read(self, n):
            return self.f.read(n)

    with base.open_input("s3://corp/in/a.jsonl") as f:
        got = jsonl.line_cuts(Counting(f), 0, len(data), 997, "s3://corp/in/a.jsonl")
    assert got == want and len(want) > 20
    assert not seeks  # every cut came from the prefetched blocks (short lines)
    monkeypatch.setattr(jsonl, "PREFETCH", 4)  # blocks too short to hold a newline: the file is read, same cuts
    with base.open_input("s3://corp/in/a.jsonl") as f:
        assert jsonl.line_cuts(Counting(f), 0, len(data), 997, "s3://corp/in/a.jsonl") == want
    assert len(seeks) == len(want) - 1


def test_killed_mid_upload_resumes_to_same_bytes(s3, reference, tmp_path):
    fs, _ = s3
    url, work = "s3://corp/builds/killed", tmp_path / "work"
    cmd = build_cmd(url, work)
    r = subprocess.run(cmd, env={**os.environ, "PACKPREP_TEST_KILL_AT": "upload:2"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("corp/builds/killed")}
    assert IDENTITY in names and "packprep.json" not in names  # unfinished: no manifest
    with pytest.raises(FileNotFoundError, match="no packprep.json"):
        verify(url)
    first = sorted(n for n in names if n.startswith("data-"))
    assert first  # the first shard's upload had finished or was in flight; make it a half-written object
    fs.pipe(f"corp/builds/killed/{first[0]}", b"half an upload")
    before = {p: fs.info(p)["ETag"] for p in fs.glob("corp/builds/killed/data-*")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _remote_digests(fs, "corp/builds/killed") == reference
    after = {p: fs.info(p)["ETag"] for p in before}
    assert sum(before[p] == after[p] for p in before) == len(before) - 1  # only the half-uploaded object went again
    assert verify(url).ok
    assert not Path(work / ".packprep-work").exists()


def test_rerun_on_a_fresh_host_skips_the_recorded_uploads(s3, reference, reference_out, tmp_path, monkeypatch):
    """Killed right after the 2nd shard's upload was recorded; rerun with an empty --work-dir (another host): only the
    shards that the progress record holds intact are skipped. An unrecorded object of the right size (a torn or
    foreign write) and a recorded one cut short are uploaded again; the bytes are the reference's."""
    fs, _ = s3
    url, prefix, names = "s3://corp/builds/moved", "corp/builds/moved", sorted(reference)
    assert len(names) >= 4
    cmd = build_cmd(url, tmp_path / "host-a")
    r = subprocess.run(cmd, env={**os.environ, "PACKPREP_TEST_KILL_AT": f"uploaded:{names[1]}"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    recorded = json.loads(fs.cat_file(f"{prefix}/{PROGRESS}"))["shards"]
    assert names[1] in recorded and names[-1] not in recorded
    assert {n: v["sha256"] for n, v in recorded.items()} == {n: reference[n] for n in recorded}
    fs.pipe(f"{prefix}/{names[1]}", b"cut short")  # recorded, but the object is not what was recorded
    fs.pipe(f"{prefix}/{names[-1]}", b"x" * (reference_out / names[-1]).stat().st_size)  # unrecorded, right size
    fs.invalidate_cache()
    from packprep import storage

    out_fs, sent = storage.filesystem(url)[0], []  # fsspec's cached instance: the one the build uploads through
    put = out_fs.put_file
    monkeypatch.setattr(out_fs, "put_file", lambda lpath, rpath, *a, **kw: (
        sent.append(rpath.rsplit("/", 1)[-1]), put(lpath, rpath, *a, **kw))[1])
    m = build(BuildConfig(inputs=("s3://corp/in/*.jsonl*",), out=url, workers=1, work_dir=str(tmp_path / "host-b"),
                          **SETTINGS)).manifest
    skipped = set(recorded) - {names[1]}
    assert skipped and sorted(n for n in sent if n.startswith("data-")) == sorted(set(names) - skipped)
    assert _remote_digests(fs, prefix) == reference and [s["file"] for s in m["shards"]] == names
    fs.invalidate_cache()
    assert not fs.exists(f"{prefix}/{PROGRESS}") and not fs.exists(f"{prefix}/{IDENTITY}")
    assert verify(url).ok


def test_weighted_mixture_of_s3_sources(s3, tmp_path):
    """Two [[sources]] read from the bucket (plain and gzip) at weights 0.7 / 0.3: realized token shares within 0.1%
    absolute, verify's per-source accounting passes. Two sources naming one object (once as s3a://) are refused;
    two objects whose keys differ only by a doubled '/' are two files (a local path's resolve() merged them)."""
    from packprep.config import Source, merge
    from packprep.mixture import resolve

    fs, local = s3
    config = tmp_path / "mix.toml"
    config.write_text('seq_len = 256\nshard_rows = 150\n[[sources]]\npaths = ["s3://corp/in/a.jsonl"]\nweight = 0.7\n'
                      '[[sources]]\npaths = ["s3://corp/in/b.jsonl.gz"]\nweight = 0.3\n')
    m = build(merge(config, out=str(tmp_path / "out"), workers=1)).manifest
    sources = m["counts"]["sources"]
    assert [s["paths"] for s in sources] == [["s3://corp/in/a.jsonl"], ["s3://corp/in/b.jsonl.gz"]]
    for s, w in zip(sources, (0.7, 0.3)):
        assert abs(s["share"] - w) < 1e-3, (s["share"], w)
    assert sum(s["tokens"] for s in sources) == m["counts"]["tokens"] and all(s["docs"] for s in sources)
    report = verify(tmp_path / "out")
    assert report.ok, report.failures
    def sources(*paths):
        return tuple(Source(paths=(p,), weight=1.0) for p in paths)

    with pytest.raises(ValueError, match="give each file to one source"):
        resolve(sources("s3://corp/in/a.jsonl", "s3a://corp/in/*.jsonl"))
    for key in ("x//a.jsonl", "x/a.jsonl"):
        fs.pipe(f"corp/twin/{key}", (local / "a.jsonl").read_bytes())
    twins = ["s3://corp/twin/x//a.jsonl", "s3://corp/twin/x/a.jsonl"]
    assert [[str(f) for f, _ in files] for files in resolve(sources(*twins))] == [[twins[0]], [twins[1]]]


def test_ray_without_a_shared_filesystem(s3, reference, tmp_path, monkeypatch):
    """PACKPREP_TEST_SHIP makes every Ray task behave as on another host: it spools to its own folder with its own
    copy of the tokenizer, and the driver receives the spool files through Ray's object store."""
    ray = pytest.importorskip("ray")
    fs, _ = s3
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PACKPREP_TEST_SHIP": "1"}})
    try:
        m = build(BuildConfig(inputs=("s3://corp/in/*.jsonl*",), out="s3://corp/builds/ray", executor="ray",
                              work_dir=str(tmp_path / "work"), **SETTINGS)).manifest
    finally:
        ray.shutdown()
    assert _remote_digests(fs, "corp/builds/ray") == reference and m["counts"]["input_docs"] == 3000
    import shutil
    import socket
    import tempfile

    spool = tmp_path / "work" / ".packprep-work" / "spool"  # the driver's spool, named in the tasks' own folder
    key = hashlib.sha256(f"{socket.gethostname()}:{spool}".encode()).hexdigest()[:16]
    shipped = Path(tempfile.gettempdir()) / "packprep-ship" / key
    assert (shipped / "tokenizer" / "tokenizer.json").is_file()  # the tasks ran on their own copy of the tokenizer
    assert shipped.is_dir() and not list((shipped / "spool").iterdir())  # and their spool files were shipped away
    shutil.rmtree(shipped)


@pytest.fixture(scope="module")
def remote_build(s3, tmp_path_factory) -> str:
    url = "s3://corp/builds/for-export"
    build(BuildConfig(inputs=("s3://corp/in/*.jsonl*",), out=url, workers=1,
                      work_dir=str(tmp_path_factory.mktemp("work")), **SETTINGS))
    return url


@pytest.mark.parametrize("fmt", ["megatron", "mds"])
def test_export_from_and_to_s3(fmt, s3, remote_build, tmp_path):
    """`packprep export s3://... --out s3://...`: the same files as a local export of the staged build, export.json
    last, a rerun answered from the remote manifest, another export refused unless --overwrite."""
    from packprep.exports import MANIFEST, export
    from packprep.remote import EXPORT_IDENTITY

    fs, _ = s3
    local = export(stage(remote_build, tmp_path / "staged"), fmt, tmp_path / "local", fsync=False)
    url = f"s3://corp/exports/{fmt}"
    lines = []
    m = export(remote_build, fmt, url, fsync=False, work_dir=tmp_path / "work", echo=lines.append)
    assert m["source"] == remote_build and m["files"] == local["files"] and lines[-1] == f"published to {url}"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(url)}
    assert names == {*local["files"], MANIFEST} and EXPORT_IDENTITY not in names
    for name in local["files"]:
        assert fs.cat_file(f"{url}/{name}") == (tmp_path / "local" / name).read_bytes(), name
    assert json.loads(fs.cat_file(f"{url}/{MANIFEST}")) == m
    lines.clear()
    assert export(remote_build, fmt, url, echo=lines.append) == m and lines == [f"{url} already holds this export"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(remote_build, "olmo", url)
    assert export(remote_build, "olmo", url, fsync=False, overwrite=True)["format"] == "olmo"
    assert not [n for n in fs.ls(url) if n.endswith((".bin", ".idx", ".mds"))]  # the other export is gone


def test_export_publish_interrupted_resumes(s3, remote_build, tmp_path, monkeypatch):
    """A publish that dies after some uploads leaves no export.json; the rerun sends only what is missing."""
    from packprep import remote
    from packprep.exports import MANIFEST, export
    from packprep.remote import EXPORT_IDENTITY

    fs, _ = s3
    url, sent, real = "s3://corp/exports/killed", [], remote.Uploader._put

    def dying_put(self, name, record=None):  # uploads run in 4 threads: which ones get through is fixed by name
        if name not in ("token_ids_part_0000.npy", "labels_mask_part_0000.npy"):
            raise ConnectionError("network gone")
        sent.append(name)
        real(self, name, record)

    monkeypatch.setattr(remote.Uploader, "_put", dying_put)
    with pytest.raises(ConnectionError):
        export(remote_build, "olmo", url, fsync=False, work_dir=tmp_path / "work")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(url)}
    assert {EXPORT_IDENTITY, remote.PROGRESS} <= names and MANIFEST not in names and len(names) == 4
    first = list(sent)
    sent.clear()
    monkeypatch.setattr(remote.Uploader, "_put", lambda self, name, record=None: (sent.append(name),
                                                                                   real(self, name, record)))
    m = export(remote_build, "olmo", url, fsync=False, work_dir=tmp_path / "work")
    assert not set(first) & set(sent) and sent[-1] == MANIFEST  # nothing sent twice; the manifest last
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(url)} == {*m["files"], MANIFEST}


def test_cli_export_remote_build(s3, remote_build, tmp_path):
    from typer.testing import CliRunner

    from packprep.cli import app

    r = CliRunner().invoke(app, ["export", remote_build, "--to", "litdata", "--out", str(tmp_path / "lit")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "lit" / "export.json").read_text())["source"] == remote_build
    r = CliRunner().invoke(app, ["export", "s3://corp/builds/none", "--to", "olmo", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no packprep.json" in r.output and "Traceback" not in r.output
