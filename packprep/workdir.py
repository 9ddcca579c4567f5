"""The output folder's build protocol: the lock, the build identity, resume, stale temp files, a full disk.

    with locked(out):                                   # one build per folder; ENOSPC -> DiskFullError (one line)
        old = check_out(out, config, ident)             # a finished build of the same identity -> its manifest
        resumed = prepare(out, ident, overwrite, log)   # OUT/.packprep-work/build.json; finished work kept or not
        ...
        finish(out)                                     # after the manifest: the work folder goes

A build is a set of tasks whose outputs are written under a temporary name and renamed, each with a `.done.json`
marker last (their formats live with their stages: `spool`, `layout`, `write`); the manifest comes last of all, so a
folder without it is unfinished. The work folder records the identity its work was made with (settings that change
bytes, the task split, input fingerprints, the tokenizer's content): the same identity is resumed, another one is
refused while it holds finished tasks, unless --overwrite. Either way `*.tmp*` files of killed writers are deleted
before anything runs: only packprep's own names (`OWN_FILE`), so a user's `notes.tmp.txt` in OUT stays. On a
finished build, `check_shards` compares the shards with the manifest (sizes; sha256 with --check full). The on-error
mode is not part of the identity: a task finished under raise had no bad record, so it is the same under skip (the
build redoes, under raise, the tasks that set records aside under skip). Cost: a glob of the work folder (the input
content hashes are computed by `inputs.fingerprint`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

from packprep.config import BuildConfig
from packprep.report import Progress
from packprep.shards import MANIFEST, write_json_atomic

WORK = ".packprep-work"
# The only files a build writes in OUT (beside WORK): shards, metadata, manifest, rejects, and their temp names.
OWN_FILE = re.compile(r"(data-\d{5,}-of-\d{5,}\.arrow|state\.json|dataset_info\.json|packprep\.json|rejects\.jsonl)"
                      r"(\.tmp\d+)?")


class DiskFullError(OSError):
    """The output's filesystem ran out of space; the folder is left resumable."""


class BuildLockedError(OSError):
    """Another build is writing to the same output folder."""


def path(out: Path) -> Path:
    return out / WORK


def identity(config: BuildConfig, fingerprints: list[dict], task_plan: int, tokenizer: str | None) -> dict:
    """What a build's output depends on, as JSON: settings that change bytes, the task split, input fingerprints and
    the tokenizer's content (a tokenizer retrained in place at the same path is a different build)."""
    keys = config.output_keys()
    keys.pop("on_error")  # a task that finished had no bad record under raise: the same output under skip
    return json.loads(json.dumps({"config": keys, "chunk_bytes": config.chunk_bytes,
                                  "task_plan": task_plan, "inputs": fingerprints, "tokenizer": tokenizer}))


def _differences(old: dict, new: dict) -> list[str]:
    """['seq_len: 1024 -> 128', 'the inputs (...)'] between two identities (chunk_bytes does not change a byte)."""
    keys = sorted(set(old["config"]) | set(new["config"]))
    diff = [f"{k}: {old['config'].get(k)!r} -> {new['config'].get(k)!r}" for k in keys
            if old["config"].get(k) != new["config"].get(k)]
    if old.get("inputs") != new["inputs"] and old["config"].get("inputs") == new["config"].get("inputs"):
        diff.append("the input files changed (size or content)")
    if None not in (old.get("tokenizer"), new.get("tokenizer")) and old["tokenizer"] != new["tokenizer"]:
        diff.append(f"the tokenizer's files changed (sha256 {old['tokenizer'][:12]}... -> {new['tokenizer'][:12]}...)")
    return diff


