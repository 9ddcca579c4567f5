"""The cache folder: what one build may reuse from an earlier one, each file named by a key of what decides it.

    folder = cache_dir()                  # $PACKPREP_CACHE, else $XDG_CACHE_HOME/packprep, else ~/.cache/packprep
    verdict = read_verdict(key)           # None when absent, unreadable or corrupt
    write_verdict(key, {"backend": "tiktoken", "why": ...})
    head, ranks = read_table(key)         # a tiktoken rank table ({token bytes: id}) and its head, or None
    write_table(key, head, ranks)

Owns two kinds of file:
  backend-<key>.json   the `--tokenizer-backend auto` verdict for one (tokenizer, sample of records, flags, versions)
  ranks-<key>.npz      the tiktoken rank table built from one tokenizer.json (the key: its sha256 and the builder's
                       version): the tokens' bytes back to back, their ends and ids, the head (the tokenizer.json
                       without vocabulary and merges, as JSON), and a sha256 of those arrays (a file whose arrays do
                       not hash to it is ignored)

Nothing here decides a byte of the output: a missing, unreadable, corrupt or foreign file is ignored (as absent) and
written again; an unwritable folder only costs the reuse; deleting the folder is always safe. Writes go to a
temporary name, then rename. Cost: one small read per build for the verdict; a fraction of a second to load a
151k-token rank table (instead of seconds to parse and check its tokenizer.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

VERSION = 1  # of the files' layout; part of every key
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # json, np.load and zip errors


def cache_dir() -> Path:
    """$PACKPREP_CACHE, else $XDG_CACHE_HOME/packprep, else ~/.cache/packprep."""
    if os.environ.get("PACKPREP_CACHE"):
        return Path(os.environ["PACKPREP_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "packprep"


def key(*parts) -> str:
    """A file key for JSON-able parts: key("abc", 1) -> 32 hex digits (sha256 of the parts and VERSION)."""
    return hashlib.sha256(json.dumps([VERSION, *parts], sort_keys=True).encode()).hexdigest()[:32]


def read_verdict(k: str) -> dict | None:
    try:
        found = json.loads((cache_dir() / f"backend-{k}.json").read_text())
    except _UNREADABLE:
        return None
    ok = isinstance(found, dict) and found.get("key") == k and found.get("backend") in ("hf", "tiktoken")
    return found if ok and isinstance(found.get("why"), str) else None


def write_verdict(k: str, verdict: dict) -> None:
    _write(f"backend-{k}.json", json.dumps({**verdict, "key": k}).encode())


def read_table(k: str) -> tuple[dict, dict[bytes, int]] | None:
    """(head, ranks) as `write_table` stored them under this key, or None."""
    try:
        with np.load(cache_dir() / f"ranks-{k}.npz", allow_pickle=False) as f:
            head, blob, ends, ids, digest = f["head"], f["blob"], f["ends"], f["ids"], str(f["sha256"])
        if digest != _digest(head, blob, ends, ids) or len(ends) != len(ids) or (len(ends) and ends[-1] != len(blob)):
            return None
        head = json.loads(head.tobytes())
    except _UNREADABLE:
        return None
    data, starts = blob.tobytes(), [0, *ends[:-1].tolist()]
    return head, {data[a:b]: i for a, b, i in zip(starts, ends.tolist(), ids.tolist())}


def write_table(k: str, head: dict, ranks: dict[bytes, int]) -> None:
    """Store a tiktoken rank table ({token bytes: id}) and a small JSON-able head under key k."""
    head = np.frombuffer(json.dumps(head).encode(), np.uint8)
    blob = np.frombuffer(b"".join(ranks), np.uint8)
    ends = np.cumsum(np.fromiter(map(len, ranks), np.int64, len(ranks)))
    ids = np.fromiter(ranks.values(), np.int64, len(ranks))
    buf = io.BytesIO()
    np.savez(buf, head=head, blob=blob, ends=ends, ids=ids, sha256=np.array(_digest(head, blob, ends, ids)))
    _write(f"ranks-{k}.npz", buf.getvalue())


def _digest(head: np.ndarray, blob: np.ndarray, ends: np.ndarray, ids: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (head, blob, ends.astype("<i8"), ids.astype("<i8")):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write(name: str, data: bytes) -> None:
    """Write `name` in the cache folder atomically; a folder that cannot be written only loses the reuse."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / name)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
