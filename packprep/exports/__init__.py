"""`export(build, to, out)`: write a finished build in another training stack's own on-disk format.

One module per stack (megatron, nemo, olmo, mds, litdata), each with three functions: `start` (options ->
state), `write_part` (one source shard's rows -> that stack's files), `finish` (index / metadata files). This module
owns what they share: reading the build's shards (through `packprep.shards`, as flat numpy views of each record
batch), the work folder that makes an export resumable, and the manifest `export.json`, written last (a folder
without it is unfinished), holding the source build's identity, the format and its version, and counts.

A --pad-docs-to-multiple build reaches the writers as its real tokens and real boundaries (`iter_rows`), except
where a format's module sets PADDED = True (nemo: Megatron-Bridge's context-parallel path reads padded documents).

Resume: after each source shard the writer's outputs are in place (temporary name, fsync, rename) and
`OUT/.export/progress.json` records the parts done; a rerun of the same command continues after the last recorded
part, deletes leftovers of an interrupted one, and on a finished folder returns its manifest. Another build or
format in a non-empty folder is refused unless `overwrite`.
Cost: one pass over the shards' memory maps; megatron and olmo are memory copies (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import importlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from packprep.shards import MANIFEST as BUILD_MANIFEST
from packprep.shards import atomic_file, open_shard, shard_files

FORMATS = ("megatron", "nemo", "olmo", "mds", "litdata")
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


@dataclass
class Rows:
    """One record batch of a shard as flat numpy arrays (zero copy where the shard allows).

    tokens / loss_mask: every token of the batch, row after row. row_offsets [rows+1]: row r is
    tokens[row_offsets[r]:row_offsets[r+1]]. doc_lengths: every document (piece) in row order; row_docs [rows+1]:
    row r holds documents row_docs[r]:row_docs[r+1]. Example: rows [[a a a b b], [c c c c]] -> row_offsets
    [0, 5, 9], doc_lengths [3, 2, 4], row_docs [0, 2, 3].
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    row_offsets: np.ndarray
    doc_lengths: np.ndarray
    row_docs: np.ndarray
    real_lengths: np.ndarray | None = None  # a padded build: each slot's real tokens (the rest is padding)

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
    """The shard's record batches as `Rows`; a padded build's rows without their padding unless `padded` (then
    with `real_lengths`)."""
    for batch in open_shard(shard).to_batches():
        tokens, row_offsets = _flat(batch.column("input_ids"))
        mask, _ = _flat(batch.column("loss_mask"))
        doc_lengths, row_docs = _flat(batch.column("seq_lengths"))
        rows = Rows(tokens, mask, row_offsets, doc_lengths, row_docs)
        if "doc_offsets_unpadded" in batch.schema.names:  # per row [0, r1, r1+r2, ...] -> [r1, r2, ...]
            u, u_off = _flat(batch.column("doc_offsets_unpadded"))
            rows.real_lengths = np.delete(u, u_off[:-1]) - np.delete(u, u_off[1:] - 1)
            rows = rows if padded else rows.unpadded()
        yield rows


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
    """The finished build's facts and its shard files; a clear error for anything else."""
    path = Path(build)
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
           echo: Callable[[str], None] = lambda line: None, **options) -> dict:
    """Export the finished build at `build` to format `to` in folder `out`; returns the export manifest.

    `options` go to the format's writer (megatron: prefix; nemo: container="parquet"|"npy"; mds, litdata: shard /
    chunk byte limits). Rerunning the same command resumes an interrupted export. fsync=False skips the fsyncs:
    atomic against a killed process, not against a power loss (benchmarks, tests).
    """
    mod = writer(to)
    info, files = read_build(build)
    info = replace(info, fsync=fsync)
    out = Path(out)
    identity = {"format": to, "format_version": mod.VERSION, "build_fingerprint": info.fingerprint,
                "options": options}
    done = _check_out(out, identity, overwrite)
    if done is not None:
        echo(f"{out} already holds this export")
        return done
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    progress_path = work / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
    if progress is None or progress["identity"] != identity:
        progress = {"identity": identity, "state": mod.start(out, info, **options), "parts": []}
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
    manifest = {**identity, "source": str(info.path), "seq_len": info.seq_len,
                "counts": {"rows": int(info.counts["rows"]), "documents": int(info.counts["pieces"]),
                           "tokens": real_tokens(info), "loss_tokens": int(info.counts["loss_tokens"])},
                "files": summary.pop("files"), **summary}
    write_json(out / MANIFEST, manifest, info)
    shutil.rmtree(work)
    return manifest


def real_tokens(info: BuildInfo) -> int:
    """The build's tokens less its padding (a --pad-docs-to-multiple build's counts.tokens include the pads)."""
    return int(info.counts["tokens"]) - int(info.counts.get("pad_tokens", 0))


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
