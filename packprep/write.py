"""The write stage: shard k's rows, gathered from the spool in plan order, -> data-<k>-of-<n>.arrow.

    ctx = WriteContext(out, work, rows, rows_per_shard, num_shards, batch_rows)
    info = write_shard_task(k, ctx)       # {"file", "rows", "tokens", "bytes", "sha256", "loss_tokens",
                                          #  "label_tokens", "index"}

One task per shard, idempotent: its marker OUT/.packprep-work/shards/s<k>.done.json comes after the shard file and
records the file's size, so a resumed build keeps a shard only when both agree. Rows are gathered a record batch at a
time (`batch_rows` rows, ~4M tokens) by one numba copy per spool task file; the shard is written by
`shards.write_shard`. Cost: one pass over the row's tokens and mask, plus the page faults of reading the spool;
memory: one record batch and one spool task file's pages (`spool.Reader.release`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packprep import layout, spool, workdir
from packprep.mixture import batch_tokens
from packprep.shards import SCHEMA, SCHEMA_PADDED, atomic_file, make_batch, shard_name, write_json_atomic, write_shard
from packprep.workdir import kill_hook

BATCH_TOKENS = 4 << 20  # tokens per record batch: each gathers from every spool file, so larger means fewer faults


@dataclass(frozen=True)
class WriteContext:
    """What every write task needs (small and picklable)."""

    out: str
    work: str
    rows: int
    rows_per_shard: int
    num_shards: int
    batch_rows: int
    sources: int = 0  # a mixture's sources: each shard's loss tokens are also tallied per source
    pad_id: int | None = None  # --pad-docs-to-multiple > 1: the token that fills each slot after its real tokens

    @classmethod
    def plan(cls, out: Path, work: Path, rows: int, rows_per_shard: int, seq_len: int, sources: int = 0,
             pad_id: int | None = None) -> WriteContext:
        return cls(str(out), str(work), rows, rows_per_shard, -(-rows // rows_per_shard),
                   max(1, BATCH_TOKENS // seq_len), sources, pad_id)


def shard_done(ctx: WriteContext, index: int) -> dict | None:
    """A finished shard's marker info: the marker exists and the shard file has the size it records."""
    marker = Path(ctx.work) / "shards" / f"s{index:05d}.done.json"
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    path = Path(ctx.out) / info["file"]
    return info if path.is_file() and path.stat().st_size == info["bytes"] else None


