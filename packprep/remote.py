"""Remote output (`--out s3://bucket/prefix`, any fsspec store): the build runs in a local work folder and is
published object by object, with the manifest last.

    local = work_dir(config)                       # --work-dir, or <tmp>/packprep-work/<sha of the URL>
    previous = check(url, ident, overwrite)         # a finished remote build of the same identity -> its manifest
    with Uploader(url, local, ident) as up:         # .packprep-build.json (the identity) goes up first
        up.shard(info)                              # each finished shard ({"file", "bytes", "sha256"}), in the
                                                    # background, under its final name; then the progress record
        up.finish(["state.json", ...])              # waits for the shards, then metadata, then packprep.json

The remote manifest is the commit point, as the local one is: a prefix without it is unfinished. After each finished
shard upload, .packprep-progress.json (next to the shards) records it: {"build": sha256 of the identity, "shards":
{name: {"bytes", "sha256"}}}. A rerun of a killed build, on this host (its --work-dir resumes the tokenize and write
stages) or on a fresh one (an empty --work-dir: it tokenizes, packs and writes the shards again, locally, which is
the whole build's cost but the uploads), skips a shard only when its record has this build's fingerprint, the
sha256 and size of the bytes just written, and the object has that size; every other object is uploaded again, so a
half-uploaded one is overwritten. Once the manifest is up the record is removed (and ignored where a kill left it).

`packprep export` to a remote --out publishes the same way (`publish_export`: its files, then export.json).
Readers of a remote build (`verify`, `inspect`, the trainer) use `stage`, which copies the build's files to a local
cache once (skipping files already there with their size); `datasets.load_from_disk(url, storage_options=...)` reads
the prefix through fsspec directly. With Ray, `Shipped` moves tokenize outputs back to the driver through Ray's object
store, so a cluster needs no shared filesystem. Costs: one upload per output file (4 in flight), a listing and one
small read on start, and one rewrite of the progress record per shard (~100 bytes per recorded shard: a few MB per
rewrite at 10k shards of 256 MB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from packprep import storage
from packprep.shards import MANIFEST
from packprep.workdir import kill_hook

IDENTITY = ".packprep-build.json"  # the identity of the build being published (removed once the manifest is up)
PROGRESS = ".packprep-progress.json"  # the shards whose upload finished (removed once the manifest is up)
OURS = {MANIFEST, "state.json", "dataset_info.json", "rejects.jsonl", IDENTITY, PROGRESS}


def work_dir(config) -> Path:
    if config.work_dir:
        return Path(config.work_dir)
    key = hashlib.sha256(config.out.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "packprep-work" / key


def _names(fs, root: str) -> dict[str, int]:
    """name -> size of the objects directly under the prefix ({} when it does not exist)."""
    try:
        return {p["name"].rstrip("/").rsplit("/", 1)[-1]: int(p.get("size") or 0)
                for p in fs.ls(root, detail=True) if p.get("type") != "directory"}
    except FileNotFoundError:
        return {}


def check(url: str, ident: dict, overwrite: bool) -> dict | None:
    """A finished remote build with this identity: its manifest (nothing to do). Another build's manifest, or an
    unfinished one of other settings, is refused unless --overwrite (which deletes it, manifest first); a prefix that
    holds other objects is refused."""
    from packprep.workdir import same_build

    fs, root = storage.filesystem(url)
    names = _names(fs, root)
    strangers = sorted(n for n in names if n not in OURS and not n.startswith("data-"))
    if strangers:
        raise FileExistsError(f"--out {url} holds objects that are not a packprep build ({strangers[:3]}); "
                              "choose another --out")
    if MANIFEST in names:
        old = json.loads(fs.cat_file(storage.join(root, MANIFEST)))
        diff = same_build(old, ident, storage.join(url, MANIFEST))
        if not diff:
            return old
        if not overwrite:
            raise FileExistsError(f"{url} holds a finished build with different settings ({'; '.join(diff)}); "
                                  "pass --overwrite or choose another --out")
    elif IDENTITY in names:
        old = json.loads(fs.cat_file(storage.join(root, IDENTITY)))
        if old != ident and any(n.startswith("data-") for n in names) and not overwrite:
            raise FileExistsError(f"{url} holds an unfinished build of different settings; rerun its command to "
                                  "resume it, or pass --overwrite to discard it")
    else:
        return None
    if overwrite or (MANIFEST not in names and old != ident):
        for n in [MANIFEST, *sorted(set(names) - {MANIFEST})]:  # the manifest first: from then on it is unfinished
            fs.rm_file(storage.join(root, n))
    return None


class Uploader:
    """Publishes a local build folder to `url`: shards as they finish (4 uploads in flight), each recorded in the
    progress record once up, the manifest last."""

    def __init__(self, url: str, local: Path, ident: dict, manifest: str = MANIFEST, identity_name: str = IDENTITY):
        self.fs, self.root, self.local = *storage.filesystem(url), Path(local)
        self.manifest, self.identity = manifest, identity_name  # `packprep export` publishes export.json
        self.fs.makedirs(self.root, exist_ok=True)
        self.there = _names(self.fs, self.root)
        self.build = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        self.done = self._recorded()
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="upload")
        self.pending, self.sent, self.lock = [], set(), threading.Lock()
        with self.fs.open(storage.join(self.root, self.identity), "w") as f:
            json.dump(ident, f)

    def _recorded(self) -> dict[str, dict]:
        """The progress record's shards of this build whose objects have the recorded size ({} when there is no
        record, it is another build's or unreadable, or the manifest is already up)."""
        if PROGRESS not in self.there or self.manifest in self.there:
            return {}
        try:
            record = json.loads(self.fs.cat_file(storage.join(self.root, PROGRESS)))
            shards = record["shards"] if record["build"] == self.build else {}
            return {n: {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])} for n, v in shards.items()
                    if self.there.get(n) == int(v["bytes"])}
        except (ValueError, KeyError, TypeError, AttributeError, FileNotFoundError):
            return {}

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)

    def shard(self, info: dict) -> None:
        """Upload a finished shard (`info`: its "file", "bytes" and "sha256") under its own name, unless the
        progress record has it with those bytes and the object has that size."""
        name = info["file"]
        if name in self.sent:
            return
        self.sent.add(name)
        have = {"bytes": int(info["bytes"]), "sha256": info["sha256"]}
        with self.lock:
            if self.done.get(name) == have:
                return
            if self.done.pop(name, None) is not None:  # recorded with other bytes: not finished any more
                self._save()
        self.pending.append(self.pool.submit(self._put, name, have))

    def _put(self, name: str, record: dict | None = None) -> None:
        self.fs.put_file(str(self.local / name), storage.join(self.root, name), **_parallel_parts(self.fs))
        if record is not None:
            with self.lock:
                self.done[name] = record
                self._save()
            kill_hook(f"uploaded:{name}")  # test hook: dies with this shard recorded, others maybe in flight

    def _save(self) -> None:
        self.fs.pipe_file(storage.join(self.root, PROGRESS),
                          json.dumps({"build": self.build, "shards": self.done}, sort_keys=True).encode())

    def finish(self, names: list[str]) -> None:
        """Wait for the shard uploads, then put `names` (metadata), then the manifest: the commit point."""
        for f in self.pending:
            f.result()
        for name in names:
            self._put(name)
        stale = [n for n in self.there if n.startswith("data-") and not (self.local / n).exists()]
        for n in stale:  # shards of an earlier, discarded run under other names (no manifest referenced them)
            self.fs.rm_file(storage.join(self.root, n))
        self._put(self.manifest)
        for n in (self.identity, PROGRESS):
            try:
                self.fs.rm_file(storage.join(self.root, n))
            except FileNotFoundError:  # no shard was uploaded: no record
                pass


