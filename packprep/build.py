"""`build(config)`: sources -> tokenize -> lengths -> long-doc policy -> pack -> shuffle -> write shards -> manifest.

Work is split into tasks, each a pure function of (task, context) that writes its output under a temporary name
and renames it, with a completion marker last: tokenize task i (one input chunk) -> OUT/.packprep-work/spool/
t<i>.{ids,mask,len}.npy; write task k -> data-<k>-of-<n>.arrow. Tasks run on an executor (`packprep.executor`);
the driver holds only the int32 length array (+ 8 bytes/document of spool offsets and ~40 bytes/piece of plan),
packs once, and orders results by task index, so the bytes do not depend on --workers.

Cost: tokenizer-bound. Reading is pyarrow's C++ parse; packing ~1 s per 10M documents; writing is one gather
from the memory-mapped spool plus one sha256 pass per shard. The spool (~5 bytes/token) is deleted at the end.
"""

from __future__ import annotations

import json
import mmap
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import packprep
from packprep.config import BuildConfig
from packprep.executor import Executor, make_executor
from packprep.report import Progress
from packprep.shards import (
    FORMAT_VERSION,
    MANIFEST,
    make_batch,
    shard_name,
    write_hf_metadata,
    write_json_atomic,
    write_shard,
)
from packprep.sources import plan_tasks, resolve_inputs, stdlib_corpus
from packprep.tokenize import (
    TokenizeContext,
    Tokenizer,
    preload,
    resolve_tokenizer,
    save_atomic,
    spool_paths,
    tokenize_task,
    tokenizer_sha256,
)

WORK = ".packprep-work"
DEFAULT_CORPUS = "python-stdlib"


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict
    already_built: bool = False  # the folder held a finished build of the same config and inputs


def build(config: BuildConfig, progress: Progress | None = None, executor: Executor | None = None) -> BuildResult:
    """Run a whole build; returns the manifest (also written to OUT/packprep.json, last)."""
    if executor is not None:
        return _build(config, progress or Progress(enabled=False), executor)
    executor = make_executor(config.executor, config.workers, config.ray_address)
    try:
        return _build(config, progress or Progress(enabled=False), executor)
    finally:
        getattr(executor, "shutdown", lambda: None)()  # a Ray runtime this build started stops with it


