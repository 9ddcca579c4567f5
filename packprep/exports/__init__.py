"""`export(build, to, out)`: write a finished build in another training stack's own on-disk format.

One module per stack (megatron, nemo, olmo, mds, litdata, llamafactory), each with three functions: `start` (options ->
state), `write_part` (one source shard's rows -> that stack's files), `finish` (index / metadata files). This module
owns what they share: reading the build's shards (through `packprep.shards`, as flat numpy views of each record
batch), the work folder that makes an export resumable, and the manifest `export.json`, written last (a folder
without it is unfinished), holding the source build's identity, the format and its version, and counts.

A --pad-docs-to-multiple build reaches the writers as its real tokens and real boundaries (`iter_rows`), except
where a format's module sets PADDED = True (nemo: Megatron-Bridge's context-parallel path reads padded documents).

Resume: after each source shard the writer's outputs are in place (temporary name, fsync, rename) and
`OUT/.export/progress.json` records the parts done; a rerun of the same command continues after the last recorded
part, deletes leftovers of an interrupted one, and on a finished folder returns its manifest. Another build or
format in a non-empty folder is refused unless `overwrite`. Remote builds and outputs (s3://... , any fsspec store):
a remote build is staged to a local cache (`remote.stage`, as verify does); a remote `out` is exported into a local
work folder, then published by `remote.Uploader` with `export.json` last (a rerun resumes the upload).
Cost: one pass over the shards' memory maps; megatron and olmo are memory copies (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from packprep import remote, storage
from packprep.shards import MANIFEST as BUILD_MANIFEST
from packprep.shards import atomic_file, shard_files

FORMATS = ("megatron", "nemo", "olmo", "mds", "litdata", "llamafactory")
MANIFEST = "export.json"
WORK = ".export"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class BuildInfo:
    """What exporters need to know about the source build (from its packprep.json), and whether to fsync."""

    path: Path
    fingerprint: str
    seq_len: int
    vocab_size: int
    eos_id: int | None
    counts: dict
    fsync: bool = True
    padding: dict | None = None  # a --pad-docs-to-multiple build: {"multiple", "pad_id", ...} (its manifest's)


@dataclass(frozen=True)
class ShardFile:
    """A shard file open for reading, and where its memory map starts: lets a writer hand a range of it to the
    kernel (`append`) instead of copying it through this process."""

    fd: int
    base: int  # address of the mapping's first byte
    size: int

    def offset(self, array: np.ndarray) -> int | None:
        """The file offset of `array` when it is a contiguous slice of the mapping, else None."""
        off = array.__array_interface__["data"][0] - self.base
        return off if array.flags.c_contiguous and 0 <= off and off + array.nbytes <= self.size else None


@dataclass
class Rows:
    """One record batch of a shard as flat numpy arrays (zero copy where the shard allows).

    tokens / loss_mask: every token of the batch, row after row. row_offsets [rows+1]: row r is
    tokens[row_offsets[r]:row_offsets[r+1]]. doc_lengths: every document (piece) in row order; row_docs [rows+1]:
    row r holds documents row_docs[r]:row_docs[r+1]. Example: rows [[a a a b b], [c c c c]] -> row_offsets
    [0, 5, 9], doc_lengths [3, 2, 4], row_docs [0, 2, 3]. `file`: the shard the arrays are views of.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    row_offsets: np.ndarray
    doc_lengths: np.ndarray
    row_docs: np.ndarray
    real_lengths: np.ndarray | None = None  # a padded build: each slot's real tokens (the rest is padding)
    file: ShardFile | None = None

    @property
    def doc_starts(self) -> np.ndarray:
        """Global start of each document in `tokens` (documents tile the batch: rows end where documents do)."""
        starts = np.zeros(len(self.doc_lengths), dtype=np.int64)
        np.cumsum(self.doc_lengths[:-1], out=starts[1:])
        return starts

    def real_positions(self) -> np.ndarray:
        """Indices into `tokens` of the real (not padding) tokens: slots [4, 4] holding [3, 1] -> [0, 1, 2, 4]."""
        real = self.real_lengths.astype(np.int64)
        before = np.concatenate([[0], np.cumsum(real)[:-1]])
        return np.repeat(self.doc_starts - before, real) + np.arange(int(real.sum()))

    def unpadded(self) -> Rows:
        """The rows without their padding: each document its real tokens (self when there is none)."""
        if self.real_lengths is None:
            return self
        pos, real = self.real_positions(), self.real_lengths.astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(real)])
        return Rows(self.tokens[pos], self.loss_mask[pos], cum[self.row_docs], real, self.row_docs)

    def labels(self) -> np.ndarray:
        """Hugging Face's unshifted labels: the token where it carries loss, else -100; -100 at every document's
        first token (int32, like input_ids)."""
        labels = np.where(self.loss_mask.view(bool), self.tokens, np.int32(IGNORE_INDEX)).astype(np.int32)
        labels[self.doc_starts] = IGNORE_INDEX
        return labels


