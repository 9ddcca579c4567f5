"""Inputs: input specs -> files -> read tasks, and what identifies them.

    files = resolve_inputs(["data/*.jsonl", "hf_folder/"])          # globs, folders, HF save_to_disk folders
    tasks = plan_tasks(files, chunk_bytes=2 << 20)                  # fixed byte/row-group chunks, format per file
    for docs in read_task(tasks[0]): ...                            # packprep.readers: Docs batches

A task is a deterministic slice of one file (JSONL: a newline-aligned byte range of ~chunk_bytes; JSON arrays: a
range of whole elements; Parquet: row groups; Arrow: record batches; CSV: the whole file), so the split of work
depends only on the inputs and `chunk_bytes`, never on the number of workers. Planning costs, per file, a peek at
its first records (format detection) and its reader's cut (JSONL: one seek per chunk; JSON arrays: one byte scan;
Parquet/Arrow: the footer or batch headers). `fingerprint` and TASK_PLAN_VERSION are part of a build's identity.

Nothing is skipped without a word: `expand_inputs` returns the files a folder or glob held that it left out, each
with its reason (hidden, not an input format, metadata, not listed by a save_to_disk folder's state.json), which the
build logs and records in the manifest. Inputs are identified by content (`content_hash`: xxh3-128, or blake2b
without xxhash), not by size and mtime, which `cp -p` and `rsync -t` keep: a build reads every input once more for
it at the start, and once after tokenizing (`changed_inputs`), so an input changed under the build is an error,
not half a corpus.
With no inputs a build reads the embedded default corpus, `stdlib_corpus`.

Inputs may be fsspec URLs (`s3://corp/chat/*.jsonl.zst`, `gs://`, `az://`, `hf://`, `https://`; `packprep.storage`):
globs are expanded by the store's listing, a remote file is named by its URL, and its fingerprint is the store's
metadata (size and ETag, else mtime): one listing per spec. Compressed files (`a.jsonl.zst`) have the kind of the
name inside; the magic bytes decide the compression (`readers.compressed`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from packprep import storage
from packprep.readers import READERS, SUFFIXES, compressed, hf, json_array, jsonl
from packprep.readers.base import first_line, open_input
from packprep.records import Format, resolve_format

DEFAULT_CORPUS = "python-stdlib"  # the input name of the embedded default corpus
TASK_PLAN_VERSION = 3  # part of a build's identity: spool files of another plan are never reused
TAIL_CHUNKS, TAIL_SPLIT = 2, 4  # the last 2 chunks' worth of JSONL input is cut into quarter chunks


@dataclass(frozen=True)
class ReadTask:
    """One unit of tokenize work: records [start, stop) of one file (bytes, row groups or batches by kind)."""

    index: int
    path: str
    kind: str  # jsonl | json | parquet | arrow | csv: a key of packprep.readers.READERS
    start: int
    stop: int
    format: Format


# ---------------------------------------------------------------------------------------------------- files


@dataclass
class Expansion:
    """What input specs expand to: the files taken, (file, kind), and every file or folder left out, (path, reason)."""

    files: list[tuple[Path | str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)


def resolve_inputs(inputs) -> list[tuple[Path | str, str]]:
    """Expand paths, globs, folders and HF save_to_disk folders into (file, kind) in a stable order (a local file as
    a Path, a remote one as its URL)."""
    return expand_inputs(inputs).files


def expand_inputs(inputs) -> Expansion:
    """`resolve_inputs` plus the files it left out and why (nothing is skipped without a word): hidden names, files
    of no input format, HF metadata files outside a save_to_disk folder, files a save_to_disk folder does not list.
    Names starting with '_' are read like any other."""
    exp = Expansion()
    for spec in inputs:
        spec = str(spec)
        if storage.is_remote(spec):
            exp.files += _resolve_remote(spec)
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no input matches {spec!r}")
            for m in matches:
                _expand(Path(m), exp)
        else:
            p = Path(spec)
            if not p.exists():
                raise FileNotFoundError(f"input not found: {spec}")
            _expand(p, exp, explicit=True)
    if not exp.files:
        left = f"; left out: {_ignored_line(exp.ignored)}" if exp.ignored else ""
        raise ValueError(f"no input files found in {', '.join(map(str, inputs))} "
                         f"(looked for {', '.join(sorted(SUFFIXES))}){left}")
    return exp


def _ignored_line(ignored: list[tuple[str, str]], limit: int = 5) -> str:
    more = f" and {len(ignored) - limit} more" if len(ignored) > limit else ""
    return "; ".join(f"{p} ({why})" for p, why in ignored[:limit]) + more


def _resolve_remote(spec: str) -> list[tuple[str, str]]:
    fs, path = storage.filesystem(spec)
    if any(c in path for c in "*?["):
        matches = sorted(fs.glob(path))
        if not matches:
            raise FileNotFoundError(f"no input matches {spec!r}")
        return [f for m in matches for f in _expand_remote(fs, m)]
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {spec}")
    return _expand_remote(fs, path, explicit=True)


def _expand_remote(fs, path: str, explicit: bool = False) -> list[tuple[str, str]]:
    """The remote twin of `_expand`: a file, a save_to_disk folder (state.json) or a folder listed in order."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if fs.isfile(path):
        kind = file_kind(name, storage.url(fs, path)) if explicit else _kind(name)
        return [(storage.url(fs, path), kind)] if kind and name not in hf.METADATA_FILES else []
    state = storage.join(path, "state.json")
    if fs.exists(state):
        files = json.loads(fs.cat_file(state))["_data_files"]
        return [(storage.url(fs, storage.join(path, f["filename"])), "arrow") for f in files]
    out = []
    for child in sorted(fs.ls(path, detail=False)):
        if not child.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")):
            out += _expand_remote(fs, child)
    return out