def _build(config: BuildConfig, progress: Progress, executor: Executor) -> BuildResult:
    out, t0, timings = Path(config.out), time.perf_counter(), {}
    inputs = list(config.inputs) or [DEFAULT_CORPUS]
    files = resolve_inputs(inputs) if config.inputs else None  # bad paths fail first, before touching `out`
    fingerprints = [_fingerprint(p) for p in inputs]
    previous = _check_out(out, config, fingerprints)
    if previous is not None:
        return BuildResult(out, previous, already_built=True)
    work = out / WORK
    _prepare_work(work, {"config": config.output_keys(), "chunk_bytes": config.chunk_bytes, "inputs": fingerprints})

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
    with progress.stage("tokenize", len(tasks), "chunks") as bar:
        for r in executor.imap(tokenize_task, tasks, TokenizeContext(str(tok_dir), str(spool))):
            results[r.index] = r
            bar.advance(1, docs=r.docs, tokens=r.tokens)
    timings["tokenize"] = time.perf_counter() - t

    # lengths -> long-doc policy -> pack -> row order, saved for the write tasks
    t = time.perf_counter()
    lengths = np.concatenate([np.load(spool_paths(spool, i)["len"]) for i in range(len(tasks))] or
                             [np.zeros(0, np.int32)])
    if not len(lengths) or not lengths.any():
        raise ValueError(f"empty corpus: {len(lengths)} documents, none with any tokens, in {', '.join(inputs)}")
    task_tokens = np.array([r.tokens for r in results], np.int64)
    layout, counts, stats = plan_layout(lengths, config)
    _save_layout(work / "layout", layout, np.concatenate([[0], np.cumsum(task_tokens)]))
    del lengths, layout
    timings["pack"] = time.perf_counter() - t

    # write: one task per shard, gathering rows from the memory-mapped spool
    t = time.perf_counter()
    rows, per = counts["rows"], config.rows_per_shard
    num_shards = -(-rows // per)
    ctx = WriteContext(str(out), str(work), len(tasks), rows, per, num_shards, max(1, (1 << 20) // config.seq_len))
    shards = [None] * num_shards
    with progress.stage("write", num_shards, "shards") as bar:
        for info in executor.imap(write_shard_task, range(num_shards), ctx):
            shards[info["index"]] = {k: v for k, v in info.items() if k != "index"}
            bar.advance(1, rows=info["rows"], tokens=info["tokens"])
    counts["loss_tokens"] = sum(s["loss_tokens"] for s in shards)
    fingerprint = sha256_of_strings([s["sha256"] for s in shards])
    write_hf_metadata(out, [s["file"] for s in shards], fingerprint, description="packprep build")
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

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
    }
    write_json_atomic(out / MANIFEST, manifest)  # last: a folder without it is an unfinished build
    shutil.rmtree(work, ignore_errors=True)
    return BuildResult(out, manifest)


# ---------------------------------------------------------------------------------------------------- planning


def plan_layout(lengths: np.ndarray, config: BuildConfig) -> tuple[dict, dict, dict]:
    """Long-doc policy, packing and row order: the arrays the write tasks gather by, plus counts and stats.

    Pieces are (document, first token, length); token positions index the spool as if its files were one array.
    """
    from packprep.pack import pack
    from packprep.stats import plan_stats

    seq_len = config.seq_len
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
        "dropped": {"empty": int(empty.sum()), "too_long": n_long if config.long_docs == "drop" else 0},
        "rejected": 0,
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
    num_tasks: int
    rows: int
    rows_per_shard: int
    num_shards: int
    batch_rows: int


def write_shard_task(index: int, ctx: WriteContext) -> dict:
    """Gather shard `index`'s rows from the spool and write the shard; its `.done.json` marker comes last."""
    work = Path(ctx.work)
    marker = work / "shards" / f"s{index:05d}.done.json"
    path = Path(ctx.out) / shard_name(index, ctx.num_shards)
    if marker.exists() and path.exists():
        return json.loads(marker.read_text())
    lay = {k: np.load(work / "layout" / f"{k}.npy", mmap_mode="r")
           for k in ("row_offsets", "order", "doc", "pos", "len", "task_token_base")}
    spool = _Spool(work / "spool")
    lo, hi = index * ctx.rows_per_shard, min((index + 1) * ctx.rows_per_shard, ctx.rows)
    loss = [0]

    def batches():
        for b in range(lo, hi, ctx.batch_rows):
            batch = gather_rows(np.asarray(lay["order"][b : min(b + ctx.batch_rows, hi)]), lay, spool)
            loss[0] += int(np.asarray(batch.column("loss_mask").values).sum(dtype=np.int64))
            yield batch

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
    """One record batch holding the given rows (plan row indices), tokens gathered from the spool."""
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
        src = _ranges(ppos[group] - base[task], plen[group])
        dst = _ranges(cum[:-1][group], plen[group])
        t_ids, t_mask = spool[task]
        ids[dst] = t_ids[src]
        mask[dst] = t_mask[src]
        spool.release(task)  # RSS: at most one task file's pages mapped at a time
    return make_batch(ids, cum[row_piece_off], plen, row_piece_off, np.asarray(lay["doc"][pieces]), mask)


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


def _check_out(out: Path, config: BuildConfig, fingerprints: list[dict]) -> dict | None:
    """None: go ahead. A manifest: the same build is already finished. Raises on a folder that is not ours."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        old_keys = BuildConfig(**old["config"]).output_keys()
        diff = sorted(k for k, v in config.output_keys().items() if old_keys.get(k) != v)
        same_inputs = old.get("inputs", {}).get("specs") == json.loads(json.dumps(fingerprints))
        if not diff and same_inputs:
            return old
        if not config.overwrite:
            what = ", ".join(f"{k}: {old_keys.get(k)!r} -> {getattr(config, k)!r}" for k in diff) or "the inputs"
            raise FileExistsError(f"{out} holds a finished build with different settings ({what}); "
                                  "pass --overwrite or choose another --out")
        _remove_build(out, old)
    elif any(out.iterdir()) and not (out / WORK).exists():
        raise FileExistsError(f"--out {out} exists, is not empty and is not a packprep output folder; "
                              "choose another --out")
    return None


def _remove_build(out: Path, manifest: dict) -> None:
    (out / MANIFEST).unlink(missing_ok=True)  # first: from here on the folder is an unfinished build
    for s in manifest.get("shards", []):
        (out / s["file"]).unlink(missing_ok=True)
    for name in ("state.json", "dataset_info.json"):
        (out / name).unlink(missing_ok=True)


def _prepare_work(work: Path, identity: dict) -> None:
    """Keep an unfinished build's work folder when it was made by the same settings (finished tasks are reused);
    otherwise start it afresh."""
    marker = work / "build.json"
    if work.exists() and not (marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(identity))):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_json_atomic(marker, identity)


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