def _flat(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (values, offsets starting at 0), numpy views of its buffers."""
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, (offsets - offsets[0]).astype(np.int64)


def iter_rows(shard: Path, padded: bool = False):
    """The shard's record batches as `Rows`: views of one memory map of the file (the reader of `open_shard`); a
    padded build's rows without their padding unless `padded` (then with `real_lengths`)."""
    with pa.memory_map(str(shard), "r") as source:
        whole = source.read_buffer()  # the whole file, zero copy
    fd = os.open(shard, os.O_RDONLY)
    try:
        file = ShardFile(fd, whole.address, whole.size)
        for batch in pa.ipc.open_stream(whole):
            tokens, row_offsets = _flat(batch.column("input_ids"))
            mask, _ = _flat(batch.column("loss_mask"))
            doc_lengths, row_docs = _flat(batch.column("seq_lengths"))
            rows = Rows(tokens, mask, row_offsets, doc_lengths, row_docs, file=file)
            if "doc_offsets_unpadded" in batch.schema.names:  # per row [0, r1, r1+r2, ...] -> [r1, r2, ...]
                u, u_off = _flat(batch.column("doc_offsets_unpadded"))
                rows.real_lengths = np.delete(u, u_off[:-1]) - np.delete(u, u_off[1:] - 1)
                rows = rows if padded else rows.unpadded()
            yield rows
    finally:
        os.close(fd)


def append(f, array: np.ndarray, file: ShardFile | None = None) -> None:
    """Append `array`'s bytes to the open file `f` at its descriptor's position (never through `f`'s buffer). When
    `array` is a slice of the shard `file`, the kernel copies that file range (`os.copy_file_range`: the bytes do
    not pass through this process; a filesystem without it falls back to write)."""
    f.flush()
    data, fd, done = memoryview(np.ascontiguousarray(array)).cast("B"), f.fileno(), 0
    offset = file.offset(array) if file is not None and hasattr(os, "copy_file_range") else None
    if offset is not None:
        try:
            while done < len(data):
                n = os.copy_file_range(file.fd, fd, len(data) - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: write the rest
            pass
    while done < len(data):
        done += os.write(fd, data[done:])


def cast_ids(tokens: np.ndarray, dtype, scratch: list) -> np.ndarray:
    """Token ids (int32, >= 0) as `dtype`: a view for 4-byte types (the same bits), else a cast into a buffer kept
    in `scratch` and reused across calls (no fresh pages per batch)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == tokens.dtype.itemsize:
        return tokens.view(dtype)
    if not scratch or len(scratch[0]) < len(tokens):
        scratch[:] = [np.empty(len(tokens), dtype)]
    out = scratch[0][: len(tokens)]
    np.copyto(out, tokens, casting="unsafe")
    return out


def row_samples(batches):
    """One dict per packed row: input_ids, labels (int32), doc_offsets (int32 cu_seqlens of the row), loss_mask
    (uint8); numpy views into the batch."""
    for rows in batches:
        labels = rows.labels()
        doc_ends = np.cumsum(rows.doc_lengths, dtype=np.int64)
        for r in range(len(rows.row_offsets) - 1):
            a, b = rows.row_offsets[r], rows.row_offsets[r + 1]
            ends = doc_ends[rows.row_docs[r] : rows.row_docs[r + 1]] - a
            yield {"input_ids": rows.tokens[a:b], "labels": labels[a:b],
                   "doc_offsets": np.concatenate([[0], ends]).astype(np.int32), "loss_mask": rows.loss_mask[a:b]}


def by_size(items, limit: int, base: int = 0, overhead: int = 0):
    """Byte strings in groups, in order: a group closes before the item that would take it past `limit` bytes
    (a group costs `base`, each item its length + `overhead`); an item larger than `limit` is a group alone."""
    group, size = [], base
    for item in items:
        if group and size + len(item) + overhead > limit:
            yield group
            group, size = [], base
        group.append(item)
        size += len(item) + overhead
    if group:
        yield group


def read_build(build: str | Path) -> tuple[BuildInfo, list[Path]]:
    """The finished build's facts and its shard files; a clear error for anything else. A remote build (s3://...)
    is staged to a local cache first (`remote.stage`, as verify does)."""
    path = remote.stage(str(build))
    manifest = path / BUILD_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{path} is not a finished packprep build (no {BUILD_MANIFEST}); run or finish "
                                "`packprep build` first")
    m = json.loads(manifest.read_text())
    tok = m.get("tokenizer", {})
    info = BuildInfo(path=path, fingerprint=m["fingerprint"], seq_len=int(m["seq_len"]),
                     vocab_size=int(tok["vocab_size"]), eos_id=tok.get("eos_id"), counts=m["counts"],
                     padding=m.get("padding"))
    return info, shard_files(path)


def writer(name: str):
    """The exporter module for `name`."""
    if name not in FORMATS:
        raise ValueError(f"unknown export format {name!r}; choose one of: {', '.join(FORMATS)}")
    return importlib.import_module(f"packprep.exports.{name}")


def export(build: str | Path, to: str, out: str | Path, *, overwrite: bool = False, fsync: bool = True,
           work_dir: str | Path | None = None, echo: Callable[[str], None] = lambda line: None, **options) -> dict:
    """Export the finished build at `build` (a folder or a URL) to format `to` in `out`; returns the export manifest.

    `options` go to the format's writer (megatron: prefix; nemo: container="parquet"|"npy"; mds, litdata: shard /
    chunk byte limits). Rerunning the same command resumes an interrupted export. fsync=False skips the fsyncs:
    atomic against a killed process, not against a power loss (benchmarks, tests). A remote `out` (s3://...) is
    written in a local `work_dir` (default: under the temp folder, named after the URL), then published with
    `export.json` last (`remote.publish_export`).
    """
    mod = writer(to)
    info, files = read_build(build)
    info = replace(info, fsync=fsync)
    identity = {"format": to, "format_version": mod.VERSION, "build_fingerprint": info.fingerprint,
                "options": options}
    source = str(build) if storage.is_remote(build) else str(info.path)
    if not storage.is_remote(out):
        return _export(mod, info, files, identity, source, Path(out), overwrite, echo)
    url = str(out)
    done = remote.check_export(url, identity, overwrite, MANIFEST)
    if done is not None:
        echo(f"{url} already holds this export")
        return done
    local = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "packprep-export" / hashlib.sha256(
        url.rstrip("/").encode()).hexdigest()[:16]
    manifest = _export(mod, info, files, identity, source, local, overwrite or _holds_other(local, identity), echo)
    remote.publish_export(url, local, manifest, MANIFEST)
    echo(f"published to {url}")
    if not work_dir:
        shutil.rmtree(local, ignore_errors=True)
    return manifest


def _export(mod, info: BuildInfo, files: list[Path], identity: dict, source: str, out: Path, overwrite: bool,
            echo) -> dict:
    """The local export: resume or start in `out`, one part per source shard, the manifest last."""
    done = _check_out(out, identity, overwrite)
    if done is not None:
        echo(f"{out} already holds this export")
        return done
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
    if progress is None or progress["identity"] != identity:
        progress = {"identity": identity, "state": mod.start(out, info, **identity["options"]), "parts": []}
    elif progress["parts"]:
        echo(f"resuming: {len(progress['parts'])} of {len(files)} shards already exported")
    for tmp in out.glob("*.tmp*"):  # a part interrupted mid-write
        tmp.unlink()
    for index, shard in enumerate(files):
        if index < len(progress["parts"]):
            continue
        part = mod.write_part(index, iter_rows(shard, getattr(mod, "PADDED", False)), out, progress["state"], info)
        progress["parts"].append(part)
        write_json(progress_path, progress, info)
        echo(f"shard {index + 1}/{len(files)} exported")
    summary = mod.finish(out, progress["parts"], progress["state"], info)
    manifest = {**identity, "source": source, "seq_len": info.seq_len,
                "counts": {"rows": int(info.counts["rows"]), "documents": int(info.counts["pieces"]),
                           "tokens": real_tokens(info), "loss_tokens": int(info.counts["loss_tokens"])},
                "files": summary.pop("files"), **summary}
    write_json(out / MANIFEST, manifest, info)
    shutil.rmtree(work)
    return manifest


def real_tokens(info: BuildInfo) -> int:
    """The build's tokens less its padding (a --pad-docs-to-multiple build's counts.tokens include the pads)."""
    return int(info.counts["tokens"]) - int(info.counts.get("pad_tokens", 0))


def _holds_other(out: Path, identity: dict) -> bool:
    """Whether a local work folder holds a finished or partial export of another identity (then it is replaced)."""
    for path, key in ((out / MANIFEST, None), (out / WORK / "progress.json", "identity")):
        if path.exists():
            m = json.loads(path.read_text())
            m = m[key] if key else {k: m.get(k) for k in identity}
            return m != identity
    return False


def _check_out(out: Path, identity: dict, overwrite: bool) -> dict | None:
    """The finished export's manifest if `out` already holds this one; None to start or resume; refuses a folder
    holding anything else unless `overwrite` (then clears it)."""
    manifest, progress = out / MANIFEST, out / WORK / "progress.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if not overwrite and {k: m.get(k) for k in identity} == identity:
            return m
    elif not out.exists() or not any(out.iterdir()):
        return None
    elif progress.exists() and json.loads(progress.read_text())["identity"] == identity and not overwrite:
        return None
    if not overwrite:
        raise FileExistsError(f"{out} holds other files or another export; choose an empty folder or pass "
                              "--overwrite")
    shutil.rmtree(out)
    return None


def write_json(path: Path, obj, info: BuildInfo, **dump) -> None:
    with atomic_file(path, "w", fsync=info.fsync) as f:
        json.dump(obj, f, **dump)


def save_array(path: Path, array: np.ndarray, info: BuildInfo) -> None:
    """Raw array bytes to `path`, atomically (a work file of a resumable writer)."""
    with atomic_file(path, fsync=info.fsync) as f:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
