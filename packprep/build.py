"""`build(config)`: sources -> tokenize -> lengths -> long-doc policy -> pack -> shuffle -> write shards -> manifest.

Work is split into tasks, each a pure function of (task, context) that writes its output under a temporary name
and renames it, with a completion marker last: tokenize task i (one input chunk) -> OUT/.packprep-work/spool/
t<i>.{ids,mask,len}.npy; write task k -> data-<k>-of-<n>.arrow. Tasks run on an executor (`packprep.executor`);
the driver holds only the int32 length array (+ 8 bytes/document of spool offsets and ~40 bytes/piece of plan),
packs once, and orders results by task index, so the bytes do not depend on --workers.

Resume (datatrove's habit): the packing plan is saved the same way (layout/*.npy, then layout/done.json) and the
manifest comes last, so a build killed anywhere is finished by rerunning the same command: finished tasks and the
plan are reused (OUT/.packprep-work/build.json holds the settings, chunk size and input fingerprints they were made
with), stale `*.tmp*` files of killed writers are deleted first, and the bytes equal an uninterrupted build's.
Other settings on an unfinished folder with finished work are refused unless --overwrite; a full disk is one
DiskFullError line; an exclusive flock on OUT keeps a second build out. Tests: tests/test_resume.py (kill -9 hooks:
PACKPREP_TEST_KILL_AT, see `_test_kill`).

Cost: tokenizer-bound (90-99% of the raw tokenizer's throughput end to end over 133M tokens on 2 cores,
benchmarks/RESULTS.md). Reading is pyarrow's C++ parse; packing ~1 s per 10M documents (numba, its kernels loaded on a
thread while tokenizing); writing is one numba gather from the memory-mapped spool per 4M-token record batch, hashed
on a second thread as it is written. The spool (~5 bytes/token) is deleted at the end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import packprep
from packprep.config import BuildConfig
from packprep.executor import Executor, make_executor
from packprep.inputs import TASK_PLAN_VERSION, plan_tasks, resolve_inputs, stdlib_corpus
from packprep.report import Progress
from packprep.shards import (
    FORMAT_VERSION,
    MANIFEST,
    atomic_file,
    make_batch,
    shard_name,
    write_hf_metadata,
    write_json_atomic,
    write_shard,
)
from packprep.tokenize import (
    TokenizeContext,
    Tokenizer,
    preload,
    resolve_tokenizer,
    save_atomic,
    spool_paths,
    tokenize_task,
    tokenizer_fingerprint,
    tokenizer_sha256,
)

WORK = ".packprep-work"
DEFAULT_CORPUS = "python-stdlib"


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict
    already_built: bool = False  # the folder held a finished build of the same config and inputs


class DiskFullError(OSError):
    """The output's filesystem ran out of space; the folder is left resumable."""


class BuildLockedError(OSError):
    """Another build is writing to the same output folder."""


def build(config: BuildConfig, progress: Progress | None = None, executor: Executor | None = None) -> BuildResult:
    """Run a whole build; returns the manifest (also written to OUT/packprep.json, last).

    Resumable: rerunning the same config on an unfinished OUT reuses every finished task (see the module doc).
    """
    progress = progress or Progress(enabled=False)
    own = executor is None
    executor = executor or make_executor(config.executor, config.workers, config.ray_address)
    try:
        with _locked(Path(config.out)):
            return _build(config, progress, executor)
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        out = Path(config.out)
        free = shutil.disk_usage(out if out.exists() else out.parent).free
        where = e.filename or out
        full = DiskFullError(f"disk full writing {where}: {free:,} bytes free on {out}'s filesystem; free space "
                             "and rerun the same command to resume (finished tasks are kept)")
        full.errno = errno.ENOSPC
        raise full from None
    finally:
        if own:
            getattr(executor, "shutdown", lambda: None)()  # a Ray runtime this build started stops with it