def _kind(name: str) -> str | None:
    """The reader kind of a file name, looking inside a compression suffix: 'a.jsonl.zst' -> 'jsonl'."""
    return SUFFIXES.get(Path(compressed.inner_name(name)).suffix.lower())


def file_size(f) -> int:
    if isinstance(f, Path):
        return f.stat().st_size
    fs, path = storage.filesystem(f)
    return fs.size(path)


def _expand(p: Path, exp: Expansion, explicit: bool = False) -> None:
    if p.is_file():
        if explicit:
            exp.files.append((p, file_kind(p.name, p)))
        elif p.name in hf.METADATA_FILES:
            exp.ignored.append((str(p), f"{p.name} is dataset metadata, not records (pass the file itself to read it)"))
        elif _kind(p.name) is None:
            exp.ignored.append((str(p), f"not an input format ({p.suffix or 'no extension'}; reads "
                                        f"{', '.join(sorted(SUFFIXES))}, optionally {', '.join(compressed.SUFFIXES)})"))
        else:
            exp.files.append((p, _kind(p.name)))
        return
    if not p.is_dir():
        exp.ignored.append((str(p), "not a regular file or folder"))
        return
    layout = hf.dataset_files(p)
    if layout is not None:
        data_files, unlisted = layout
        exp.files += [(f, "arrow") for f in data_files]
        exp.ignored += [(str(f), "not listed in the save_to_disk folder's state.json") for f in unlisted]
        return
    for child in sorted(p.iterdir()):
        if child.name.startswith("."):
            exp.ignored.append((str(child), "hidden name (pass it explicitly to read it)"))
        else:
            _expand(child, exp)


def check_apart(inputs, files: list[tuple[Path, str]], out: Path) -> None:
    """Refuse an output folder inside an input folder (a rerun would read its own shards) and an input inside the
    output folder (--overwrite would delete it)."""
    out = out.resolve()
    for spec in inputs:
        for p in (map(Path, glob.glob(str(spec), recursive=True)) if any(c in str(spec) for c in "*?[")
                  else [Path(spec)]):
            if p.is_dir() and out.is_relative_to(p.resolve()):
                raise ValueError(f"--out {out} lies inside the input folder {p}; a rerun would read the build's own "
                                 "shards as input: choose an --out outside it")
    for f, _ in files:
        if isinstance(f, Path) and f.resolve().is_relative_to(out):
            raise ValueError(f"input {f} lies inside --out {out}; move it out or choose another --out")


def file_kind(name: str, where) -> str:
    kind = _kind(name)
    if kind is None:
        suffix = Path(compressed.inner_name(name)).suffix
        raise ValueError(f"{where}: unknown input format {suffix or '(no extension)'!r}; expected one of "
                         f"{', '.join(sorted(SUFFIXES))}, optionally compressed ({', '.join(compressed.SUFFIXES)})")
    return kind