def _parallel_parts(fs) -> dict:
    """put_file options that send a large file as concurrent multipart parts where the store's fsspec has them
    (s3fs: 16 MiB parts, 4 in flight, instead of 50 MiB parts one at a time)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return {"chunksize": 16 << 20, "max_concurrency": 4} if {"s3", "s3a"} & set(protocols) else {}


def stage(url: str, cache: str | Path | None = None) -> Path:
    """A local copy of a finished remote build (a local path is returned as it is), for readers that memory-map.
    Files already in the cache with their remote size are not fetched again."""
    if not storage.is_remote(url):
        return Path(url)
    fs, root = storage.filesystem(url)
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    local = Path(cache) if cache else Path(tempfile.gettempdir()) / "packprep-cache" / key
    local.mkdir(parents=True, exist_ok=True)
    names = _names(fs, root)
    if MANIFEST not in names:
        raise FileNotFoundError(f"{url}: no {MANIFEST} (not a finished packprep build); run `packprep build` first")
    manifest = json.loads(fs.cat_file(storage.join(root, MANIFEST)))
    try:
        same = json.loads((local / MANIFEST).read_text())["fingerprint"] == manifest["fingerprint"]
    except (OSError, ValueError, KeyError):
        same = False
    for name, size in names.items():
        if name in (IDENTITY, PROGRESS) or (same and (local / name).is_file()
                                            and (local / name).stat().st_size == size):
            continue
        part = local / f"{name}.part{os.getpid()}"  # ranks of one job may stage the same build at once
        fs.get_file(storage.join(root, name), str(part))
        part.replace(local / name)
    for p in local.glob("data-*"):
        if p.name not in names:
            p.unlink()
    return local


# ---------------------------------------------------------------------------------------------------- packprep export

EXPORT_IDENTITY = ".packprep-export.json"  # on a remote export's prefix until its manifest is up


def check_export(url: str, identity: dict, overwrite: bool, manifest: str) -> dict | None:
    """`check` for `packprep export`: the manifest of a finished export of this identity at `url`, else None (start,
    or resume an unfinished one of this identity); other objects are refused unless `overwrite` (which deletes them,
    the manifest first)."""
    fs, root = storage.filesystem(url)
    names = _names(fs, root)
    if manifest in names:
        m = json.loads(fs.cat_file(storage.join(root, manifest)))
        if not overwrite and {k: m.get(k) for k in identity} == identity:
            return m
    elif not names:
        return None
    elif EXPORT_IDENTITY in names and not overwrite:
        if json.loads(fs.cat_file(storage.join(root, EXPORT_IDENTITY))) == identity:
            return None
    if not overwrite:
        raise FileExistsError(f"--out {url} holds other objects or another export; choose another --out or pass "
                              "--overwrite")
    for n in sorted(names, key=lambda n: n != manifest):  # the manifest first: from then on it is unfinished
        fs.rm_file(storage.join(root, n))
    return None


def publish_export(url: str, local: Path, export_manifest: dict, manifest: str) -> None:
    """Upload a finished local export: its files (4 in flight; an object already there with the local size is not
    sent again when the progress record has its size and sha256), then its manifest, the commit point."""
    identity = {k: export_manifest[k] for k in ("format", "format_version", "build_fingerprint", "options")}
    with Uploader(url, local, identity, manifest=manifest, identity_name=EXPORT_IDENTITY) as up:
        for name in export_manifest["files"]:
            with open(local / name, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            up.shard({"file": name, "bytes": (local / name).stat().st_size, "sha256": digest})
        up.finish([])


# ---------------------------------------------------------------------------------------------------- Ray, no shared fs


@dataclass(frozen=True)
class Shipped:
    """A tokenize context for Ray nodes that do not share the driver's disk: the tokenizer's files travel with it,
    and a task run on another host spools to a folder of its own and returns its spool files to the driver (Ray's
    object store carries them, ~5 bytes per token); `receive` puts them in the driver's spool. Write tasks then run
    on the driver's host, so no node needs the driver's work folder."""

    ctx: object  # tokenizer.TokenizeContext
    host: str
    tokenizer_files: dict

    @classmethod
    def of(cls, ctx) -> Shipped:
        files = {p.name: p.read_bytes() for p in Path(ctx.tokenizer).iterdir() if p.is_file()}
        return cls(ctx, socket.gethostname(), files)


def shipped_tokenize(task, shipped: Shipped):
    """tokenize_task on any node: (its result, None) on the driver's host, else (result, {file name: bytes})."""
    from packprep import spool
    from packprep.tokenizer import tokenize_task

    if socket.gethostname() == shipped.host and not os.environ.get("PACKPREP_TEST_SHIP"):
        return tokenize_task(task, shipped.ctx), None
    key = hashlib.sha256(f"{shipped.host}:{shipped.ctx.spool}".encode()).hexdigest()[:16]
    here = Path(tempfile.gettempdir()) / "packprep-ship" / key
    tok = here / "tokenizer"
    if not (tok / "done").exists():  # the tokenizer's files, written once per node
        tok.mkdir(parents=True, exist_ok=True)
        for name, data in shipped.tokenizer_files.items():
            (tok / name).write_bytes(data)
        (tok / "done").touch()
    folder = here / "spool"
    folder.mkdir(parents=True, exist_ok=True)
    result = tokenize_task(task, replace(shipped.ctx, tokenizer=str(tok), spool=str(folder)))
    files = {}
    for p in spool.paths(folder, task.index).values():
        if p.exists():
            files[p.name] = p.read_bytes()
            p.unlink()
    return result, files


def receive(shipped_result, spool_dir: Path):
    """The driver's side of `shipped_tokenize`: write returned spool files (the marker last), return the result."""
    from packprep.shards import atomic_file

    result, files = shipped_result
    for name in sorted(files or {}, key=lambda n: n.endswith(".done.json")):
        with atomic_file(Path(spool_dir) / name) as f:
            f.write(files[name])
    return result


def publish(uploader: Uploader, out: Path, manifest: dict) -> None:
    """The remote output's last steps: every shard up (those already there are skipped), metadata, manifest last."""
    with uploader:
        for s in manifest["shards"]:
            uploader.shard(s)
        uploader.finish([n for n in ("rejects.jsonl", "dataset_info.json", "state.json") if (out / n).is_file()])


def clean_local(out: Path, work_dir: str | None) -> None:
    """A published build's local copy goes: the default work folder whole, a --work-dir's build files."""
    if not work_dir:
        shutil.rmtree(out, ignore_errors=True)
        return
    from packprep import workdir

    workdir.finish(out)
    for p in [*out.glob("data-*-of-*.arrow"), *(out / n for n in ("state.json", "dataset_info.json", MANIFEST,
                                                                  "rejects.jsonl"))]:
        p.unlink(missing_ok=True)
