"""Weighted mixtures: which documents of each `[[sources]]` table go into the output, and how many times.

    files = resolve(config.sources)                           # per source: [(file, kind)], bad paths first
    tasks, task_source = plan(config.sources, files, chunk)   # one task list, sources in order
    sel = select(lengths, source_docs, config)                # after tokenize: a selection over the spool's documents
    lay, counts, stats = layout.plan(lengths, config, sel)    # each selected copy brings its pieces

A source's size is counted in output tokens (what it gives after --long-docs: a truncated document counts seq_len, a
dropped one nothing):
- weights are relative (normalized to sum to 1) token shares: target_s = w_s * total, where total is --max-tokens or,
  by default, min_s(tokens_s / w_s), so the source that runs out first is taken whole, once, and the others are
  subsampled. A source whose target exceeds its size is repeated.
- epochs: target_s = epochs_s * tokens_s.
A target is met by whole copies of every document (target // tokens_s) plus a seeded subsample of the remainder:
documents in a seeded random order up to the last one that fits, then the one document left whose length is closest
to the gap (or the next one, dropping the taken document closest to its overshoot), only if it narrows the gap. A
source of thousands of documents misses its target by a few tokens, so the realized shares are the weights to ~1e-5
once the output holds a few hundred thousand tokens.

Doc ids (the shards' doc_ids column, int64): source << 48 | repeat << 32 | record, `record` counting the source's
records in input order. A build without sources is one source without repeats: its doc_ids are the record indices.

Cost: a permutation and a cumulative sum per source (O(documents) numpy) and 16 bytes per selected copy; `Tally`
(verify) keeps 8 bytes per piece to count distinct copies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from packprep import storage
from packprep.config import BuildConfig, Source
from packprep.inputs import ReadTask, plan_tasks, resolve_inputs

SOURCE_SHIFT, REPEAT_SHIFT = 48, 32
MAX_SOURCES, MAX_REPEATS, MAX_RECORDS = 1 << 15, 1 << 16, 1 << 32


def doc_ids(source: int | np.ndarray, repeat: np.ndarray, record: np.ndarray) -> np.ndarray:
    """(source 2, repeat 1, record 7) -> 2 << 48 | 1 << 32 | 7."""
    return (np.int64(source) << SOURCE_SHIFT) | (repeat.astype(np.int64) << REPEAT_SHIFT) | record.astype(np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """doc_ids -> (source, repeat, record), the inverse of `doc_ids`."""
    ids = np.asarray(ids, np.int64)
    return ids >> SOURCE_SHIFT, (ids >> REPEAT_SHIFT) & (MAX_REPEATS - 1), ids & (MAX_RECORDS - 1)


# ---------------------------------------------------------------------------------------------------- planning


def _name(i: int, source: Source) -> str:
    return f"[[sources]] #{i + 1} ({', '.join(source.paths)})"


def resolve(sources: tuple[Source, ...]) -> list[list[tuple[Path, str]]]:
    """Each source's files; a file named by two sources is refused (its documents would be sampled twice)."""
    if len(sources) > MAX_SOURCES:
        raise ValueError(f"{len(sources)} [[sources]]; at most {MAX_SOURCES} fit in doc_ids")
    files = [resolve_inputs(s.paths) for s in sources]
    owner: dict[str, int] = {}
    for i, fs in enumerate(files):
        for f, _ in fs:
            j = owner.setdefault(_same_file_key(f), i)
            if j != i:
                raise ValueError(f"{f} is in [[sources]] #{j + 1} and #{i + 1}; give each file to one source")
    return files


def _same_file_key(f) -> str:
    """One key per file however it is named: a local path resolved (links, '..'); a URL in its filesystem's canonical
    form ('s3a://corp/a.jsonl' is 's3://corp/a.jsonl'), its key kept as it is ('a//b' and 'a/b' are two objects)."""
    if not storage.is_remote(f):
        return str(Path(f).resolve())
    return storage.url(*storage.filesystem(f))


def plan(sources: tuple[Source, ...], files: list, chunk_bytes: int) -> tuple[list[ReadTask], np.ndarray]:
    """Read tasks of every source, each with its own format and field flags, in source order; and each task's
    source index."""
    tasks, task_source = [], []
    for i, (s, fs) in enumerate(zip(sources, files)):
        t = plan_tasks(fs, chunk_bytes=chunk_bytes, format=s.format, text_field=s.text_field,
                       prompt_field=s.prompt_field, completion_field=s.completion_field,
                       messages_field=s.messages_field)
        tasks += t
        task_source += [i] * len(t)
    return [replace(t, index=k) for k, t in enumerate(tasks)], np.array(task_source, np.int64)


