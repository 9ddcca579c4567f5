"""`verify(out)`: the one checker of a build folder, for `packprep verify` and the tests.

Checks: manifest present, readable and of the expected shape (types, shard names: no path leaves the folder);
the HF metadata load_from_disk reads (state.json's keys, dataset_info.json's features = the shard schema); state.json
lists exactly the manifest's shards, and no other data-* file (a
temp file, another build's shard) lies beside them; every shard's sha256, rows and tokens match the manifest; per
row (vectorised over list offsets): 1 <= tokens <= seq_len, doc_offsets run 0 < ... = len(input_ids) strictly
increasing, seq_lengths = diff(doc_offsets), loss_mask as long as input_ids and 0/1, labels (where the shards have
them) = input_ids where loss_mask else -100 with -100 at each piece's first token, one doc_id per piece within [0,
input_docs); accounting: every input document is packed or counted, input docs = packed + truncated + split +
dropped (empty, too long) + rejected, the rejected ones by reason add up and rejects.jsonl holds one line each; the
distinct documents found in the shards = packed + truncated + split; a padded build (format 1.2): slots of
multiples of N holding each document's real tokens (doc_offsets_unpadded) then pad tokens without loss; a
mixture's counts.sources (docs, distinct documents, tokens, loss tokens, shares) recounted from the shards
(`packprep.mixture.Tally`).
Cost: one sha256 pass over the shards plus O(tokens) numpy work on memory-mapped columns (~1 GB/s).
`verify(out, tokens=N)` (`packprep verify --tokens N`) adds `check_tokens`: N sampled documents against the
reference tokenization of `packprep.reference` (transformers), which names the first difference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from packprep.mixture import Tally
from packprep.shards import MANIFEST, SCHEMA, SCHEMA_PADDED, open_shard, sha256_file


@dataclass
class Report:
    """Named checks, each passed or failed with a reason; `ok` only if all passed."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(passed for _, passed, _ in self.checks)

    def add(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(passed), detail))
        return bool(passed)

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, passed, detail in self.checks if not passed]


def verify(out: str | Path, tokens: int = 0, seed: int = 0, tokenizer: str | None = None) -> Report:
    """Check a build folder (a remote build, s3://..., is staged to a local cache first: `remote.stage`); with
    `tokens` > 0, also that many sampled documents against the reference tokenization (`check_tokens`)."""
    from packprep.remote import stage

    out, report = stage(str(out)), Report()
    try:
        _verify(out, report)
    except (KeyError, TypeError, AttributeError, ValueError, MemoryError) as e:  # another version's, or hand-edited
        report.add("manifest", False, f"malformed: missing or wrong-typed entry {e}")
    if tokens > 0 and (out / MANIFEST).is_file():
        check_tokens(out, tokens, seed, report, tokenizer)
    return report


def check_tokens(out: str | Path, n: int, seed: int = 0, report: Report | None = None,
                 tokenizer: str | None = None) -> Report:
    """N sampled documents (seeded) re-read from the recorded inputs and tokenized by `packprep.reference`
    (transformers): tokens, loss_mask and labels must equal the shards'; a failure names the first difference."""
    from packprep.reference import check_build

    report = report if report is not None else Report()
    for name, passed, detail in check_build(out, n, seed, tokenizer):
        report.add(name, passed, detail)
    return report


