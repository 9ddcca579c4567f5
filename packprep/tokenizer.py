"""The tokenizer (loading, the encoding contract, loss masks) and the tokenize stage: one input chunk -> spool.

    tok = Tokenizer(resolve_tokenizer("builtin", work), backend="hf")   # a HF fast tokenizer folder, no transformers
    ids, mask, lengths, notes = tok.encode(docs)         # flat int32 ids, flat uint8 mask, int32 per document, counts
    result = tokenize_task(task, ctx)                    # one ReadTask -> its spool files (packprep.spool)

The contract (the model family's own; README "The tokenization contract"):
  text               tokenizer(text) with its special tokens (BOS where the post-processor adds it), EOS unless
                     last; every token carries loss
  prompt/completion  tokenizer(prompt + completion) as one string; loss from the first token at or after the
                     completion's first character (character offsets), and on the EOS (appended unless last)
  chat               exactly the template's tokens (`packprep.chat`), nothing appended; loss on the tokens that
                     overlap the assistant spans (content + end-of-turn marker), as transformers' assistant_masks
Documents with no tokens are kept as length 0 (dropped and counted later as "empty"). The tiktoken backend
(`packprep.tiktoken_backend`) gives the same ids; its offsets are byte offsets from the tokens' byte sizes, computed
over the whole batch (`packprep.offsets`); a document they do not add up for gets HF's ids and offsets.

Cost: the backend's batch encode, ~40 ns per token to copy the ids into numpy, then a few numpy passes over the
batch (no numpy call per document). HF's prompt/completion and chat path uses the encode with offsets (slower than
the fast encode) and a numpy pass per document; chat adds the renders of `packprep.chat`. Memory per worker: one
task's text and tokens (a few times `chunk_bytes`). Only `tokenizers` (with the tiktoken backend: only when a
document needs HF's offsets), `jinja2`, numpy and pyarrow are imported here (not transformers), so a worker starts
in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packprep import spool
from packprep.chat import ChatTemplate, chat_renderer
from packprep.inputs import ReadTask
from packprep.offsets import (
    drop_empty,
    finish,
    flatten,
    loss_starts,
    mask_from,
    replace_docs,
    span_mask,
    tiktoken_batch,
    utf8_lengths,
)
from packprep.readers import read_task
from packprep.records import Docs, Reject

BUILTIN = Path(__file__).parent / "assets" / "tokenizer"


# ---------------------------------------------------------------------------------------------------- loading


def resolve_tokenizer(name: str, work: Path | None = None) -> Path:
    """A local folder holding tokenizer.json: 'builtin', a folder, a tokenizer.json, or a hub name (online)."""
    if name == "builtin":
        return BUILTIN
    p = Path(name).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return p.parent
    if (p / "tokenizer.json").is_file():
        return p
    if not p.exists() and (p.is_absolute() or name.startswith((".", "~"))):  # clearly a path, not a hub name
        raise ValueError(f"tokenizer {name!r} not found: no such local folder; offline, --tokenizer must be a local "
                         "folder with tokenizer.json (or 'builtin')")
    # A hub name, or a folder with only a slow tokenizer: let transformers fetch/convert it once, then save it.
    try:
        from transformers import AutoTokenizer
    except ImportError:
        what = "the folder has no tokenizer.json" if p.exists() else "not a local folder with tokenizer.json"
        raise ImportError(f'tokenizer {name!r}: {what}; a hub name or a slow tokenizer needs transformers: pip install '
                          '"packprep[hf]" (or pass a local folder with tokenizer.json)') from None
    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable tokenizer"
        where = "the folder has no tokenizer.json" if p.exists() else "not a local path, and the hub gave no tokenizer"
        raise ValueError(f"tokenizer {name!r} not found: {where} ({type(e).__name__}); offline, --tokenizer must be "
                         "a local folder with tokenizer.json (or 'builtin')") from None
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"tokenizer {name!r} has no fast (Rust) version; packprep needs tokenizer.json")
    dest = Path(work or ".") / "tokenizer"
    hf.save_pretrained(str(dest))
    return dest


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_sha256(folder: Path) -> str:
    """sha256 over the files that decide the tokens: vocabulary and merges, special tokens, chat template."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(name: str) -> str | None:
    """tokenizer_sha256 of a local tokenizer named by --tokenizer (None for a hub name: it is hashed once fetched)."""
    p = BUILTIN if name == "builtin" else Path(name).expanduser()
    folder = p.parent if p.is_file() else p
    return tokenizer_sha256(folder) if (folder / "tokenizer.json").is_file() else None