def write_shard_task(index: int, ctx: WriteContext) -> dict:
    """Gather shard `index`'s rows from the spool and write the shard; its `.done.json` marker comes last."""
    done = shard_done(ctx, index)
    if done is not None:
        return done
    work = Path(ctx.work)
    lay, reader = layout.load(work / "layout"), spool.Reader(work / "spool")
    lo, hi = index * ctx.rows_per_shard, min((index + 1) * ctx.rows_per_shard, ctx.rows)
    loss, labelled, source_loss = 0, 0, np.zeros(ctx.sources, np.int64)

    def batches():
        nonlocal loss, labelled
        for b in range(lo, hi, ctx.batch_rows):
            batch, loss_tokens, label_tokens = gather_rows(np.asarray(lay["order"][b : min(b + ctx.batch_rows, hi)]),
                                                           lay, reader, ctx.pad_id)
            loss += loss_tokens
            labelled += label_tokens
            if ctx.sources:
                source_loss[:] += batch_tokens(batch, ctx.sources)[1]
            yield batch
            kill_hook(f"shard:{index}")  # test hook: dies with a half-written shard.tmp*

    schema = SCHEMA if ctx.pad_id is None else SCHEMA_PADDED
    info = {"index": index, **write_shard(Path(ctx.out) / shard_name(index, ctx.num_shards), batches(),
                                          schema=schema),
            "loss_tokens": loss, "label_tokens": labelled}
    if ctx.sources:
        info["source_loss_tokens"] = source_loss.tolist()
    marker = work / "shards" / f"s{index:05d}.done.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, info)
    return info


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: starts [10, 50], lengths [2, 3] -> [10, 11, 50, 51, 52]."""
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def gather_rows(rows: np.ndarray, lay: dict, reader: spool.Reader, pad_id: int | None = None):
    """One record batch holding the given rows (plan row indices), tokens gathered from the spool, its number of
    loss tokens and of labels (loss tokens that are not a piece's first token: what a model's loss counts).
    pad_id (a padded build): each slot is its real tokens (lay["real"]) then pad_id with loss_mask 0."""
    from packprep._kernels import copy_pieces

    ro = lay["row_offsets"]
    counts = ro[rows + 1] - ro[rows]
    pieces = _ranges(ro[rows], counts)
    plen = np.asarray(lay["len"][pieces], dtype=np.int64)
    ppos = np.asarray(lay["pos"][pieces])
    row_piece_off = np.concatenate([[0], np.cumsum(counts)])
    cum = np.concatenate([[0], np.cumsum(plen)])
    if pad_id is None:
        ids, mask, pcopy, preal = np.empty(int(cum[-1]), np.int32), np.empty(int(cum[-1]), np.uint8), plen, None
    else:
        ids, mask = np.full(int(cum[-1]), pad_id, np.int32), np.zeros(int(cum[-1]), np.uint8)
        pcopy = preal = np.asarray(lay["real"][pieces], dtype=np.int64)
    base = np.asarray(lay["task_token_base"])
    ptask = np.searchsorted(base, ppos, side="right") - 1  # a piece never crosses a task: a doc is in one task
    by_task = np.argsort(ptask, kind="stable")
    bounds = np.flatnonzero(np.diff(ptask[by_task])) + 1
    for group in np.split(by_task, bounds):
        if not len(group):
            continue
        task = int(ptask[group[0]])
        t_ids, t_mask = reader[task]
        copy_pieces(t_ids, t_mask, ppos[group] - base[task], ids, mask, cum[:-1][group], pcopy[group])
        reader.release(task)  # RSS: at most one task file's pages mapped at a time
    batch = make_batch(ids, cum[row_piece_off], plen, row_piece_off, np.asarray(lay["doc"][pieces]), mask, preal)
    loss = int(mask.sum(dtype=np.int64))
    starts = cum[:-1][plen > 0]
    return batch, loss, loss - int(mask[starts].sum(dtype=np.int64))


def dataset_fingerprint(shards: list[dict]) -> str:
    """sha256 over the shards' sha256s, in order: the build's one content hash."""
    return hashlib.sha256("\n".join(s["sha256"] for s in shards).encode()).hexdigest()


def write_rejects(out: Path, spool_folder: Path, results: list[spool.TaskResult]) -> dict[str, int]:
    """OUT/rejects.jsonl: the tasks' rejects concatenated in task order (the same bytes for any --workers), written
    to a temporary name and renamed; no rejects: no file. Returns the count of rejected records by kind."""
    reasons: dict[str, int] = {}
    path = out / "rejects.jsonl"
    if not any(r.rejected for r in results):
        path.unlink(missing_ok=True)
        return reasons
    with atomic_file(path) as f:
        for r in results:
            for kind, n in r.rejected_reasons.items():
                reasons[kind] = reasons.get(kind, 0) + n
            if r.rejected:
                spool.copy_rejects(spool_folder, r.index, f)
    return dict(sorted(reasons.items()))


def repair_shards(out: Path, manifest: dict, config, log) -> None:
    """A finished build's shards are what its manifest records (sizes; sha256 with --check full). A bad one is
    rewritten from the spool when a build killed before deleting it left it, else refused in one line."""
    bad = workdir.check_shards(out, manifest, config.check == "full")
    if not bad:
        return
    work = workdir.path(out)
    if (work / "spool").is_dir() and layout.saved(work / "layout") is not None:
        names = [s["file"] for s in manifest["shards"]]
        wctx = WriteContext.plan(out, work, manifest["counts"]["rows"], config.rows_per_shard, config.seq_len,
                                 pad_id=(manifest.get("padding") or {}).get("pad_id"))
        for problem in bad:
            k = names.index(problem.split(":")[0])
            (work / "shards" / f"s{k:05d}.done.json").unlink(missing_ok=True)
            write_shard_task(k, wctx)
            log(f"{problem}: rewritten from the spool")
        bad = workdir.check_shards(out, manifest, True)
        if not bad:
            return
    raise ValueError(f"{out} holds this build, but {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; rerun "
                     "with --overwrite to rebuild it (packprep verify lists every problem)")