def same_build(manifest: dict, ident: dict, where: str = MANIFEST, on_error: str | None = None) -> list[str]:
    """What differs between a finished build's manifest and this build's identity ([]: the same build). on_error is
    not part of the identity (a finished task had no bad record under raise), except that a build which set records
    aside under skip is not the same output under raise."""
    try:
        old_config = BuildConfig(**manifest["config"])
        old_id = {"config": old_config.output_keys(), "inputs": manifest["inputs"]["specs"],
                  "tokenizer": manifest["tokenizer"]["sha256"]}
        old_id["config"].pop("on_error")
        rejected = int(manifest["counts"]["rejected"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # another version's manifest, or edited by hand
        raise ValueError(f"{where} is not a manifest this packprep version reads ({e!r}); pass --overwrite to "
                         "replace that build or choose another --out") from None
    diff = _differences(old_id, ident)
    if on_error is not None and rejected and old_config.on_error != on_error:  # under raise, a reject stops a build
        diff.append(f"on_error: {old_config.on_error!r} -> {on_error!r} (that build set {rejected} record(s) aside)")
    return diff


def _is_ours(out: Path) -> bool:
    """An unfinished packprep build: its work folder, or (a build whose removal by --overwrite was cut short) the
    dataset_info.json packprep writes. A plain `datasets.save_to_disk` folder is not ours: its shards stay."""
    if (out / WORK).exists():
        return True
    try:
        return json.loads((out / "dataset_info.json").read_text()).get("description") == "packprep build"
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, config: BuildConfig, ident: dict) -> dict | None:
    """None: go ahead. A manifest: the same build is already finished. Raises on a folder that is not ours, and
    on a finished build of other settings or inputs unless --overwrite (which removes that build first)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError as e:  # not JSON: same_build names it
            old = {"unreadable": repr(e)}
        try:
            diff = same_build(old, ident, str(manifest_path), config.on_error)
        except ValueError:
            if not config.overwrite:
                raise
            old, diff = {}, ["an unreadable manifest"]
        if not diff:
            return old
        if not config.overwrite:
            raise FileExistsError(f"{out} holds a finished build with different settings ({'; '.join(diff)}); "
                                  "pass --overwrite or choose another --out")
        _remove_build(out, old)
    elif any(out.iterdir()) and not _is_ours(out):
        raise FileExistsError(f"--out {out} exists, is not empty and is not a packprep output folder; "
                              "choose another --out")
    return None


def _remove_build(out: Path, manifest: dict) -> None:
    (out / MANIFEST).unlink(missing_ok=True)  # first: from here on the folder is an unfinished build
    for s in manifest.get("shards", []):
        if isinstance(s, dict) and OWN_FILE.fullmatch(str(s.get("file"))):
            (out / s["file"]).unlink(missing_ok=True)
    for name in ("state.json", "dataset_info.json", "rejects.jsonl"):
        (out / name).unlink(missing_ok=True)


def prepare(out: Path, ident: dict, overwrite: bool, progress: Progress) -> bool:
    """Keep an unfinished build's work folder when it was made with the same identity (finished tasks are reused:
    returns True). One of other settings or inputs that holds finished tasks is refused unless --overwrite (hours of
    tokenizing are not thrown away by a mistyped flag); one with none (e.g. it stopped at a bad input in its first
    task) or differing only in chunk size restarts. Either way stale temporary files of killed writers are removed,
    so no half-written file is ever taken up."""
    work = out / WORK
    marker = work / "build.json"
    old = json.loads(marker.read_text()) if marker.is_file() else None
    keep = old is not None and old == ident
    if old is not None and not keep:
        diff = _differences(old, ident)
        finished = sum(1 for _ in work.glob("*/*.done.json"))
        if diff and finished and not overwrite:
            raise FileExistsError(f"{out} holds an unfinished build of different settings ({'; '.join(diff)}) with "
                                  f"{finished} finished task(s); rerun the same command to resume it, or pass "
                                  "--overwrite to discard it")
        if finished:
            progress.log(f"{out}: discarding an unfinished build of other settings "
                         f"({'; '.join(diff) or 'chunk size or task plan'})")
    if not keep:
        marker.unlink(missing_ok=True)  # first: a half-deleted work folder is never taken for a reusable one
        shutil.rmtree(work, ignore_errors=True)
        for p in out.glob("data-*-of-*.arrow*"):  # shards of the discarded run (none is finished: no manifest)
            if OWN_FILE.fullmatch(p.name):
                p.unlink(missing_ok=True)
    for p in [*out.glob("*.tmp*"), *work.rglob("*.tmp*")]:  # writers killed mid-file: never a finished output
        if p.parent != out or OWN_FILE.fullmatch(p.name):  # a user's notes.tmp.txt in OUT stays
            p.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not keep:
        write_json_atomic(marker, ident)
    return keep


def check_shards(out: Path, manifest: dict, full: bool) -> list[str]:
    """The shards of a finished build that are not what its manifest records: missing, another size, or (full)
    another sha256. ['data-00001-of-00004.arrow: missing', ...]"""
    from packprep.shards import sha256_file

    bad = []
    for s in manifest.get("shards", []):
        p = out / s["file"]
        if not p.is_file():
            bad.append(f"{s['file']}: missing")
        elif p.stat().st_size != s["bytes"]:
            bad.append(f"{s['file']}: {p.stat().st_size:,} bytes, the manifest records {s['bytes']:,}")
        elif full and sha256_file(p) != s["sha256"]:
            bad.append(f"{s['file']}: sha256 differs from the manifest's")
    return bad


def finish(out: Path) -> None:
    """Remove the work folder (after the manifest: from then on the build is finished)."""
    shutil.rmtree(out / WORK, ignore_errors=True)


@contextlib.contextmanager
def locked(out: Path):
    """One build at a time per output folder: an exclusive flock on the folder itself, released when the build
    ends or dies (a requeued job that starts while the old one still runs must not delete its temp files). A full
    disk inside becomes one DiskFullError line that says how to resume."""
    try:
        with _flock(out):
            yield
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        free = shutil.disk_usage(out if out.exists() else out.parent).free
        full = DiskFullError(f"disk full writing {e.filename or out}: {free:,} bytes free on {out}'s filesystem; "
                             "free space and rerun the same command to resume (finished tasks are kept)")
        full.errno = errno.ENOSPC
        raise full from None


@contextlib.contextmanager
def _flock(out: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BuildLockedError(f"another packprep build is writing to {out}; wait for it to end (or stop it), "
                                   "then rerun") from None
        except OSError:  # pragma: no cover - a filesystem without locks: go on unguarded
            pass
        yield
    finally:
        os.close(fd)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a build that failed before writing anything leaves no empty folder


def kill_hook(point: str) -> None:
    """Test hook for the crash tests: PACKPREP_TEST_KILL_AT=tokenize:3 | pack | write:1 | shard:0 SIGKILLs this
    process there (after the 3rd tokenize result, after the plan is saved, after the 1st shard, mid-shard 0)."""
    if os.environ.get("PACKPREP_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