class Tokenizer:
    """A Hugging Face fast tokenizer folder read with `tokenizers` directly: EOS id, chat template, and the encode
    contract (module docstring). backend: "hf" (`tokenizers`) or "tiktoken" (`packprep.tiktoken_backend`, same ids);
    special_tokens_in_text: "parse" (HF's default) or "literal" (special-token strings in record text are text)."""

    def __init__(self, folder: str | Path, backend: str = "hf", special_tokens_in_text: str = "parse"):
        folder = Path(folder)
        self.folder, self.backend, self.literal = folder, backend, special_tokens_in_text == "literal"
        self._rust, self.tiktoken = None, None
        if backend == "tiktoken":  # the `tokenizers` one is loaded only if a document needs HF's offsets
            from packprep.tiktoken_backend import TiktokenBackend

            self.tiktoken = TiktokenBackend(folder / "tokenizer.json", encode_special_tokens=self.literal)
            added = {t["id"]: (t["content"], t["special"]) for t in self.tiktoken.added_tokens}
        elif backend == "hf":
            added = {i: (t.content, t.special) for i, t in self.rust.get_added_tokens_decoder().items()}
        else:
            raise ValueError(f"unknown tokenizer backend {backend!r}; expected hf or tiktoken")
        cfg = _read_json(folder / "tokenizer_config.json") or {}
        special = {**(_read_json(folder / "special_tokens_map.json") or {}), **cfg}
        self.special = {k: _token_str(special.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = self.special["eos_token"]
        self.eos_id = next((i for i, (content, _) in added.items() if content == eos), None) if eos else None
        if self.eos_id is None and eos:  # not an added token: the vocabulary's (HF looks added tokens up first)
            self.eos_id = self.rust.token_to_id(eos)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {folder}: no EOS token (eos_token in tokenizer_config.json)")
        self.special_strings = [content for content, is_special in added.values() if is_special and content]
        self._special_re = re.compile("|".join(map(re.escape, sorted(self.special_strings, key=len, reverse=True))))
        self.chat_template = _chat_template(folder, cfg)
        self.chat = None
        if self.chat_template is not None:
            name = f"the chat template of tokenizer {folder}"
            self.chat = ChatTemplate(self.chat_template, self.special, self.special_strings, name)

    @property
    def rust(self):
        """The `tokenizers.Tokenizer` of tokenizer.json (with the tiktoken backend: loaded on first use)."""
        if self._rust is None:
            from tokenizers import Tokenizer as RustTokenizer

            self._rust = RustTokenizer.from_file(str(self.folder / "tokenizer.json"))
        return self._rust

    @property
    def vocab_size(self) -> int:
        if self.tiktoken is not None:
            return self.tiktoken.vocab_size
        return self.rust.get_vocab_size(with_added_tokens=True)

    def holds_special(self, text: str) -> bool:
        """Whether `text` holds a special-token string (`<|im_start|>`, `</s>`...)."""
        return bool(self.special_strings) and self._special_re.search(text) is not None

    def encode(self, docs: Docs) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        """Flat ids (int32), flat loss mask (uint8), per-document lengths (int32; 0 = empty) and notes
        ({"special_in_text": documents holding special-token strings, "no_assistant": chats without loss})."""
        if docs.texts is not None:
            return self._encode_texts(docs.texts)
        if docs.prompts is not None:
            return self._encode_pairs(docs.prompts, docs.completions)
        return self._encode_chats(docs)

    # -- text: tokenizer(text) with its own special tokens, then EOS unless already last; every token carries loss
    def _encode_texts(self, texts: list[str]):
        flat, lens = flatten(self._ids(texts, add_special_tokens=True))
        flat, lens, mask = drop_empty(flat, lens, np.ones(len(flat), np.uint8), texts)
        notes = {"special_in_text": sum(map(self.holds_special, texts))}
        return (*finish(flat, lens, mask, self.eos_id, eos=True), notes)

    # -- prompt/completion: tokenizer(prompt + completion) as one string; loss from the first token at or after the
    #    completion's first character, and on the EOS
    def _encode_pairs(self, prompts: list[str], completions: list[str]):
        texts = [p + c for p, c in zip(prompts, completions)]

        def hf_mask(i, starts, ends, added):  # HF's character offsets
            content = np.flatnonzero(~added & (starts >= len(prompts[i])))
            first = int(content[0]) if len(content) else int(np.flatnonzero(~added)[-1]) + 1 if (~added).any() else 0
            return (np.arange(len(starts)) >= first).astype(np.uint8)

        batch = mask = None
        if self.tiktoken is not None:  # byte offsets over the whole batch (packprep.offsets)
            batch = tiktoken_batch(self.tiktoken, texts, add_special_tokens=True)
            mask = mask_from(batch.lens, loss_starts(batch, utf8_lengths(prompts)))
        flat, lens, mask = self._hf_where_inexact(batch, mask, texts, True, hf_mask)
        flat, lens, mask = drop_empty(flat, lens, mask, texts)  # an empty document stays empty (no BOS, no EOS)
        notes = {"special_in_text": sum(self.holds_special(p) or self.holds_special(c)
                                        for p, c in zip(prompts, completions))}
        return (*finish(flat, lens, mask, self.eos_id, eos=True), notes)

    # -- chat: exactly the template's tokens, nothing appended; loss on the assistant spans (packprep.chat)
    def _encode_chats(self, docs: Docs):
        if self.chat is None:
            raise ValueError(f"tokenizer {self.folder} has no chat template; chat data needs one "
                             "(chat_template in tokenizer_config.json or chat_template.jinja)")
        if self.literal:
            raise ValueError("--special-tokens-in-text literal applies to text and prompt/completion records; a chat "
                             "template writes its own special tokens into the same text, so chats keep HF's parse")
        rendered = docs.rendered if docs.rendered is not None else [self.chat.render(c) for c in docs.chats]
        texts = [text for text, _ in rendered]

        def hf_mask(i, starts, ends, added):  # every token overlapping a span, as transformers' assistant_masks
            m = np.zeros(len(starts), np.uint8)
            for a, b in rendered[i][1]:
                m[(starts < b) & (ends > a)] = 1
            return m

        batch = mask = None
        if self.tiktoken is not None:
            batch = tiktoken_batch(self.tiktoken, texts, add_special_tokens=False)
            mask = span_mask(batch, [[(len(t[:a].encode()), len(t[:b].encode())) for a, b in spans]
                                     for t, spans in rendered])
        flat, lens, mask = self._hf_where_inexact(batch, mask, texts, False, hf_mask)
        loss = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])[np.cumsum(lens)]  # loss tokens up to each end
        notes = {"special_in_text": sum(any(self.holds_special(t) for t in _message_texts(c)) for c in docs.chats),
                 "no_assistant": int(((lens > 0) & (np.diff(loss, prepend=0) == 0)).sum())}
        return (*finish(flat, lens, mask, self.eos_id, eos=False), notes)

    def _ids(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if self.tiktoken is not None:
            return self.tiktoken.encode_batch(texts, add_special_tokens=add_special_tokens)
        self.rust.encode_special_tokens = self.literal
        try:
            return [e.ids for e in self.rust.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        finally:
            self.rust.encode_special_tokens = False

    def _hf_where_inexact(self, batch, mask, texts: list[str], add_special_tokens: bool, hf_mask):
        """(flat ids, lengths, mask): the tiktoken batch's, with HF's ids and masks (`hf_mask(i, starts, ends, added)`
        over HF's character offsets) for the documents whose byte offsets are not exact; without a batch (the HF
        backend), HF's for every document."""
        redo = np.arange(len(texts)) if batch is None else np.flatnonzero(~batch.exact)
        if batch is None:
            batch_flat, lens, mask = np.zeros(0, np.int32), np.zeros(len(texts), np.int64), np.zeros(0, np.uint8)
        else:
            batch_flat, lens = batch.flat, batch.lens
        if not len(redo):
            return batch_flat, lens, mask
        self.rust.encode_special_tokens = self.literal and add_special_tokens
        try:
            encs = self.rust.encode_batch([texts[i] for i in redo], add_special_tokens=add_special_tokens)
        finally:
            self.rust.encode_special_tokens = False
        new = {}
        for i, enc in zip(redo.tolist(), encs):
            off = np.array(enc.offsets, np.int64).reshape(-1, 2)
            new[i] = enc.ids, hf_mask(i, off[:, 0], off[:, 1], np.array(enc.special_tokens_mask, bool))
        return replace_docs(batch_flat, lens, mask, new)


def _message_texts(messages: list[dict]):
    """The text of each message's content (a string, or the text parts of a content list)."""
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            yield c
        elif isinstance(c, list):
            yield from (p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def _chat_template(folder: Path, cfg: dict) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        t = next((x["template"] for x in t if x.get("name") == "default"), t[0]["template"] if t else None)
    return t


# ---------------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class TokenizeContext:
    """What every tokenize task needs (small and picklable: paths, not objects)."""

    tokenizer: str  # local folder with tokenizer.json
    spool: str  # folder for the task outputs
    on_error: str = "raise"  # a bad record: raise (RecordError) | skip (spooled as a reject, length -1)
    backend: str = "hf"  # hf | tiktoken (already chosen: `choose_backend`)
    special_tokens_in_text: str = "parse"  # parse | literal


_TOKENIZERS: dict[tuple, Tokenizer] = {}  # per process; forked workers inherit the driver's (loading Qwen's: ~1 s)


def preload(tok: Tokenizer) -> None:
    """Let tasks in this process, and in workers forked from it, reuse an already loaded tokenizer."""
    _TOKENIZERS[(str(tok.folder), tok.backend, tok.literal)] = tok


def _tokenizer(ctx: TokenizeContext) -> Tokenizer:
    key = (ctx.tokenizer, ctx.backend, ctx.special_tokens_in_text == "literal")
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer(ctx.tokenizer, ctx.backend, ctx.special_tokens_in_text)
    return _TOKENIZERS[key]


def tokenize_task(task: ReadTask, ctx: TokenizeContext) -> spool.TaskResult:
    """Read one task's records, tokenize them and spool ids/mask/lengths (`packprep.spool`, marker last).

    Idempotent: a task the spool holds as finished is not redone (what a resumed build relies on). Under
    on_error=skip a bad record keeps its place in the lengths as -1 (so document indices stay those of the input
    records) and is spooled as a reject. A chat template's failure on a record is a bad record like any other.
    """
    done = spool.finished(ctx.spool, task.index)
    if done is not None:
        return done
    tok = _tokenizer(ctx)
    rejects: list[Reject] | None = [] if ctx.on_error == "skip" else None
    render = chat_renderer(tok, skip=rejects is not None) if task.format.name in ("chat", "sharegpt") else None
    parts = [tok.encode(docs) for docs in read_task(task, rejects=rejects, render=render) if len(docs)]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    mask = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint8)
    lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int32)
    notes: dict[str, int] = {}
    for p in parts:
        for k, v in p[3].items():
            notes[k] = notes.get(k, 0) + v
    if rejects:
        at = np.array([r.index for r in rejects], np.int64)  # record positions, increasing
        lengths = np.insert(lengths, at - np.arange(len(at)), np.int32(-1))
    return spool.write(ctx.spool, task.index, ids, mask, lengths, [r.to_json() for r in rejects or ()], notes)