# ---------------------------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """The output's document copies, ordered by record then repeat, and the per-source summary."""

    doc: np.ndarray  # int64: spool record index of each copy
    doc_id: np.ndarray  # int64: its doc id (source, repeat, record)
    sources: list[dict]  # counts.sources (loss_tokens filled in after the write, `add_loss_tokens`)

    def pieces(self, piece_doc: np.ndarray, piece_start: np.ndarray, piece_len: np.ndarray):
        """Per-record pieces (piece_doc ascending) -> the pieces of every copy, and each piece's doc id."""
        from packprep.write import _ranges

        first = np.searchsorted(piece_doc, self.doc, side="left")
        n = np.searchsorted(piece_doc, self.doc, side="right") - first
        idx = _ranges(first, n)
        return piece_doc[idx], piece_start[idx], piece_len[idx], np.repeat(self.doc_id, n)


def output_tokens(lengths: np.ndarray, seq_len: int, long_docs: str) -> np.ndarray:
    """Tokens each record gives the output under --long-docs (0: empty, rejected or dropped)."""
    tokens = np.maximum(lengths, 0).astype(np.int64)
    if long_docs == "truncate":
        return np.minimum(tokens, seq_len)
    if long_docs == "drop":
        tokens[tokens > seq_len] = 0
    return tokens


def targets(sources: tuple[Source, ...], available: np.ndarray, max_tokens: int | None) -> np.ndarray:
    """Output tokens wanted from each source (see the module docstring)."""
    if sources[0].weight is None:
        return np.array([round(s.epochs * int(n)) for s, n in zip(sources, available)], np.int64)
    w = np.array([s.weight for s in sources], np.float64)
    w /= w.sum()
    if max_tokens is not None:
        return np.rint(w * max_tokens).astype(np.int64)
    return np.minimum(np.rint(w * (available / w).min()).astype(np.int64), available)  # the limiting one: all of it