def _verify(out: Path, report: Report) -> Report:
    manifest_path = out / MANIFEST
    if not report.add("manifest", manifest_path.is_file(), f"no {MANIFEST}: the build did not finish"):
        return report
    try:
        m = json.loads(manifest_path.read_text())
        shards, seq_len, counts = m["shards"], int(m["seq_len"]), m["counts"]
    except (ValueError, KeyError, TypeError) as e:
        report.add("manifest", False, f"unreadable: {e}")
        return report
    shape = manifest_problems(m)
    if not report.add("manifest shape", not shape, f"malformed: {shape}; rebuild or restore it"):
        return report
    padding = m.get("padding")  # a --pad-docs-to-multiple build (format 1.2)
    _check_hf_metadata(out, [s["file"] for s in shards], report, SCHEMA if padding is None else SCHEMA_PADDED)
    stray = sorted(p.name for p in out.glob("data-*") if p.name not in {s["file"] for s in shards})
    report.add("no stray shards", not stray, f"{stray[:3]} ({len(stray)}) are not part of the build (a half-written "
               "temp file or a shard of another build)")

    seen = np.zeros(counts["input_docs"], dtype=bool)
    tally = Tally(counts["sources"]) if "sources" in counts else None  # a mixture: recounted per source
    totals = {"rows": 0, "tokens": 0, "pieces": 0}
    for s in shards:
        path = out / s["file"]
        name = s["file"]
        if not report.add(f"{name} present", path.is_file(), "missing"):
            continue
        digest = sha256_file(path)
        if not report.add(f"{name} sha256", digest == s["sha256"], f"{digest[:16]}... != manifest "
                          f"{s['sha256'][:16]}... (the file changed after the build)"):
            continue
        try:
            table = open_shard(path)
        except (pa.ArrowInvalid, OSError) as e:
            report.add(f"{name} readable", False, str(e))
            continue
        problems = _check_rows(table, seq_len, seen, tally)
        if padding is not None and not problems:
            problems = _check_padding(table, padding)
        report.add(f"{name} rows", not problems, "; ".join(problems))
        n_tokens = sum(len(c.values) for c in table.column("input_ids").chunks)
        report.add(f"{name} counts", (table.num_rows, n_tokens) == (s["rows"], s["tokens"]),
                   f"{table.num_rows} rows / {n_tokens} tokens, manifest {s['rows']} / {s['tokens']}")
        totals["rows"] += table.num_rows
        totals["tokens"] += n_tokens
        totals["pieces"] += sum(len(c.values) for c in table.column("doc_ids").chunks)

    dropped = sum(counts["dropped"].values())
    accounted = counts["packed"] + counts["truncated"] + counts["split"] + dropped + counts["rejected"]
    report.add("doc accounting", accounted == counts["input_docs"],
               f"packed {counts['packed']} + truncated {counts['truncated']} + split {counts['split']} + dropped "
               f"{dropped} + rejected {counts['rejected']} = {accounted} != input docs {counts['input_docs']}")
    rejected, reasons = counts["rejected"], counts.get("rejected_reasons", {})
    report.add("rejects", sum(reasons.values()) == rejected and _lines(out / "rejects.jsonl") == rejected,
               f"rejected {rejected}, by reason {reasons}, {_lines(out / 'rejects.jsonl')} lines in rejects.jsonl")
    in_shards = counts["packed"] + counts["truncated"] + counts["split"]
    if tally is not None:  # a mixture holds the documents it sampled
        problems = tally.problems(counts)
        report.add("sources", not problems, "; ".join(problems))
        in_shards = sum(s["unique_docs"] for s in counts["sources"])
    report.add("docs in shards", int(seen.sum()) == in_shards,
               f"{int(seen.sum())} distinct documents in the shards, manifest says {in_shards} were packed")
    report.add("totals", all(totals[k] == counts[k] for k in totals),
               f"shards hold {totals}, manifest counts {({k: counts[k] for k in totals})}")
    return report


_SHARD = re.compile(r"data-\d{5,}-of-\d{5,}\.arrow")


def manifest_problems(m) -> str:
    """'' for a manifest of the shape verify reads, else the first entry that is missing or of the wrong type."""
    def ints(d, keys, where):
        return next((f"{where}.{k} is {d.get(k)!r}, expected an integer >= 0" for k in keys
                     if not isinstance(d.get(k), int) or isinstance(d.get(k), bool) or d[k] < 0), "")

    if not isinstance(m, dict):
        return f"expected a JSON object, got {type(m).__name__}"
    if not isinstance(m.get("seq_len"), int) or m["seq_len"] < 1:
        return f"seq_len is {m.get('seq_len')!r}, expected an integer >= 1"
    shards, counts = m.get("shards"), m.get("counts")
    if not isinstance(shards, list) or not all(isinstance(x, dict) for x in shards):
        return "shards is not a list of objects"
    for k, sh in enumerate(shards):
        if not isinstance(sh.get("file"), str) or not _SHARD.fullmatch(sh["file"]):
            return f"shards[{k}].file is {sh.get('file')!r}, expected a name like data-00000-of-00001.arrow"
        if not isinstance(sh.get("sha256"), str):
            return f"shards[{k}].sha256 is {sh.get('sha256')!r}, expected a hex digest"
        if problem := ints(sh, ("rows", "tokens"), f"shards[{k}]"):
            return problem
    if not isinstance(counts, dict):
        return "counts is not an object"
    if problem := ints(counts, ("input_docs", "packed", "truncated", "split", "rejected", "rows", "tokens",
                                "pieces"), "counts"):
        return problem
    for key in ("dropped", "rejected_reasons"):
        d = counts.get(key, {})
        if not isinstance(d, dict) or (problem := ints(d, list(d), f"counts.{key}")):
            return problem or f"counts.{key} is not an object"
    tokens = sum(sh["tokens"] for sh in shards)
    if counts["input_docs"] > tokens + sum(counts["dropped"].values()) + counts["rejected"]:
        return f"counts.input_docs {counts['input_docs']:,} exceeds what the shards and counts can account for"
    return ""


