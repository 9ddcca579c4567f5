"""The reference tokenization, and the check of a finished build against it (`packprep verify --tokens N`).

    ref = Reference("path/to/tokenizer")                    # transformers' AutoTokenizer, nothing of packprep's
    ids, mask = ref.encode(("pc", ("Q: 2+2?\\n", "4")))      # one document's expected tokens and loss mask
    checks = check_build(out, n=1000, seed=0)               # [(name, passed, detail)]: tokens, loss_mask, labels

`Reference` writes packprep's tokenization contract (README "Tokenization") against transformers alone, so that it
can catch a mistake in `packprep.tokenizer` instead of repeating it:
  - text: `tok(text)` (its own special tokens) + EOS unless the last token already is EOS; every token carries loss;
  - prompt/completion: `tok(prompt + completion)` as one string + EOS as for text; loss from the first token (not
    added by the post-processor) whose offset starts at or after the completion's first character, through the end;
  - chat: exactly `apply_chat_template(messages)`, nothing appended; with `{% generation %}` markers the loss is
    transformers' `assistant_masks`; without, each assistant turn is located turn by turn (the render of the turns
    before it, with the generation prompt, ends where the turn starts; the render up to it stops agreeing with the
    whole conversation where it ends) and its content plus the run of special tokens right after it carries loss.
`check_build` samples N documents (seeded) among those in the shards, reads their records again from the recorded
inputs (doc_ids are record positions: files in manifest order, each file's records in order, rejects included),
applies the manifest's long-document policy and compares tokens, loss mask and labels piece by piece; each failing
check names the first difference, decoded. Cost: reading the input files that hold sampled documents (up to the
last one) plus N documents through transformers (a chat: one render per assistant turn and two more without
markers); the shards' doc_ids are read in full, their tokens only for the sampled documents.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100
_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


class Reference:
    """One tokenizer folder (or hub name) through `transformers.AutoTokenizer`; `encode(doc)` -> (ids, mask)."""

    def __init__(self, tokenizer: str | Path, special_tokens_in_text: str = "parse"):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError('verify --tokens needs transformers: pip install "packprep[hf]"') from None
        self.tok = AutoTokenizer.from_pretrained(str(tokenizer))
        self.eos = self.tok.eos_token_id
        self.split = special_tokens_in_text == "literal"
        self.special = {i for i, t in self.tok.added_tokens_decoder.items() if t.special} | set(
            self.tok.all_special_ids)
        template = self.tok.chat_template if isinstance(self.tok.chat_template, str) else None
        self.markers = bool(template and _GENERATION.search(template))

    def encode(self, doc: tuple[str, object]) -> tuple[np.ndarray, np.ndarray]:
        """doc: ("text", str) | ("pc", (prompt, completion)) | ("chat", messages). Raises ValueError where the
        contract refuses (a chat turn that cannot be located)."""
        got = self.encode_all([doc])[0]
        if isinstance(got, ValueError):
            raise got
        return got

    def encode_all(self, docs: list[tuple[str, object]]) -> list:
        """`encode` of many documents (texts and pairs in one batch call each); a refused one is its ValueError."""
        out: list = [None] * len(docs)
        texts = [i for i, (kind, _) in enumerate(docs) if kind == "text"]
        if texts:
            encs = self.tok([docs[i][1] for i in texts], split_special_tokens=self.split)["input_ids"]
            for i, ids in zip(texts, encs):
                out[i] = self._with_eos(ids, np.ones(len(ids), np.uint8))
        pairs = [i for i, (kind, _) in enumerate(docs) if kind == "pc"]
        if pairs:
            encs = self.tok([p + c for p, c in (docs[i][1] for i in pairs)], return_offsets_mapping=True,
                            return_special_tokens_mask=True, split_special_tokens=self.split)
            for k, i in enumerate(pairs):
                out[i] = self._pair(len(docs[i][1][0]), encs["input_ids"][k], encs["offset_mapping"][k],
                                    encs["special_tokens_mask"][k])
        for i, (kind, value) in enumerate(docs):
            if kind == "chat":
                try:
                    out[i] = self._chat(value)
                except ValueError as e:
                    out[i] = e
        return out

    def _pair(self, prompt_chars: int, ids: list[int], offsets, added) -> tuple[np.ndarray, np.ndarray]:
        """Loss from the first token not added by the post-processor that starts at or after the completion."""
        added = np.array(added, bool)
        starts = np.array([a for a, _ in offsets], np.int64)
        body = np.flatnonzero(~added & (starts >= prompt_chars))
        first = body[0] if len(body) else (np.flatnonzero(~added)[-1] + 1 if (~added).any() else 0)
        mask = np.zeros(len(ids), np.uint8)
        mask[first:] = 1
        return self._with_eos(ids, mask)

    def _with_eos(self, ids: list[int], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if ids and ids[-1] != self.eos:
            ids, mask = [*ids, self.eos], np.append(mask, 1)
        return np.asarray(ids, np.int64), mask.astype(np.uint8)

    def _chat(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        if not messages:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        tok = self.tok
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=self.markers)
        ids = np.asarray(enc["input_ids"], np.int64)
        if self.markers:
            return ids, np.asarray(enc["assistant_masks"], np.uint8)
        text = tok.apply_chat_template(messages, tokenize=False)
        plain = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert plain["input_ids"] == ids.tolist(), "apply_chat_template's tokens differ from tok(its text)"
        off = np.asarray(plain["offset_mapping"], np.int64).reshape(-1, 2)
        mask, done = np.zeros(len(ids), np.uint8), 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start = done
            for agp in (True, False):
                before = _render(tok, messages[:i], agp) if i else ""
                if before is not None and text.startswith(before):
                    start = max(start, len(before))
                    break
            upto = _render(tok, messages[: i + 1], False) or ""
            end = next((k for k, (a, b) in enumerate(zip(upto, text)) if a != b), min(len(upto), len(text)))
            content = m.get("content")
            if not isinstance(content, str):
                raise ValueError(f"assistant message {i} has no text content to locate (no generation markers)")
            pos = next((p for c in (content, content.strip()) for p in [text.find(c, start, end)] if p >= 0), -1)
            if pos < 0:
                raise ValueError(f"assistant message {i}: its content is not in the rendered turn")
            stop = pos + len(content if text.startswith(content, pos) else content.strip())
            inside = np.flatnonzero((off[:, 0] < stop) & (off[:, 1] > pos))  # content tokens
            k = inside[-1] + 1 if len(inside) else int(np.searchsorted(off[:, 0], pos))
            j = k
            while j < len(ids) and ids[j] in self.special and off[j, 0] < end:
                j += 1
            if j == k:
                raise ValueError(f"assistant message {i}: no special token (end-of-turn marker) follows its content")
            mask[inside] = 1
            mask[k:j] = 1
            done = int(off[j - 1, 1])
        return ids, mask

    def show(self, ids) -> str:
        """Tokens as text, each quoted: [5, 6] -> "'Hello' ' world'"; one that decodes to nothing (SentencePiece's
        lone "▁") as its vocabulary entry: <▁>."""
        out = []
        for t in ids:
            text = self.tok.decode([int(t)])
            out.append(repr(text) if text else f"<{self.tok.convert_ids_to_tokens(int(t))}>")
        return " ".join(out) or "(nothing)"


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # noqa: BLE001 - a template that refuses a prefix (alternation, a system role) locates nothing
        return None


# ---------------------------------------------------------------------------------------------------- a build


def check_build(out: str | Path, n: int, seed: int = 0, tokenizer: str | None = None) -> list[tuple[str, bool, str]]:
    """Checks of N sampled documents of the build in `out` against the reference: tokens, loss_mask, labels."""
    from packprep.shards import MANIFEST

    out = Path(out)
    m = json.loads((out / MANIFEST).read_text())
    cfg = m["config"]
    pieces = _shard_pieces(out)
    docs = np.unique(pieces["doc"])
    sample = np.sort(np.random.default_rng(seed).choice(docs, n, replace=False)) if n < len(docs) else docs
    checks = []
    name = tokenizer or cfg["tokenizer"]
    folder = _tokenizer_folder(name)
    if folder is not None and tokenizer is None:
        from packprep.tokenizer import tokenizer_sha256

        sha = tokenizer_sha256(folder)
        checks.append(("tokenizer unchanged", sha == m["tokenizer"]["sha256"], f"{folder} has sha256 {sha[:12]}..., "
                       f"the build used {m['tokenizer']['sha256'][:12]}... (pass --tokenizer to check another)"))
    ref = Reference(folder or name, cfg.get("special_tokens_in_text", "parse"))
    records = read_records(m, sample)
    first: dict[str, str] = {}
    bad = {"tokens": 0, "loss_mask": 0, "labels": 0}
    n_tokens = 0
    present = [d for d in sample.tolist() if d in records]
    if len(present) < len(sample):
        bad["tokens"] += len(sample) - len(present)
        first["tokens"] = (f"doc {next(d for d in sample.tolist() if d not in records)}: no such record in the "
                           "inputs (rejected, or past the end), yet the build packed it")
    for d, got in zip(present, ref.encode_all([records[d][:2] for d in present])):
        if isinstance(got, ValueError):
            bad["tokens"] += 1
            first.setdefault("tokens", f"doc {d}: the reference refuses it ({got}), yet the build packed it")
            continue
        found = pieces["by_doc"][d]
        n_tokens += sum(len(f[0]) for f in found)
        for key, problem in _compare(ref, f"doc {d} ({records[d][2]})", *got, found, cfg["long_docs"],
                                     m["seq_len"]).items():
            bad[key] += 1
            first.setdefault(key, problem)
    for key in ("tokens", "loss_mask", "labels")[: 3 if pieces["labels"] else 2]:
        checks.append((f"{key} vs reference ({len(sample)} sampled documents, seed {seed})", not bad[key],
                       f"{bad[key]} of {len(sample)} documents differ; first: {first[key]}" if bad[key] else
                       f"{len(sample)} documents, {n_tokens} tokens equal"))
    return checks


def _compare(ref: Reference, doc: str, ids, mask, found: list, long_docs: str, seq_len: int) -> dict[str, str]:
    """{check: the first difference} between the expected document and the pieces the shards hold."""
    if len(ids) > seq_len and long_docs == "drop":
        return {"tokens": f"{doc}: {len(ids)} tokens > seq_len {seq_len} should have been dropped (long_docs "
                          "drop), yet the build packed it"}
    if len(ids) > seq_len and long_docs == "truncate":
        ids, mask = ids[:seq_len], mask[:seq_len]
    step = seq_len if long_docs == "split" else max(len(ids), 1)
    expected = [(k, ids[k:k + step], mask[k:k + step]) for k in range(0, max(len(ids), 1), step)]
    if len(found) != len(expected):
        return {"tokens": f"{doc}: {len(found)} pieces in the shards, expected {len(expected)} "
                          f"({len(ids)} tokens, seq_len {seq_len}, long_docs {long_docs})"}
    problems: dict[str, str] = {}
    free = list(expected)
    for f_ids, f_mask, f_labels in found:  # split pieces lie in any rows: match each to its expected slice
        at, e_ids, e_mask = free.pop(max(range(len(free)), key=lambda i: (len(free[i][1]) == len(f_ids),
                                                                          _common(free[i][1], f_ids))))
        where = doc + (f" (piece at token {at})" if len(expected) > 1 else "")
        k = _common(e_ids, f_ids)
        if k < max(len(e_ids), len(f_ids)):
            problems.setdefault("tokens", f"{where}, token {at + k} of {len(ids)}: expected {ref.show(e_ids[k:k + 4])}"
                                          f", found {ref.show(f_ids[k:k + 4])}")
            continue
        diff = np.flatnonzero(e_mask != f_mask)
        if len(diff):
            j = int(diff[0])
            problems.setdefault("loss_mask", f"{where}, token {at + j} ({ref.show(e_ids[j:j + 1])}): expected "
                                             f"loss_mask {e_mask[j]}, found {f_mask[j]} ({len(diff)} tokens differ)")
        if f_labels is not None:
            e_labels = np.where(e_mask != 0, e_ids, IGNORE_INDEX)
            e_labels[0] = IGNORE_INDEX
            diff = np.flatnonzero(e_labels != f_labels)
            if len(diff):
                j = int(diff[0])
                problems.setdefault("labels", f"{where}, token {at + j} ({ref.show(e_ids[j:j + 1])}): expected "
                                              f"label {e_labels[j]}, found {f_labels[j]}")
    return problems


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two id arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _shard_pieces(out: Path) -> dict:
    """Every piece of every shard: {"doc": doc id per piece, "labels": whether the shards have labels, "by_doc":
    doc -> [(ids, mask, labels or None) per piece]}, sliced from the memory-mapped record batches (no copy)."""
    from packprep.shards import open_shard, shard_files

    docs, where, batches = [], [], []
    for path in shard_files(out):
        for batch in open_shard(path).to_batches():
            ids, offs = batch.column("input_ids"), batch.column("doc_offsets")
            o_ids, o_docs, v = ids.offsets.to_numpy(), offs.offsets.to_numpy(), offs.values.to_numpy()
            n_pieces = np.diff(o_docs) - 1
            row = np.repeat(np.arange(len(n_pieces)), n_pieces)
            starts = np.delete(v, o_docs[1:] - 1) + o_ids[row]  # each row's offsets without its last entry
            ends = np.delete(v, o_docs[:-1]) + o_ids[row]  # ... without its first entry
            if "doc_offsets_unpadded" in batch.schema.names:  # a padded build: each slot's real tokens only
                u = batch.column("doc_offsets_unpadded").values.to_numpy()
                ends = starts + np.delete(u, o_docs[:-1]) - np.delete(u, o_docs[1:] - 1)
            docs.append(batch.column("doc_ids").values.to_numpy())
            where.append(np.stack([np.full(len(row), len(batches)), starts, ends], axis=1))
            batches.append(batch)
    doc = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    labels = bool(batches) and "labels" in batches[0].schema.names
    return {"doc": doc, "labels": labels, "by_doc": _PiecesByDoc(doc, np.concatenate(where or [np.zeros((0, 3))]),
                                                                 batches, labels)}


class _PiecesByDoc:
    """doc id -> [(ids, mask, labels or None) per piece, in shard order], from the flat piece index."""

    def __init__(self, doc, where, batches, labels):
        self.order = np.argsort(doc, kind="stable")
        self.sorted = doc[self.order]
        self.where, self.labels = where.astype(np.int64), labels
        self.cols = [{c: b.column(c).values.to_numpy() for c in ("input_ids", "loss_mask", "labels")[: 2 + labels]}
                     for b in batches]

    def __getitem__(self, d: int) -> list:
        a, b = np.searchsorted(self.sorted, [d, d + 1])
        out = []
        for k, start, end in self.where[self.order[a:b]].tolist():
            c = self.cols[k]
            out.append((c["input_ids"][start:end], c["loss_mask"][start:end],
                        c["labels"][start:end] if self.labels else None))
        return out


def _tokenizer_folder(name: str) -> Path | None:
    """The local folder a --tokenizer name points at (None: a hub name)."""
    from packprep.tokenizer import BUILTIN

    p = BUILTIN if name == "builtin" else Path(name).expanduser()
    p = p.parent if p.is_file() else p
    return p if (p / "tokenizer.json").is_file() else None


def read_records(manifest: dict, wanted: np.ndarray) -> dict[int, tuple[str, object, str]]:
    """doc id -> (kind, value, where): ("text", str) | ("pc", (prompt, completion)) | ("chat", messages) and
    "file record k", read again from the inputs the manifest records; raises ValueError when an input is gone or
    changed since the build."""
    from packprep.inputs import DEFAULT_CORPUS, content_hash, fingerprint, plan_tasks, stdlib_corpus

    cfg, files = manifest["config"], manifest["inputs"]["files"]
    recorded = {f[0]: f[1:] for s in manifest["inputs"]["specs"] for f in s.get("files", ())}
    wanted = np.asarray(wanted, np.int64)
    out: dict[int, tuple[str, object]] = {}
    base = 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            lo, hi = base, base + f["docs"]
            base = hi
            mine = wanted[(wanted >= lo) & (wanted < hi)]
            if not len(mine):
                continue
            path = Path(f["path"])
            if not path.is_file() and [s["input"] for s in manifest["inputs"]["specs"]] == [DEFAULT_CORPUS]:
                if manifest["inputs"]["specs"][0] != fingerprint(DEFAULT_CORPUS):
                    raise ValueError("the build read another Python's standard library (the default corpus); "
                                     "verify --tokens under the Python that built it")
                path = stdlib_corpus(Path(tmp) / path.name)  # the default corpus lived in the work folder
            elif not path.is_file():
                raise ValueError(f"input {path} is gone: verify --tokens reads the build's inputs again")
            elif path.stat().st_size != f["bytes"] or (str(path) in recorded and recorded[str(path)][1]
                                                         != content_hash(path)):
                raise ValueError(f"input {path} changed since the build (size or content): its records may not be "
                                 "the ones packed")
            tasks = plan_tasks([(path, f["kind"])], chunk_bytes=cfg["chunk_bytes"], format=f["format"],
                               text_field=cfg.get("text_field"), prompt_field=cfg.get("prompt_field"),
                               completion_field=cfg.get("completion_field"),
                               messages_field=cfg.get("messages_field"))
            seen = _read_file(tasks, mine - lo, out, lo, path.name)
            if seen <= int(mine.max() - lo):  # the file ended before the last sampled record
                raise ValueError(f"input {path} holds {seen} records now, the build read {f['docs']}")
    return out


def _read_file(tasks, positions: np.ndarray, out: dict, base: int, name: str) -> int:
    """Read a file's tasks in order up to its last wanted record position; fills out[base + position]."""
    from packprep.readers import read_task

    want, seen, last = set(positions.tolist()), 0, int(positions.max())
    for task in tasks:
        if seen > last:
            break
        kind = {"text": "text", "chat": "chat", "sharegpt": "chat"}.get(task.format.name, "pc")
        rejects, good = [], []
        for docs in read_task(task, rejects=rejects):
            good += (docs.texts if kind == "text" else docs.chats if kind == "chat"
                     else list(zip(docs.prompts, docs.completions)))
        bad = {r.index for r in rejects}
        values = iter(good)
        for j in range(len(good) + len(bad)):
            value = None if j in bad else next(values)
            if seen + j in want and value is not None:
                out[base + seen + j] = (kind, value, f"{name} record {seen + j}")
        seen += len(good) + len(bad)
    return seen
