"""`build(config)`: the build's stages wired together, and nothing else.

    plan (inputs -> read tasks) -> tokenize (tasks -> spool) -> layout (lengths -> long-doc policy -> pack -> row
    order) -> write (spool -> shards) -> manifest (packprep.json, last)

Each stage lives in its own module and owns its files: `inputs` + `readers` + `records` (inputs, read tasks,
record formats), `tokenizer` (the tokenize task), `spool`, `layout`, `write` + `shards`, and `workdir` (the lock,
the build identity, resume). Tasks run on an executor (`packprep.executor`, or Ray) and their results are ordered
by task index here, so the bytes do not depend on --workers. A build killed anywhere is finished by rerunning the
same command (see `workdir`). A remote --out (s3://...) is built in a local work folder and published shard by
shard, manifest last (`remote`).

Cost: tokenizer-bound (the tokenize stage is nearly all of the time; benchmarks/RESULTS.md). The driver holds the
int32 length array (4 bytes per document) and the plan (~40 bytes per piece); workers hold one task at a time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packprep import layout, manifest, mixture, remote, spool, storage, workdir
from packprep.backend import choose_backend
from packprep.config import BuildConfig
from packprep.executor import Executor, LocalExecutor, make_executor
from packprep.inputs import (
    DEFAULT_CORPUS,
    TASK_PLAN_VERSION,
    Expansion,
    check_apart,
    check_unchanged,
    expand_inputs,
    fingerprint,
    log_expansion,
    plan_tasks,
    resolve_inputs,
    stdlib_corpus,
)
from packprep.report import Progress
from packprep.shards import write_hf_metadata
from packprep.tokenizer import (
    TokenizeContext,
    Tokenizer,
    preload,
    resolve_tokenizer,
    tokenize_task,
    tokenizer_fingerprint,
    tokenizer_sha256,
)
from packprep.workdir import kill_hook
from packprep.write import WriteContext, dataset_fingerprint, repair_shards, shard_done, write_rejects, write_shard_task


@dataclass(frozen=True)
class BuildResult:
    out: Path | str  # the output folder, or the URL of a remote one
    manifest: dict
    already_built: bool = False  # the folder held a finished build of the same config and inputs


def build(config: BuildConfig, progress: Progress | None = None, executor: Executor | None = None) -> BuildResult:
    """Run a whole build; returns the manifest (also written to OUT/packprep.json, last).

    Resumable: rerunning the same config on an unfinished OUT reuses every finished task (`packprep.workdir`).
    """
    progress = progress or Progress(enabled=False)
    storage.configure(config.storage_options)  # before workers start: they inherit it
    url = config.out if storage.is_remote(config.out) else None
    out = remote.work_dir(config) if url else Path(config.out)
    own = executor is None
    executor = executor or make_executor(config.executor, config.workers, config.ray_address)
    try:
        with workdir.locked(out):
            result = _build(config, progress, executor, out, url)
        if url and not result.already_built:
            remote.clean_local(out, config.work_dir)
        return result
    finally:
        if own:
            getattr(executor, "shutdown", lambda: None)()  # a Ray runtime this build started stops with it


def _build(config: BuildConfig, progress: Progress, executor: Executor, out: Path, url: str | None) -> BuildResult:
    t0, timings = time.perf_counter(), {}
    inputs = list(config.inputs) or [p for s in config.sources for p in s.paths] or [DEFAULT_CORPUS]
    # bad paths fail first, before touching `out`; a mixture's files are resolved per source
    source_files = mixture.resolve(config.sources) if config.sources else None
    listed = [expand_inputs([s]) for s in inputs] if config.inputs else None  # each spec listed once
    expansion = Expansion(sum((e.files for e in listed), []), sum((e.ignored for e in listed), [])) if listed else None
    files = sum(source_files, []) if config.sources else expansion.files if expansion else None
    if files:
        check_apart(inputs, files, out)
    if expansion:
        log_expansion(progress, expansion)
    # content hashes, once here and once after tokenizing (check_unchanged): a rewritten input is another build
    fingerprints = [fingerprint(s, e.files) for s, e in zip(inputs, listed)] if listed else [
        fingerprint(s) for s in inputs]
    ident = workdir.identity(config, fingerprints, TASK_PLAN_VERSION, tokenizer_fingerprint(config.tokenizer))
    if url and (published := remote.check(url, ident, config.overwrite)) is not None:
        return BuildResult(url, published, already_built=True)
    previous = workdir.check_out(out, config, ident)
    if previous is not None:
        if url:  # finished here, killed while publishing
            remote.publish(remote.Uploader(url, out, ident), out, previous)
            return BuildResult(url, previous)
        repair_shards(out, previous, config, progress.log)
        workdir.finish(out)  # a build killed after its manifest, before its work folder was removed
        return BuildResult(out, previous, already_built=True)
    resumed = workdir.prepare(out, ident, config.overwrite, progress)
    uploader = remote.Uploader(url, out, ident) if url else None
    work = workdir.path(out)

    # plan: inputs -> files -> read tasks; the tokenizer resolved to a local folder and loaded once
    if inputs == [DEFAULT_CORPUS]:
        progress.log("no inputs given: building the embedded default corpus (this Python's standard library)")
        files = resolve_inputs([stdlib_corpus(work / "python-stdlib.parquet")])
    tok_dir = resolve_tokenizer(config.tokenizer, work)
    if config.sources:
        tasks, task_source = mixture.plan(config.sources, source_files, config.chunk_bytes)
    else:
        tasks = plan_tasks(files, chunk_bytes=config.chunk_bytes, format=config.format, text_field=config.text_field,
                           prompt_field=config.prompt_field, completion_field=config.completion_field,
                           messages_field=config.messages_field)
    backend, backend_why, tok = _load_tokenizer(tok_dir, config, tasks)
    if config.tokenizer_backend == "auto":
        progress.log(f"tokenizer backend: {backend} ({backend_why})")
    preload(tok)
    if any(t.format.name in ("chat", "sharegpt") for t in tasks) and tok.chat_template is None:
        raise ValueError(f"tokenizer {config.tokenizer!r} has no chat template; chat data needs one")
    timings["prepare"] = time.perf_counter() - t0

    # tokenize: one task per input chunk -> its spool files; results ordered by task index
    t = time.perf_counter()
    spool_dir = work / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True)
    if config.on_error == "raise":  # tasks that set records aside under skip are redone: raise stops at them
        for i in range(len(tasks)):
            if getattr(spool.finished(spool_dir, i), "rejected", 0):
                spool.paths(spool_dir, i)["done"].unlink()
    reused = {"tokenize_tasks": sum(spool.finished(spool_dir, i) is not None for i in range(len(tasks)))}
    results: list[spool.TaskResult] = [None] * len(tasks)
    ctx = TokenizeContext(str(tok_dir), str(spool_dir), config.on_error, backend, config.special_tokens_in_text)
    ship = url is not None and config.executor == "ray"  # Ray nodes need no shared disk: outputs come back
    stage_fn, stage_ctx = (remote.shipped_tokenize, remote.Shipped.of(ctx)) if ship else (tokenize_task, ctx)
    try:
        with progress.stage("tokenize", len(tasks), "chunks") as bar:
            for n, r in enumerate(executor.imap(stage_fn, tasks, stage_ctx), 1):
                r = remote.receive(r, spool_dir) if ship else r
                results[r.index] = r
                bar.advance(1, docs=r.docs, tokens=r.tokens)
                kill_hook(f"tokenize:{n}")
    except (ValueError, OSError):  # an input truncated under a reader reads as a bad record or a dead worker
        check_unchanged(fingerprints)
        raise
    check_unchanged(fingerprints)  # a second hash pass: what was read is what the identity names
    timings["tokenize"] = time.perf_counter() - t

    # layout: lengths -> long-doc policy -> pack -> row order, saved for the write tasks (reused on resume)
    t = time.perf_counter()
    saved = layout.saved(work / "layout")
    reused["layout"] = saved is not None
    if saved is None:
        lengths = spool.lengths(spool_dir, len(tasks))
        if not (lengths > 0).any():
            rejected = write_rejects(out, spool_dir, results)  # every record rejected: not an "empty corpus"
            if not rejected:
                raise ValueError(f"empty corpus: {len(lengths)} documents, none with any tokens, in "
                                 f"{', '.join(inputs)}")
            raise ValueError(f"no document with any tokens in {', '.join(inputs)}: {len(lengths)} records, "
                             f"{int((lengths == 0).sum())} empty, {int((lengths < 0).sum())} rejected "
                             f"({', '.join(f'{k}: {n}' for k, n in rejected.items())}); see {out / 'rejects.jsonl'}")
        select = None
        if config.sources:  # a mixture: which documents, how many times (over the spool: nothing is re-tokenized)
            source_docs = np.bincount(task_source, [r.docs for r in results], len(config.sources)).astype(np.int64)
            select = mixture.select(lengths, source_docs, config)
        lay, counts, stats = layout.plan(lengths, config, select)
        if select is not None:
            counts["sources"] = select.sources
        layout.save(work / "layout", lay, np.array([r.tokens for r in results], np.int64), counts, stats)
        del lengths, lay
    else:
        counts, stats = saved
    if counts["rows"] == 0:
        write_rejects(out, spool_dir, results)
        raise ValueError(f"nothing left to pack: all {counts['input_docs']} documents were dropped or rejected "
                         f"(dropped {counts['dropped']}, rejected {counts['rejected']}); see --long-docs / --on-error")
    kill_hook("pack")
    timings["pack"] = time.perf_counter() - t

    # write: one task per shard, gathering its rows from the spool
    t = time.perf_counter()
    padding = layout.padding(config, tok)  # --pad-docs-to-multiple: the pad token (the tokenizer's, else EOS)
    wctx = WriteContext.plan(out, work, counts["rows"], config.rows_per_shard, config.seq_len, len(config.sources),
                             padding and padding["pad_id"])
    reused["shards"] = sum(shard_done(wctx, k) is not None for k in range(wctx.num_shards))
    if resumed:
        progress.log(f"resuming {out}: reusing {reused['tokenize_tasks']}/{len(tasks)} tokenize tasks, "
                     f"{'the' if reused['layout'] else 'no'} packing plan, {reused['shards']}/{wctx.num_shards} shards")
    shards: list[dict] = [None] * wctx.num_shards
    with progress.stage("write", wctx.num_shards, "shards") as bar:
        writer = LocalExecutor(config.workers) if ship else executor  # the spool is on this host only
        for n, info in enumerate(writer.imap(write_shard_task, range(wctx.num_shards), wctx), 1):
            shards[info["index"]] = {k: v for k, v in info.items() if k != "index"}
            bar.advance(1, rows=info["rows"], tokens=info["tokens"])
            kill_hook(f"write:{n}")
            if uploader:
                uploader.shard(info)
                kill_hook(f"upload:{n}")  # test hook: dies with uploads in flight
    counts["loss_tokens"] = sum(s["loss_tokens"] for s in shards)
    if config.sources:
        mixture.add_loss_tokens(counts["sources"], shards)
    data_fingerprint = dataset_fingerprint(shards)
    write_hf_metadata(out, [s["file"] for s in shards], data_fingerprint, description="packprep build",
                      padded=padding is not None)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    counts["rejected_reasons"] = write_rejects(out, spool_dir, results)
    counts["label_tokens"] = sum(s["label_tokens"] for s in shards)
    manifest.note_counts(counts, results, config.special_tokens_in_text, progress.log)

    # manifest: last; a folder without it is an unfinished build
    tokenizer = {"name": config.tokenizer, "sha256": tokenizer_sha256(tok_dir), "vocab_size": tok.vocab_size,
                 "eos_id": tok.eos_id, "backend": backend, "backend_reason": backend_why}
    record = manifest.input_records(fingerprints, files, tasks, results, expansion)
    done = manifest.write(out, config, tokenizer, record, counts, stats, shards, data_fingerprint, timings,
                          reused if resumed else None, padding)
    spool.delete(spool_dir)
    if uploader:
        remote.publish(uploader, out, done)
        return BuildResult(url, done)
    workdir.finish(out)
    return BuildResult(out, done)


def _load_tokenizer(tok_dir: Path, config: BuildConfig, tasks) -> tuple[str, str, Tokenizer]:
    """The tokenizer backend (`--tokenizer-backend`, auto: tiktoken where it equals HF on the first task) and the
    tokenizer; a truncated or foreign tokenizer.json is one line, not the tokenizers library's bare Exception."""
    try:
        return choose_backend(tok_dir, config.tokenizer_backend, tasks, config.special_tokens_in_text)
    except (ValueError, ImportError, OSError) as e:
        if not isinstance(e, json.JSONDecodeError):
            raise
        reason = str(e)
    except Exception as e:  # the tokenizers library raises a bare Exception on a truncated or foreign file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"{tok_dir}: cannot load the tokenizer ({reason}); is tokenizer.json complete and valid JSON? "
                     "Copy it again or pass another --tokenizer")