def _check_hf_metadata(out: Path, files: list[str], report: Report, schema: pa.Schema = SCHEMA) -> None:
    """What `datasets.load_from_disk(out)` reads: state.json listing exactly the shards, with the keys it needs, and
    dataset_info.json whose features are the shard schema's columns and types."""
    try:
        state = json.loads((out / "state.json").read_text())
        listed = [f["filename"] for f in state["_data_files"]]
        missing = [k for k in ("_fingerprint", "_format_type", "_format_kwargs", "_format_columns", "_split",
                               "_output_all_columns") if k not in state]
        problem = f"lists {listed}, the manifest has {files}" if listed != files else (
            f"lacks {missing}" if missing else "")
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem = f"missing or unreadable ({e})"
    report.add("state.json", not problem, f"{problem}; load_from_disk needs it as the build wrote it")
    expected = {f.name: str(f.type.value_type) for f in schema}
    try:
        features = json.loads((out / "dataset_info.json").read_text())["features"]
        found = {k: v["feature"]["dtype"] for k, v in features.items()
                 if v.get("_type") in ("List", "Sequence", "LargeList")}
        problem = "" if found == expected and len(found) == len(features) else (
            f"features {json.dumps(features)[:200]} are not the shards' columns {expected}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"missing or unreadable ({e})"
    report.add("dataset_info.json", not problem, f"{problem}; load_from_disk needs it as the build wrote it")


def _lines(path: Path) -> int:
    """Lines in a file (0 when it does not exist)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _check_rows(table: pa.Table, seq_len: int, seen: np.ndarray, tally: Tally | None = None) -> list[str]:
    """Row-level invariants over list offsets; marks the doc_ids found in `seen` (a mixture's ids: their records,
    tallied per source)."""
    problems = []
    for batch in table.to_batches():
        ids, offs, lens, mask, docs = (batch.column(c) for c in ("input_ids", "doc_offsets", "seq_lengths",
                                                                  "loss_mask", "doc_ids"))
        o_ids = ids.offsets.to_numpy()
        o_docs = offs.offsets.to_numpy()
        row_len = np.diff(o_ids)
        if row_len.min(initial=1) < 1 or row_len.max(initial=0) > seq_len:
            problems.append(f"row lengths outside 1..{seq_len} (max {row_len.max()})")
        v = offs.values.to_numpy()
        n_pieces = np.diff(o_docs) - 1
        if (n_pieces < 1).any():
            problems.append("a row without documents")
            break
        if (v[o_docs[:-1]] != 0).any() or (v[o_docs[1:] - 1] != row_len).any():
            problems.append("doc_offsets do not run from 0 to len(input_ids)")
        steps = np.delete(np.diff(v), o_docs[1:-1] - 1)  # within-row differences only
        if (steps <= 0).any():
            problems.append("doc_offsets not strictly increasing (an empty piece)")
        if not np.array_equal(lens.offsets.to_numpy(), o_docs - np.arange(len(o_docs))) or not np.array_equal(
                lens.values.to_numpy(), steps):
            problems.append("seq_lengths != diff(doc_offsets)")
        if not np.array_equal(mask.offsets.to_numpy(), o_ids) or mask.values.to_numpy().max(initial=0) > 1:
            problems.append("loss_mask not aligned with input_ids or not 0/1")
        if "labels" in batch.schema.names and not _labels_ok(batch.column("labels"), ids, mask, v, o_docs):
            problems.append("labels != input_ids where loss_mask, else -100 (and -100 at every piece's first token)")
        d = docs.values.to_numpy() if tally is None else tally.add(batch)
        if not np.array_equal(docs.offsets.to_numpy(), lens.offsets.to_numpy()):
            problems.append("doc_ids not one per piece")
        elif len(d) and (d.min() < 0 or d.max() >= len(seen)):
            problems.append(f"doc_ids outside [0, {len(seen)})")
        else:
            seen[d] = True
    return problems


def _labels_ok(labels, ids, mask, doc_offsets, o_docs) -> bool:
    """labels = input_ids where loss_mask else -100, and -100 at each piece's first token (HF's unshifted labels)."""
    # tokens [5 6 7 | 8 9], mask [1 1 1 | 0 1] -> labels [-100 6 7 | -100 9]
    o_ids = ids.offsets.to_numpy()
    if not np.array_equal(labels.offsets.to_numpy(), o_ids):
        return False
    lo, hi = o_ids[0], o_ids[-1]
    expected = np.where(mask.values.to_numpy()[lo:hi] != 0, ids.values.to_numpy()[lo:hi], -100)
    row = np.repeat(np.arange(len(o_ids) - 1), np.diff(o_docs) - 1)
    firsts = np.delete(doc_offsets[o_docs[0]:o_docs[-1]], o_docs[1:] - 1 - o_docs[0])  # each row's last entry out
    expected[firsts + o_ids[row] - lo] = -100
    return np.array_equal(labels.values.to_numpy()[lo:hi], expected)


def _check_padding(table: pa.Table, padding: dict) -> list[str]:
    """A padded build's rows: slots (doc_offsets) of lengths that are multiples of N, each its r real tokens then
    pad_id with loss_mask 0 (so labels -100), with 0 < r, slot - N < r <= slot and r = diff(doc_offsets_unpadded)."""
    mult, pad_id = int(padding["multiple"]), int(padding["pad_id"])
    if table.schema.names[-1] != "doc_offsets_unpadded":
        return ["no doc_offsets_unpadded column in a padded build"]
    for batch in table.to_batches():
        offs, unpadded = batch.column("doc_offsets"), batch.column("doc_offsets_unpadded")
        o_docs = offs.offsets.to_numpy()
        if not np.array_equal(unpadded.offsets.to_numpy(), o_docs):
            return ["doc_offsets_unpadded not one entry per doc_offsets entry"]
        within = np.ones(o_docs[-1] - o_docs[0] - 1, bool)  # differences inside a row, not across rows
        within[o_docs[1:-1] - 1 - o_docs[0]] = False
        slot = np.diff(offs.values.to_numpy()[o_docs[0]:o_docs[-1]])[within]
        u = unpadded.values.to_numpy()[o_docs[0]:o_docs[-1]]
        real = np.diff(u)[within]
        if (u[o_docs[:-1] - o_docs[0]] != 0).any() or (real <= 0).any() or (real > slot).any():
            return ["doc_offsets_unpadded do not run from 0 with 0 < real tokens <= slot per document"]
        if (slot % mult).any() or (slot - real >= mult).any():
            return [f"padded slots are not the real tokens rounded up to a multiple of {mult}"]
        ids, mask = batch.column("input_ids"), batch.column("loss_mask")
        o_ids = ids.offsets.to_numpy()
        starts = np.delete(offs.values.to_numpy()[o_docs[0]:o_docs[-1]], o_docs[1:] - 1 - o_docs[0])
        starts = starts + np.repeat(o_ids[:-1], np.diff(o_docs) - 1)  # each slot's first token in the flat column
        pads = np.ones(o_ids[-1], bool)  # positions past each slot's real tokens
        pads[:o_ids[0]] = False
        real_pos = np.repeat(starts - np.concatenate([[0], np.cumsum(real)[:-1]]), real) + np.arange(real.sum())
        pads[real_pos] = False
        pad_ids, pad_mask = ids.values.to_numpy()[: o_ids[-1]][pads], mask.values.to_numpy()[: o_ids[-1]][pads]
        if (pad_ids != pad_id).any() or pad_mask.any():
            return [f"a pad position holds another token than pad_id {pad_id} or carries loss"]
    return []
