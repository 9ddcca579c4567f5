"""`build(config)`: the build's stages wired together, and nothing else.

    plan (inputs -> read tasks) -> tokenize (tasks -> spool) -> layout (lengths -> long-doc policy -> pack -> row
    order) -> write (spool -> shards) -> manifest (packprep.json, last)

Each stage lives in its own module and owns its files: `inputs` + `readers` + `records` (inputs, read tasks,
record formats), `tokenizer` (the tokenize task), `spool`, `layout`, `write` + `shards`, and `workdir` (the lock,
the build identity, resume). Tasks run on an executor (`packprep.executor`, or Ray) and their results are ordered
by task index here, so the bytes do not depend on --workers. A build killed anywhere is finished by rerunning the
same command (see `workdir`).

Cost: tokenizer-bound (the tokenize stage is nearly all of the time; benchmarks/RESULTS.md). The driver holds the
int32 length array (4 bytes per document) and the plan (~40 bytes per piece); workers hold one task at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import packprep
from packprep import layout, spool, workdir
from packprep.config import BuildConfig
from packprep.executor import Executor, make_executor
from packprep.inputs import DEFAULT_CORPUS, TASK_PLAN_VERSION, fingerprint, plan_tasks, resolve_inputs, stdlib_corpus
from packprep.report import Progress
from packprep.shards import FORMAT_MINOR, FORMAT_VERSION, MANIFEST, write_hf_metadata, write_json_atomic
from packprep.tiktoken_backend import choose_backend
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
from packprep.write import WriteContext, dataset_fingerprint, shard_done, write_rejects, write_shard_task


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: dict
    already_built: bool = False  # the folder held a finished build of the same config and inputs


def build(config: BuildConfig, progress: Progress | None = None, executor: Executor | None = None) -> BuildResult:
    """Run a whole build; returns the manifest (also written to OUT/packprep.json, last).

    Resumable: rerunning the same config on an unfinished OUT reuses every finished task (`packprep.workdir`).
    """
    progress = progress or Progress(enabled=False)
    own = executor is None
    executor = executor or make_executor(config.executor, config.workers, config.ray_address)
    try:
        with workdir.locked(Path(config.out)):
            return _build(config, progress, executor)
    finally:
        if own:
            getattr(executor, "shutdown", lambda: None)()  # a Ray runtime this build started stops with it


def _build(config: BuildConfig, progress: Progress, executor: Executor) -> BuildResult:
    out, t0, timings = Path(config.out), time.perf_counter(), {}
    inputs = list(config.inputs) or [DEFAULT_CORPUS]
    files = resolve_inputs(inputs) if config.inputs else None  # bad paths fail first, before touching `out`
    fingerprints = [fingerprint(s) for s in inputs]
    ident = workdir.identity(config, fingerprints, TASK_PLAN_VERSION, tokenizer_fingerprint(config.tokenizer))
    previous = workdir.check_out(out, config, ident)
    if previous is not None:
        workdir.finish(out)  # a build killed after its manifest, before its work folder was removed
        return BuildResult(out, previous, already_built=True)
    resumed = workdir.prepare(out, ident, config.overwrite, progress)
    work = workdir.path(out)

    # plan: inputs -> files -> read tasks; the tokenizer resolved to a local folder and loaded once
    if inputs == [DEFAULT_CORPUS]:
        progress.log("no inputs given: building the embedded default corpus (this Python's standard library)")
        files = resolve_inputs([stdlib_corpus(work / "python-stdlib.parquet")])
    tok_dir = resolve_tokenizer(config.tokenizer, work)
    tasks = plan_tasks(files, chunk_bytes=config.chunk_bytes, format=config.format, text_field=config.text_field,
                       prompt_field=config.prompt_field, completion_field=config.completion_field,
                       messages_field=config.messages_field)
    backend, backend_why = choose_backend(tok_dir, config.tokenizer_backend, tasks,
                                          config.special_tokens_in_text)
    if config.tokenizer_backend == "auto":
        progress.log(f"tokenizer backend: {backend} ({backend_why})")
    tok = Tokenizer(tok_dir, backend, config.special_tokens_in_text)
    preload(tok)
    if any(t.format.name in ("chat", "sharegpt") for t in tasks) and tok.chat_template is None:
        raise ValueError(f"tokenizer {config.tokenizer!r} has no chat template; chat data needs one")
    timings["prepare"] = time.perf_counter() - t0

    # tokenize: one task per input chunk -> its spool files; results ordered by task index
    t = time.perf_counter()
    spool_dir = work / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True)
    reused = {"tokenize_tasks": sum(spool.finished(spool_dir, i) is not None for i in range(len(tasks)))}
    results: list[spool.TaskResult] = [None] * len(tasks)
    ctx = TokenizeContext(str(tok_dir), str(spool_dir), config.on_error, backend, config.special_tokens_in_text)
    with progress.stage("tokenize", len(tasks), "chunks") as bar:
        for n, r in enumerate(executor.imap(tokenize_task, tasks, ctx), 1):
            results[r.index] = r
            bar.advance(1, docs=r.docs, tokens=r.tokens)
            kill_hook(f"tokenize:{n}")
    timings["tokenize"] = time.perf_counter() - t

    # layout: lengths -> long-doc policy -> pack -> row order, saved for the write tasks (reused on resume)
    t = time.perf_counter()
    saved = layout.saved(work / "layout")
    reused["layout"] = saved is not None
    if saved is None:
        lengths = spool.lengths(spool_dir, len(tasks))
        if not (lengths > 0).any():
            raise ValueError(f"empty corpus: {len(lengths)} documents, none with any tokens, in {', '.join(inputs)}")
        lay, counts, stats = layout.plan(lengths, config)
        layout.save(work / "layout", lay, np.array([r.tokens for r in results], np.int64), counts, stats)
        del lengths, lay
    else:
        counts, stats = saved
    if counts["rows"] == 0:
        raise ValueError(f"nothing left to pack: all {counts['input_docs']} documents were dropped or rejected "
                         f"(dropped {counts['dropped']}, rejected {counts['rejected']}); see --long-docs / --on-error")
    kill_hook("pack")
    timings["pack"] = time.perf_counter() - t

    # write: one task per shard, gathering its rows from the spool
    t = time.perf_counter()
    wctx = WriteContext.plan(out, work, counts["rows"], config.rows_per_shard, config.seq_len)
    reused["shards"] = sum(shard_done(wctx, k) is not None for k in range(wctx.num_shards))
    if resumed:
        progress.log(f"resuming {out}: reusing {reused['tokenize_tasks']}/{len(tasks)} tokenize tasks, "
                     f"{'the' if reused['layout'] else 'no'} packing plan, {reused['shards']}/{wctx.num_shards} shards")
    shards: list[dict] = [None] * wctx.num_shards
    with progress.stage("write", wctx.num_shards, "shards") as bar:
        for n, info in enumerate(executor.imap(write_shard_task, range(wctx.num_shards), wctx), 1):
            shards[info["index"]] = {k: v for k, v in info.items() if k != "index"}
            bar.advance(1, rows=info["rows"], tokens=info["tokens"])
            kill_hook(f"write:{n}")
    counts["loss_tokens"] = sum(s["loss_tokens"] for s in shards)
    data_fingerprint = dataset_fingerprint(shards)
    write_hf_metadata(out, [s["file"] for s in shards], data_fingerprint, description="packprep build")
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    counts["rejected_reasons"] = write_rejects(out, spool_dir, results)
    counts["label_tokens"] = sum(s["label_tokens"] for s in shards)
    for note in ("special_in_text", "no_assistant"):  # documents holding special-token strings; chats with no loss
        counts[note] = sum(r.notes.get(note, 0) for r in results)
    if counts["special_in_text"]:
        progress.log(f"warning: {counts['special_in_text']} documents hold special-token strings in their text "
                     f"(parsed as special tokens, HF's default; --special-tokens-in-text literal keeps them text)"
                     if config.special_tokens_in_text == "parse" else
                     f"note: {counts['special_in_text']} documents hold special-token strings, encoded as text")

    # manifest: last; a folder without it is an unfinished build
    manifest = {
        "format_version": FORMAT_VERSION,
        "format_minor": FORMAT_MINOR,
        "packprep_version": packprep.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict(),
        "tokenizer": {"name": config.tokenizer, "sha256": tokenizer_sha256(tok_dir), "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "backend": backend, "backend_reason": backend_why},
        "inputs": _input_records(fingerprints, files, tasks, results),
        "seq_len": config.seq_len,
        "strategy": config.strategy,
        "seed": config.seed,
        "shuffle": config.shuffle,
        "counts": counts,
        "packing": stats,
        "shards": shards,
        "fingerprint": data_fingerprint,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "resumed": reused if resumed else None,  # finished work an earlier, interrupted run left and this one reused
    }
    write_json_atomic(out / MANIFEST, manifest)
    spool.delete(spool_dir)
    workdir.finish(out)
    return BuildResult(out, manifest)


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