def _build(config: BuildConfig, progress: Progress, executor: Executor) -> BuildResult:
    out, t0, timings = Path(config.out), time.perf_counter(), {}
    inputs = list(config.inputs) or [DEFAULT_CORPUS]
    files = resolve_inputs(inputs) if config.inputs else None  # bad paths fail first, before touching `out`
    fingerprints = [_fingerprint(p) for p in inputs]
    identity = _identity(config, fingerprints)
    previous = _check_out(out, config, identity)
    if previous is not None:
        shutil.rmtree(out / WORK, ignore_errors=True)  # a build killed after its manifest, before this cleanup
        return BuildResult(out, previous, already_built=True)
    work = out / WORK
    resumed = _prepare_work(work, identity, config.overwrite, progress)

    # prepare: inputs -> files -> tasks; tokenizer resolved to a local folder once
    if inputs == [DEFAULT_CORPUS]:
        progress.log("no inputs given: building the embedded default corpus (this Python's standard library)")
        files = resolve_inputs([stdlib_corpus(work / "python-stdlib.parquet")])
    tok_dir = resolve_tokenizer(config.tokenizer, work)
    tok = Tokenizer(tok_dir)
    preload(tok)
    fields = dict(text_field=config.text_field, prompt_field=config.prompt_field,
                  completion_field=config.completion_field, messages_field=config.messages_field)
    tasks = plan_tasks(files, chunk_bytes=config.chunk_bytes, format=config.format, **fields)
    if any(t.format.name in ("chat", "sharegpt") for t in tasks) and tok.chat_template is None:
        raise ValueError(f"tokenizer {config.tokenizer!r} has no chat template; chat data needs one")
    timings["prepare"] = time.perf_counter() - t0

    # tokenize: one task per input chunk, results ordered by task index
    t = time.perf_counter()
    spool = work / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    results = [None] * len(tasks)
    reused = {"tokenize_tasks": sum(spool_paths(spool, i)["done"].exists() for i in range(len(tasks)))}
    warm_up = _WarmUp(config.strategy)
    with progress.stage("tokenize", len(tasks), "chunks") as bar:
        for n, r in enumerate(executor.imap(tokenize_task, tasks, TokenizeContext(str(tok_dir), str(spool),
                                                                                       config.on_error)), 1):
            results[r.index] = r
            bar.advance(1, docs=r.docs, tokens=r.tokens)
            _test_kill(f"tokenize:{n}")
            warm_up.start()  # after the first result: the pool's workers are all forked by then
    warm_up.join()
    timings["tokenize"] = time.perf_counter() - t

    # lengths -> long-doc policy -> pack -> row order, saved for the write tasks (marker last; reused on resume)
    t = time.perf_counter()
    layout_done = work / "layout" / "done.json"
    reused["layout"] = layout_done.is_file()
    if reused["layout"]:
        counts, stats = (json.loads(layout_done.read_text())[k] for k in ("counts", "stats"))
    else:
        lengths = np.concatenate([np.load(spool_paths(spool, i)["len"]) for i in range(len(tasks))] or
                                 [np.zeros(0, np.int32)])
        if not (lengths > 0).any():
            raise ValueError(f"empty corpus: {len(lengths)} documents, none with any tokens, in {', '.join(inputs)}")
        task_tokens = np.array([r.tokens for r in results], np.int64)
        layout, counts, stats = plan_layout(lengths, config)
        _save_layout(work / "layout", layout, np.concatenate([[0], np.cumsum(task_tokens)]))
        write_json_atomic(layout_done, {"counts": counts, "stats": stats})
        del lengths, layout
    if counts["rows"] == 0:
        raise ValueError(f"nothing left to pack: all {counts['input_docs']} documents were dropped or rejected "
                         f"(dropped {counts['dropped']}, rejected {counts['rejected']}); see --long-docs / --on-error")
    _test_kill("pack")
    timings["pack"] = time.perf_counter() - t

    # write: one task per shard, gathering rows from the memory-mapped spool
    t = time.perf_counter()
    rows, per = counts["rows"], config.rows_per_shard
    num_shards = -(-rows // per)
    # record batches of ~4M tokens: each one gathers from every spool file, so larger batches mean fewer page
    # faults (a 268 MB shard in a fresh process: 3.2 s with 1M-token batches, 2.6 s with 4M) for ~60 MB more RSS
    ctx = WriteContext(str(out), str(work), rows, per, num_shards, max(1, (4 << 20) // config.seq_len))
    shards = [None] * num_shards
    reused["shards"] = sum(_shard_done(ctx, k) is not None for k in range(num_shards))
    if resumed:
        progress.log(f"resuming {out}: reusing {reused['tokenize_tasks']}/{len(tasks)} tokenize tasks, "
                     f"{'the' if reused['layout'] else 'no'} packing plan, {reused['shards']}/{num_shards} shards")
    with progress.stage("write", num_shards, "shards") as bar:
        for n, info in enumerate(executor.imap(write_shard_task, range(num_shards), ctx), 1):
            shards[info["index"]] = {k: v for k, v in info.items() if k != "index"}
            bar.advance(1, rows=info["rows"], tokens=info["tokens"])
            _test_kill(f"write:{n}")
    counts["loss_tokens"] = sum(s["loss_tokens"] for s in shards)
    fingerprint = sha256_of_strings([s["sha256"] for s in shards])
    write_hf_metadata(out, [s["file"] for s in shards], fingerprint, description="packprep build")
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    counts["rejected_reasons"] = _write_rejects(out, spool, results)

    manifest = {
        "format_version": FORMAT_VERSION,
        "packprep_version": packprep.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict(),
        "tokenizer": {"name": config.tokenizer, "sha256": tokenizer_sha256(tok_dir), "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id},
        "inputs": _input_records(fingerprints, files, tasks, results),
        "seq_len": config.seq_len,
        "strategy": config.strategy,
        "seed": config.seed,
        "shuffle": config.shuffle,
        "counts": counts,
        "packing": stats,
        "shards": shards,
        "fingerprint": fingerprint,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "resumed": reused if resumed else None,  # finished work an earlier, interrupted run left and this one reused
    }
    write_json_atomic(out / MANIFEST, manifest)  # last: a folder without it is an unfinished build
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, manifest)


# ---------------------------------------------------------------------------------------------------- planning


class _WarmUp:
    """Import numba and load the packing and gather kernels from its cache (~0.4 s of CPU, nearly all of the pack
    stage on a small corpus) on a thread while the tokenize workers run, sharing the cores with them instead of
    holding up the pack stage; the write workers, forked later, inherit the loaded kernels. Started only once the
    tokenize pool has forked its workers (a fork while this thread holds the import lock would deadlock the child).
    Any failure is left for the real call to report."""

    def __init__(self, strategy: str):
        self.strategy, self.thread = strategy, None

    def start(self) -> None:
        if self.thread is None:
            import threading

            self.thread = threading.Thread(target=self._run, name="packprep-warm-up", daemon=True)
            self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def _run(self) -> None:
        try:
            from packprep._kernels import copy_pieces
            from packprep.pack import pack

            pack(np.array([2, 1], np.int32), 4, self.strategy, 0)
            one = np.zeros(1, np.int64)
            copy_pieces(np.zeros(1, np.int32), np.zeros(1, np.uint8), one, np.zeros(1, np.int32),
                        np.zeros(1, np.uint8), one, one)
        except Exception:  # noqa: BLE001 - the pack stage itself raises with the real context
            pass


def plan_layout(lengths: np.ndarray, config: BuildConfig) -> tuple[dict, dict, dict]:
    """Long-doc policy, packing and row order: the arrays the write tasks gather by, plus counts and stats.

    Pieces are (document, first token, length); token positions index the spool as if its files were one array.
    """
    from packprep.pack import pack
    from packprep.stats import plan_stats

    seq_len = config.seq_len
    rejected = lengths < 0  # -1: a record set aside by --on-error skip (it keeps its document index, no tokens)
    lengths = np.maximum(lengths, 0)
    doc_start = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])  # spool position of each doc
    empty, long = lengths == 0, lengths > seq_len
    if config.long_docs == "split":
        docs = np.flatnonzero(~empty)
        n_pieces = -(-lengths[docs].astype(np.int64) // seq_len)  # 9000 tokens, seq_len 4096 -> 3 pieces
        piece_doc = np.repeat(docs, n_pieces)
        first = np.concatenate([[0], np.cumsum(n_pieces)[:-1]])
        piece_start = (np.arange(len(piece_doc)) - np.repeat(first, n_pieces)) * seq_len
        piece_len = np.minimum(lengths[piece_doc].astype(np.int64) - piece_start, seq_len)
    else:
        keep = ~empty & ~long if config.long_docs == "drop" else ~empty
        piece_doc = np.flatnonzero(keep)
        piece_start = np.zeros(len(piece_doc), np.int64)
        piece_len = np.minimum(lengths[piece_doc], seq_len)
    n_long = int(long.sum())
    counts = {
        "input_docs": int(len(lengths)),
        "packed": int((~empty & ~long).sum()),
        "truncated": n_long if config.long_docs == "truncate" else 0,
        "split": n_long if config.long_docs == "split" else 0,
        "dropped": {"empty": int((empty & ~rejected).sum()), "too_long": n_long if config.long_docs == "drop" else 0},
        "rejected": int(rejected.sum()),
        "truncated_tokens": int((lengths[long] - seq_len).sum()) if config.long_docs == "truncate" else 0,
    }
    plan = pack(piece_len.astype(np.int32), seq_len, config.strategy, config.seed)
    stats = plan_stats(plan, seq_len)
    order = (np.random.default_rng(config.seed).permutation(plan.num_rows) if config.shuffle
             else np.arange(plan.num_rows))
    layout = {
        "row_offsets": plan.row_offsets,
        "order": order.astype(np.int64),
        "doc": piece_doc[plan.doc].astype(np.int64),
        "pos": doc_start[piece_doc[plan.doc]] + piece_start[plan.doc] + plan.start,
        "len": plan.length.astype(np.int32),
    }
    counts.update(pieces=plan.num_pieces, rows=plan.num_rows, tokens=plan.num_tokens)
    keep_stats = ("efficiency", "lower_bound", "rows_over_lb", "docs_per_row_mean", "docs_per_row_max",
                  "padding_tokens", "padding_tokens_saved", "rows_saved", "steps_reduction")
    return layout, counts, {k: stats[k] for k in keep_stats}


def _save_layout(folder: Path, layout: dict, task_token_base: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in {**layout, "task_token_base": task_token_base}.items():
        save_atomic(folder / f"{name}.npy", arr)


# ---------------------------------------------------------------------------------------------------- write task


@dataclass(frozen=True)
class WriteContext:
    out: str
    work: str
    rows: int
    rows_per_shard: int
    num_shards: int
    batch_rows: int


def _shard_done(ctx: WriteContext, index: int) -> dict | None:
    """A finished shard's marker info: the marker exists and the shard file has the size it records."""
    marker = Path(ctx.work) / "shards" / f"s{index:05d}.done.json"
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    path = Path(ctx.out) / info["file"]
    return info if path.is_file() and path.stat().st_size == info["bytes"] else None


def write_shard_task(index: int, ctx: WriteContext) -> dict:
    """Gather shard `index`'s rows from the spool and write the shard; its `.done.json` marker comes last.

    Idempotent: a shard whose marker exists (and whose file has the recorded size) is not rewritten.
    """
    work = Path(ctx.work)
    marker = work / "shards" / f"s{index:05d}.done.json"
    path = Path(ctx.out) / shard_name(index, ctx.num_shards)
    done = _shard_done(ctx, index)
    if done is not None:
        return done
    lay = {k: np.load(work / "layout" / f"{k}.npy", mmap_mode="r")
           for k in ("row_offsets", "order", "doc", "pos", "len", "task_token_base")}
    spool = _Spool(work / "spool")
    lo, hi = index * ctx.rows_per_shard, min((index + 1) * ctx.rows_per_shard, ctx.rows)
    loss = [0]

    def batches():
        for b in range(lo, hi, ctx.batch_rows):
            batch, loss_tokens = gather_rows(np.asarray(lay["order"][b : min(b + ctx.batch_rows, hi)]), lay, spool)
            loss[0] += loss_tokens
            yield batch
            _test_kill(f"shard:{index}")  # test hook: dies with a half-written shard.tmp*

    info = {"index": index, **write_shard(path, batches()), "loss_tokens": loss[0]}
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, info)
    return info


class _Spool:
    """The tokenize outputs, memory-mapped lazily, one (ids, mask) pair per task.

    `release(task)` drops the pages read from a task's files from this process (MADV_DONTNEED; they stay in the
    page cache). Without it a writer's RSS grows to the size of the spool: the kernel maps 64 KB around every
    faulted page ("fault-around"), so gathering shuffled rows maps nearly every page of every task file.
    """

    def __init__(self, folder: Path):
        self.folder, self.maps = folder, {}

    def __getitem__(self, task: int):
        if task not in self.maps:
            p = spool_paths(self.folder, task)
            self.maps[task] = (np.load(p["ids"], mmap_mode="r"), np.load(p["mask"], mmap_mode="r"))
        return self.maps[task]

    def release(self, task: int) -> None:
        for a in self.maps.get(task, ()):
            m = getattr(a, "_mmap", None)
            if m is not None and hasattr(m, "madvise"):
                m.madvise(mmap.MADV_DONTNEED)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: starts [10, 50], lengths [2, 3] -> [10, 11, 50, 51, 52]."""
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def gather_rows(rows: np.ndarray, lay: dict, spool: _Spool):
    """One record batch holding the given rows (plan row indices), tokens gathered from the spool, and its number
    of loss tokens."""
    from packprep._kernels import copy_pieces

    ro = lay["row_offsets"]
    counts = ro[rows + 1] - ro[rows]
    pieces = _ranges(ro[rows], counts)
    plen = np.asarray(lay["len"][pieces], dtype=np.int64)
    ppos = np.asarray(lay["pos"][pieces])
    row_piece_off = np.concatenate([[0], np.cumsum(counts)])
    cum = np.concatenate([[0], np.cumsum(plen)])
    ids = np.empty(int(cum[-1]), np.int32)
    mask = np.empty(int(cum[-1]), np.uint8)
    base = np.asarray(lay["task_token_base"])
    ptask = np.searchsorted(base, ppos, side="right") - 1  # a piece never crosses a task: a doc is in one task
    by_task = np.argsort(ptask, kind="stable")
    bounds = np.flatnonzero(np.diff(ptask[by_task])) + 1
    for group in np.split(by_task, bounds):
        if not len(group):
            continue
        task = int(ptask[group[0]])
        t_ids, t_mask = spool[task]
        copy_pieces(np.asarray(t_ids), np.asarray(t_mask), ppos[group] - base[task], ids, mask, cum[:-1][group],
                    plen[group])
        spool.release(task)  # RSS: at most one task file's pages mapped at a time
    batch = make_batch(ids, cum[row_piece_off], plen, row_piece_off, np.asarray(lay["doc"][pieces]), mask)
    return batch, int(mask.sum(dtype=np.int64))


def sha256_of_strings(items: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------- output folder


def _fingerprint(spec: str) -> dict:
    """What identifies an input for 'is this the same build?': path, size and mtime of every file it names."""
    if spec == DEFAULT_CORPUS:
        import sysconfig

        return {"input": spec, "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}
    files = resolve_inputs([spec])
    return {"input": spec, "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f, _ in files]}


def _identity(config: BuildConfig, fingerprints: list[dict]) -> dict:
    """What a build's output depends on, as JSON: settings that change bytes, the task split, input fingerprints and
    the tokenizer's content (a tokenizer retrained in place at the same path is a different build)."""
    return json.loads(json.dumps({"config": config.output_keys(), "chunk_bytes": config.chunk_bytes,
                                  "task_plan": TASK_PLAN_VERSION, "inputs": fingerprints,
                                  "tokenizer": tokenizer_fingerprint(config.tokenizer)}))


def _differences(old: dict, new: dict) -> list[str]:
    """['seq_len: 1024 -> 128', 'the inputs (...)'] between two identities (chunk_bytes does not change a byte)."""
    keys = sorted(set(old["config"]) | set(new["config"]))
    diff = [f"{k}: {old['config'].get(k)!r} -> {new['config'].get(k)!r}" for k in keys
            if old["config"].get(k) != new["config"].get(k)]
    if old.get("inputs") != new["inputs"] and old["config"].get("inputs") == new["config"].get("inputs"):
        diff.append("the input files changed (sizes or mtimes)")
    if None not in (old.get("tokenizer"), new.get("tokenizer")) and old["tokenizer"] != new["tokenizer"]:
        diff.append(f"the tokenizer's files changed (sha256 {old['tokenizer'][:12]}... -> {new['tokenizer'][:12]}...)")
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


def _check_out(out: Path, config: BuildConfig, identity: dict) -> dict | None:
    """None: go ahead. A manifest: the same build is already finished. Raises on a folder that is not ours, and
    on a finished build of other settings or inputs unless --overwrite."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        try:
            old_id = {"config": BuildConfig(**old["config"]).output_keys(), "inputs": old["inputs"]["specs"],
                      "tokenizer": old["tokenizer"]["sha256"]}
        except (KeyError, TypeError, ValueError) as e:  # another packprep version's manifest, or edited by hand
            old_id = None
            if not config.overwrite:
                raise ValueError(f"{manifest_path} is not a manifest this packprep version reads ({e!r}); pass "
                                 "--overwrite to replace that build or choose another --out") from None
        diff = _differences(old_id, identity) if old_id else ["an unreadable manifest"]
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
        (out / s["file"]).unlink(missing_ok=True)
    for name in ("state.json", "dataset_info.json", "rejects.jsonl"):
        (out / name).unlink(missing_ok=True)


def _prepare_work(work: Path, identity: dict, overwrite: bool, progress: Progress) -> bool:
    """Keep an unfinished build's work folder when it was made with the same identity (finished tasks are reused:
    returns True). One of other settings or inputs that holds finished tasks is refused unless --overwrite (hours of
    tokenizing are not thrown away by a mistyped flag); one with none (e.g. it stopped at a bad input in its first
    task) or differing only in chunk size restarts. Either way stale temporary files of killed writers are removed,
    so no half-written file is ever taken up."""
    marker, out = work / "build.json", work.parent
    old = json.loads(marker.read_text()) if marker.is_file() else None
    keep = old is not None and old == identity
    if old is not None and not keep:
        diff = _differences(old, identity)
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
            p.unlink(missing_ok=True)
    for p in [*out.glob("*.tmp*"), *work.rglob("*.tmp*")]:  # writers killed mid-file: never a finished output
        p.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not keep:
        write_json_atomic(marker, identity)
    return keep


@contextlib.contextmanager
def _locked(out: Path):
    """One build at a time per output folder: an exclusive flock on the folder itself, released when the build
    ends or dies (a requeued job that starts while the old one still runs must not delete its temp files)."""
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


def _test_kill(point: str) -> None:
    """Test hook for the crash tests: PACKPREP_TEST_KILL_AT=tokenize:3 | pack | write:1 | shard:0 SIGKILLs this
    process there (after the 3rd tokenize result, after the plan is saved, after the 1st shard, mid-shard 0)."""
    if os.environ.get("PACKPREP_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_rejects(out: Path, spool: Path, results) -> dict[str, int]:
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
                with open(spool_paths(spool, r.index)["rejects"], "rb") as src:
                    shutil.copyfileobj(src, f)
    return dict(sorted(reasons.items()))


def _input_records(fingerprints, files, tasks, results) -> dict:
    """{"specs": what was asked for (path, size, mtime of each file), "files": per file kind, format, docs}."""
    docs: dict[str, int] = {}
    fmt: dict[str, str] = {}
    for task, r in zip(tasks, results):
        docs[task.path] = docs.get(task.path, 0) + r.docs
        fmt[task.path] = task.format.name
    return {"specs": fingerprints,
            "files": [{"path": str(f), "kind": k, "format": fmt.get(str(f)), "docs": docs.get(str(f), 0),
                       "bytes": f.stat().st_size} for f, k in files]}