def fingerprint(spec: str, files: list[tuple[Path | str, str]] | None = None) -> dict:
    """What identifies an input for 'is this the same build?': path, size and content hash of every file it names
    (the content, not the mtime: `cp -p` and `rsync -t` keep size and mtime of a rewritten file). A remote file: URL,
    size and the store's ETag (else mtime), from one listing."""
    if spec == DEFAULT_CORPUS:
        return {"input": spec, "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}
    files = resolve_inputs([spec]) if files is None else files
    if storage.is_remote(spec):
        fs = storage.filesystem(spec)[0]
        return {"input": spec, "files": [[f, *storage.fingerprint_info(fs.info(storage.filesystem(f)[1]))]
                                         for f, _ in files]}
    return {"input": spec, "files": [[str(f), f.stat().st_size, content_hash(f)] for f, _ in files]}


def content_hash(path) -> str:
    """A fast hash of a file's bytes (xxh3-128 where xxhash is installed, else blake2b): 'xxh3:1f0c...'."""
    h, name = _hasher()
    with open(path, "rb") as f:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return f"{name}:{h.hexdigest()}"


def _hasher():
    try:
        import xxhash
    except ImportError:  # pragma: no cover - xxhash is a dependency; blake2b is the stdlib fallback
        return hashlib.blake2b(digest_size=16), "blake2b"
    return xxhash.xxh3_128(), "xxh3"


def changed_inputs(fingerprints: list[dict]) -> list[str]:
    """The files of `fingerprints` whose size or content differs now (or that are gone): 'a.jsonl (size 10 -> 4)'."""
    changed = []
    for fp in fingerprints:
        for path, size, digest in fp.get("files", []):
            if storage.is_remote(path):
                fs, key = storage.filesystem(path)
                now = storage.fingerprint_info(fs.info(key)) if fs.exists(key) else None
                if now != [size, digest]:
                    changed.append(f"{path} ({'deleted' if now is None else 'size or ETag changed'})")
                continue
            p = Path(path)
            if not p.is_file():
                changed.append(f"{path} (deleted)")
            elif p.stat().st_size != size:
                changed.append(f"{path} (size {size:,} -> {p.stat().st_size:,} bytes)")
            elif content_hash(p) != digest:
                changed.append(f"{path} (same size, other content)")
    return changed


# ---------------------------------------------------------------------------------------------------- tasks


def plan_tasks(files: list[tuple[Path, str]], *, chunk_bytes: int, format: str = "auto", **fields) -> list[ReadTask]:
    """Split files into read tasks and resolve each file's record format (raises on a missing field)."""
    tasks: list[ReadTask] = []
    for path, kind in files:
        if file_size(path) == 0:
            continue  # an empty file holds no records (it still counts as an input in the manifest)
        if kind == "json":
            with open_input(path) as f:
                kind = "json" if json_array.is_array(f) else "jsonl"
        try:
            with open_input(path) as f:
                schema, ranges = READERS[kind].plan(f, path, chunk_bytes)
            if schema is not None and kind == "jsonl" and compressed.codec(str(path)):
                ranges = compressed.line_ranges(str(path), chunk_bytes, lambda a, b: open_input(path, a, b))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, json.JSONDecodeError, UnicodeDecodeError,
                RecursionError) as e:
            raise ValueError(f"{path}: cannot read as {kind}: {first_line(e)}") from None
        if schema is None:
            continue  # no records (blank lines, an empty array): ignored like an empty file
        fmt = resolve_format(path, schema, format, **fields)
        tasks += [ReadTask(len(tasks) + k, str(path), kind, a, b, fmt) for k, (a, b) in enumerate(ranges)]
    return _split_tail(tasks, chunk_bytes)


def _split_tail(tasks: list[ReadTask], chunk_bytes: int) -> list[ReadTask]:
    """Cut the last TAIL_CHUNKS x chunk_bytes of JSONL input into chunks of chunk_bytes / TAIL_SPLIT.

    Workers take tasks in order, so the last ones run while the other workers have nothing left; quarter-size
    tasks at the end shorten that idle tail four times. Depends only on the inputs and chunk_bytes (never on the
    number of workers), like the rest of the plan; the output does not depend on the plan at all.
    """
    i, budget = len(tasks), TAIL_CHUNKS * chunk_bytes
    while i > 0 and budget > 0 and tasks[i - 1].kind == "jsonl" and not compressed.codec(tasks[i - 1].path):
        i -= 1
        budget -= tasks[i].stop - tasks[i].start
    small = max(1, chunk_bytes // TAIL_SPLIT)
    tail = []
    for t in tasks[i:]:
        with open_input(t.path) as f:
            tail += [replace(t, start=a, stop=b) for a, b in jsonl.line_cuts(f, t.start, t.stop, small, t.path)]
    return [replace(t, index=k) for k, t in enumerate(tasks[:i] + tail)]


# ---------------------------------------------------------------------------------------------------- default corpus


def stdlib_corpus(out: Path) -> Path:
    """The embedded default corpus: this Python's standard library sources as text documents, written once.

    Each module is split into blocks (module header, each def/class/method), so documents range from a few
    tokens to a few thousand; about 12 MB of real code and docstrings, read in about a second.
    Deterministic for a given Python installation (files sorted; tests, site-packages and caches left out).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no standard library sources under {root}; pass input files")
    block = re.compile(r"\n\n(?=(?:    )?(?:def |class |async def |@))")  # a blank line, then a def/class/method
    texts: list[str] = []
    for p in files:
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts += [f"# {p.relative_to(root)}\n{b.strip()}\n" for b in block.split(src) if b.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.table({"text": texts}), tmp, row_group_size=512)
    tmp.replace(out)
    return out


def log_expansion(progress, expansion: Expansion) -> None:
    """The files taken, and each one left out with its reason (also in the manifest); silent when none was."""
    if not expansion.ignored:
        return
    left = "".join(f"\n  left out {p}: {why}" for p, why in expansion.ignored)
    progress.log(f"inputs: {len(expansion.files)} file(s) taken, {len(expansion.ignored)} left out{left}")


def check_unchanged(fingerprints: list[dict]) -> None:
    """Raise when an input's size or content differs from its fingerprint (read while the build ran)."""
    changed = changed_inputs(fingerprints)
    if changed:
        raise ValueError(f"input changed while the build read it: {'; '.join(changed[:3])}; rerun when the input is "
                         "final (--overwrite builds from its new content)")
