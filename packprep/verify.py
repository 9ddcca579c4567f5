"""`verify(out)`: the one checker of a build folder, for `packprep verify` and the tests.

Checks: manifest present and readable; state.json lists exactly the manifest's shards, and no other data-* file (a
temp file, another build's shard) lies beside them; every shard's sha256, rows and tokens match the manifest; per
row (vectorised over list offsets): 1 <= tokens <= seq_len, doc_offsets run 0 < ... = len(input_ids) strictly
increasing, seq_lengths = diff(doc_offsets), loss_mask as long as input_ids and 0/1, labels (where the shards have
them) = input_ids where loss_mask else -100 with -100 at each piece's first token, one doc_id per piece within [0,
input_docs); accounting: every input document is packed or counted, input docs = packed + truncated + split +
dropped (empty, too long) + rejected, the rejected ones by reason add up and rejects.jsonl holds one line each; the
distinct documents found in the shards = packed + truncated + split.
Cost: one sha256 pass over the shards plus O(tokens) numpy work on memory-mapped columns.
`verify(out, tokens=N)` (`packprep verify --tokens N`) adds `check_tokens`: N sampled documents against the
reference tokenization of `packprep.reference` (transformers), which names the first difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from packprep.shards import MANIFEST, open_shard, sha256_file


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
    """Check a build folder; with `tokens` > 0, also that many sampled documents against the reference
    tokenization (`check_tokens`)."""
    out, report = Path(out), Report()
    try:
        _verify(out, report)
    except (KeyError, TypeError) as e:  # a manifest from another version, or edited by hand
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
    try:
        listed = [f["filename"] for f in json.loads((out / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError) as e:
        listed = f"unreadable state.json ({e})"
    report.add("state.json", listed == [s["file"] for s in shards], f"lists {listed}, manifest has "
               f"{[s['file'] for s in shards]}")
    stray = sorted(p.name for p in out.glob("data-*") if p.name not in {s["file"] for s in shards})
    report.add("no stray shards", not stray, f"{stray[:3]} ({len(stray)}) are not part of the build (a half-written "
               "temp file or a shard of another build)")

    seen = np.zeros(counts["input_docs"], dtype=bool)
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
        problems = _check_rows(table, seq_len, seen)
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
    report.add("docs in shards", int(seen.sum()) == in_shards,
               f"{int(seen.sum())} distinct documents in the shards, manifest says {in_shards} were packed")
    report.add("totals", all(totals[k] == counts[k] for k in totals),
               f"shards hold {totals}, manifest counts {({k: counts[k] for k in totals})}")
    return report


def _lines(path: Path) -> int:
    """Lines in a file (0 when it does not exist)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _check_rows(table: pa.Table, seq_len: int, seen: np.ndarray) -> list[str]:
    """Row-level invariants over list offsets; marks the doc_ids found in `seen`."""
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
        d = docs.values.to_numpy()
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