def sample(tokens: np.ndarray, target: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(records, repeats) of one source whose tokens add up to `target` within a few tokens: whole copies, then a
    seeded prefix of a random order, then one document that best fills the gap."""
    candidates = np.flatnonzero(tokens > 0)
    copies, rest = divmod(int(target), int(tokens.sum()))
    if copies + (rest > 0) > MAX_REPEATS:
        raise ValueError(f"a source would be repeated {copies + 1} times; at most {MAX_REPEATS} fit in doc_ids")
    records = [np.tile(candidates, copies)]
    repeats = [np.repeat(np.arange(copies, dtype=np.int64), len(candidates))]
    if rest:
        order = rng.permutation(candidates)
        cum = np.cumsum(tokens[order])
        n = int(np.searchsorted(cum, rest, side="right"))  # order[:n] fit; n < len(order) as rest < cum[-1]
        gap = rest - (int(cum[n - 1]) if n else 0)
        take, left = order[:n], order[n:]
        if gap:  # the best of: stop here, add the document left that best fills the gap, or add the next one and
            # drop the taken document that best cancels its overshoot (when few are left to choose from)
            add = np.abs(tokens[left] - gap)
            a = int(np.argmin(add))
            over = tokens[left[0]] - gap
            swap = np.abs(tokens[take] - over) if n else np.array([gap])
            b = int(np.argmin(swap))
            if min(add[a], swap[b]) < gap:
                take = np.append(take, left[a]) if add[a] <= swap[b] else np.append(np.delete(take, b), left[0])
        records.append(take)
        repeats.append(np.full(len(take), copies, np.int64))
    return np.concatenate(records), np.concatenate(repeats)


def select(lengths: np.ndarray, source_docs: np.ndarray, config: BuildConfig) -> Selection:
    """The copies of documents that make up the output (lengths: every record's spool length, sources' records
    back to back, `source_docs` of them per source)."""
    sources = config.sources
    tokens = output_tokens(lengths, config.seq_len, config.long_docs)
    base = np.concatenate([[0], np.cumsum(source_docs)]).astype(np.int64)
    available = np.array([tokens[base[i]:base[i + 1]].sum() for i in range(len(sources))], np.int64)
    for i, s in enumerate(sources):
        if available[i] == 0:
            raise ValueError(f"{_name(i, s)} has no tokens to sample ({source_docs[i]} records, all empty, rejected "
                             "or dropped by --long-docs)")
        if source_docs[i] > MAX_RECORDS:
            raise ValueError(f"{_name(i, s)} holds {source_docs[i]:,} records; at most {MAX_RECORDS:,} fit in doc_ids")
    want = targets(sources, available, config.max_tokens)
    if sources[0].weight is not None:
        share = np.array([s.weight for s in sources]) / sum(s.weight for s in sources)
    else:
        share = want / want.sum()
    docs, ids, summary = [], [], []
    for i, s in enumerate(sources):
        rng = np.random.default_rng([config.seed, i, 0x6D6978])  # one stream per source, apart from the row shuffle
        local, repeat = sample(tokens[base[i]:base[i + 1]], int(want[i]), rng)
        order = np.lexsort((repeat, local))
        local, repeat = local[order], repeat[order]
        docs.append(base[i] + local)
        ids.append(doc_ids(i, repeat, local))
        summary.append({"paths": list(s.paths), "weight": s.weight, "epochs": s.epochs,
                        "target_share": float(share[i]), "input_docs": int(source_docs[i]),
                        "input_tokens": int(available[i]), "docs": len(local),
                        "unique_docs": int(len(np.unique(local))), "tokens": int(tokens[base[i] + local].sum()),
                        "loss_tokens": None})
    total = sum(s["tokens"] for s in summary)
    for s in summary:
        s["share"] = s["tokens"] / total
    return Selection(np.concatenate(docs), np.concatenate(ids), summary)


# ---------------------------------------------------------------------------------------------------- accounting


def batch_tokens(batch: pa.RecordBatch, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss tokens) per source in a record batch of shard rows (a padded build's real tokens only)."""
    lengths = batch.column("seq_lengths").flatten().to_numpy()
    source = batch.column("doc_ids").flatten().to_numpy() >> SOURCE_SHIFT
    mask = batch.column("loss_mask").flatten().to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if "doc_offsets_unpadded" in batch.schema.names:  # per row [0, r1, r1+r2, ...] -> [r1, r2, ...]
        col = batch.column("doc_offsets_unpadded")
        o, u = col.offsets.to_numpy(), col.values.to_numpy()
        lengths = np.delete(u[o[0]:o[-1]], o[:-1] - o[0]) - np.delete(u[o[0]:o[-1]], o[1:] - 1 - o[0])
    loss = np.add.reduceat(mask.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    if len(source) and (source.min() < 0 or source.max() >= n_sources):
        raise ValueError(f"doc_ids name sources outside [0, {n_sources})")
    tally = [np.bincount(source, weights=w, minlength=n_sources).astype(np.int64) for w in (lengths, loss)]
    return tally[0], tally[1]


def add_loss_tokens(sources: list[dict], shards: list[dict]) -> None:
    """counts.sources' loss tokens from the write tasks' per-shard tallies."""
    for i, s in enumerate(sources):
        s["loss_tokens"] = sum(sh["source_loss_tokens"][i] for sh in shards)


class Tally:
    """`verify`'s recount of counts.sources from the shards: tokens, loss tokens, distinct copies and records."""

    def __init__(self, sources: list[dict]):
        self.sources = sources
        self.base = np.concatenate([[0], np.cumsum([s["input_docs"] for s in sources])]).astype(np.int64)
        self.tokens = np.zeros(len(sources), np.int64)
        self.loss = np.zeros(len(sources), np.int64)
        self.ids: list[np.ndarray] = []

    def add(self, batch: pa.RecordBatch) -> np.ndarray:
        """Tally one batch; returns its pieces' spool record indices (-1 for an id naming no record)."""
        source, _, record = split_ids(batch.column("doc_ids").flatten().to_numpy())
        n = len(self.sources)
        valid = (source >= 0) & (source < n)
        valid[valid] &= record[valid] < np.diff(self.base)[source[valid]]
        if valid.all():
            tokens, loss = batch_tokens(batch, n)
            self.tokens += tokens
            self.loss += loss
        self.ids.append(batch.column("doc_ids").flatten().to_numpy()[valid])
        return np.where(valid, self.base[np.minimum(source, n - 1)] + record, -1)

    def problems(self, counts: dict) -> list[str]:
        ids = np.unique(np.concatenate(self.ids)) if self.ids else np.zeros(0, np.int64)
        source, _, record = split_ids(ids)
        total = int(self.tokens.sum())
        out = []
        if int(self.base[-1]) != counts["input_docs"]:
            out.append(f"sources' input_docs add up to {int(self.base[-1])}, not {counts['input_docs']}")
        for i, s in enumerate(self.sources):
            found = {"docs": int((source == i).sum()), "unique_docs": len(np.unique(record[source == i])),
                     "tokens": int(self.tokens[i]), "loss_tokens": int(self.loss[i])}
            wrong = [f"{k} {s[k]} (shards: {v})" for k, v in found.items() if s[k] != v]
            if total and abs(s["share"] - self.tokens[i] / total) > 1e-9:
                wrong.append(f"share {s['share']} (shards: {self.tokens[i] / total})")
            if wrong:
                out.append(f"source #{i + 1}: {', '.join(wrong)}")
        return out
