"""The build manifest, packprep.json: what a finished build holds and how it was made, written last (the commit point:
a folder without it is an unfinished build). Its readers: `workdir.same_build` (is this the same build?), `verify`,
`report` (inspect), the trainer's `BuildInfo` and the exporters.

Owns its content: the config, the tokenizer (name, sha256, vocabulary, backend), the padding of a
--pad-docs-to-multiple build (N, pad id and token: format 1.2), the inputs (fingerprints, per-file
documents, files left out), counts, packing statistics, per-shard rows/tokens/sha256, timings. Cost: one small JSON
file, written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

import packprep
from packprep import storage
from packprep.inputs import file_size
from packprep.shards import FORMAT_MINOR, FORMAT_MINOR_PADDED, FORMAT_VERSION, MANIFEST, write_json_atomic


def note_counts(counts: dict, results, special_tokens_in_text: str, log) -> None:
    """Counts the tokenize tasks noted per document: special-token strings in the text, chats with no loss."""
    for note in ("special_in_text", "no_assistant"):
        counts[note] = sum(r.notes.get(note, 0) for r in results)
    if counts["special_in_text"]:
        log(f"warning: {counts['special_in_text']} documents hold special-token strings in their text "
            f"(parsed as special tokens, HF's default; --special-tokens-in-text literal keeps them text)"
            if special_tokens_in_text == "parse" else
            f"note: {counts['special_in_text']} documents hold special-token strings, encoded as text")


def write(out: Path, config, tokenizer: dict, inputs: dict, counts: dict, stats: dict, shards: list[dict],
          fingerprint: str, timings: dict, reused: dict | None, padding: dict | None = None) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "format_minor": FORMAT_MINOR if padding is None else FORMAT_MINOR_PADDED,
        "packprep_version": packprep.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {**config.to_dict(), "storage_options": storage.redacted(config.storage_options)},
        "tokenizer": tokenizer,
        "inputs": inputs,
        "seq_len": config.seq_len,
        "strategy": config.strategy,
        "seed": config.seed,
        "shuffle": config.shuffle,
        "counts": counts,
        "packing": stats,
        "shards": shards,
        "fingerprint": fingerprint,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "resumed": reused,  # finished work an earlier, interrupted run left and this one reused
    }
    if padding is not None:  # --pad-docs-to-multiple: N, the pad token and where it came from (layout.padding)
        manifest["padding"] = padding
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def input_records(fingerprints, files, tasks, results, expansion=None) -> dict:
    """{"specs": what was asked for (path, size, content hash of each file), "files": per file kind, format, docs,
    "ignored": each file a folder or glob held that was left out, with the reason}."""
    docs: dict[str, int] = {}
    fmt: dict[str, str] = {}
    for task, r in zip(tasks, results):
        docs[task.path] = docs.get(task.path, 0) + r.docs
        fmt[task.path] = task.format.name
    return {"specs": fingerprints,
            "files": [{"path": str(f), "kind": k, "format": fmt.get(str(f)), "docs": docs.get(str(f), 0),
                       "bytes": file_size(f)} for f, k in files],
            "ignored": [{"path": p, "reason": why} for p, why in (expansion.ignored if expansion else [])]}
