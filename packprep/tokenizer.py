"""The tokenizer (loading, encoding, chat templates, loss masks) and the tokenize stage: one input chunk -> spool.

    tok = Tokenizer(resolve_tokenizer("builtin", work))     # a Hugging Face fast tokenizer folder, no transformers
    ids, mask, lengths = tok.encode(docs)                    # flat int32 ids, flat uint8 mask, int32 per document
    result = tokenize_task(task, ctx)                        # one ReadTask -> its spool files (packprep.spool)

Cost: the tokenizer's own batch encode (Rust, one core per worker process) plus ~45 ns per token to copy the
ids into numpy; chat adds one Jinja render per conversation. Memory per worker: one task's text and tokens (a few
times `chunk_bytes`). Loss mask: plain text all 1; prompt/completion 1 on completion + EOS; chat 1 on the tokens
the template's `{% generation %}` blocks mark (assistant turns), or, for templates without those markers, on each
assistant message's content found by rendering the conversation turn by turn. Documents with no tokens are kept
as length 0 (dropped and counted later as "empty"). Only `tokenizers`, `jinja2`, numpy and pyarrow are imported
here (not transformers), so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from packprep import spool
from packprep.inputs import ReadTask
from packprep.readers import read_task
from packprep.records import Docs, Reject

BUILTIN = Path(__file__).parent / "assets" / "tokenizer"
GEN_OPEN, GEN_CLOSE = "\ue000", "\ue001"  # private-use code points bracketing {% generation %} output


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
    """A Hugging Face fast tokenizer folder read with `tokenizers` directly (EOS id, chat template, encode)."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(folder)
        self.folder = folder
        self.rust = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json") or {}
        special = {**(_read_json(folder / "special_tokens_map.json") or {}), **cfg}
        self.special = {k: _token_str(special.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = self.special["eos_token"]
        self.eos_id = self.rust.token_to_id(eos) if eos else None
        if self.eos_id is None:
            raise ValueError(f"tokenizer {folder}: no EOS token (eos_token in tokenizer_config.json)")
        self.chat_template = _chat_template(folder, cfg)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.rust.get_vocab_size(with_added_tokens=True)

    def encode(self, docs: Docs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat ids (int32), flat loss mask (uint8) and per-document lengths (int32, EOS included; 0 = empty)."""
        fast = self.rust.encode_batch_fast
        if docs.texts is not None:
            return self._join([fast(docs.texts, add_special_tokens=False)], loss=(1,))
        if docs.prompts is not None:  # prompt tokens carry no loss; completion tokens and EOS do
            return self._join([fast(docs.prompts, add_special_tokens=False),
                               fast(docs.completions, add_special_tokens=False)], loss=(0, 1))
        return self._encode_chats(docs.chats)

    def _join(self, parts: list, loss: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document i = parts[0][i] + parts[1][i] + ... + EOS (no EOS on an empty document), each part's tokens
        masked with its `loss` flag and EOS with the last part's. One pass from the encodings into numpy: ~40 ns
        per token, most of it `Encoding.ids` building its Python list (there is no bulk export)."""
        n = len(parts[0])
        part_lens = np.empty((n, len(parts) + 1), np.int64)
        for j, p in enumerate(parts):
            part_lens[:, j] = np.fromiter(map(len, p), np.int64, n)
        total = part_lens[:, :-1].sum(axis=1)
        part_lens[:, -1] = total > 0  # the EOS
        eos, nothing = [self.eos_id], []

        def pieces():  # [5, 6], [7], EOS, [], [], (nothing), ...
            for doc, has_eos in zip(zip(*parts), part_lens[:, -1].tolist()):
                for e in doc:
                    yield e.ids
                yield eos if has_eos else nothing

        lengths = total + part_lens[:, -1]
        flat = np.fromiter(chain.from_iterable(pieces()), np.int32, int(lengths.sum()))
        flags = np.tile(np.array([*loss, loss[-1]], np.uint8), n)
        mask = np.repeat(flags, part_lens.ravel())
        return flat, mask, lengths.astype(np.int32)

    def _flatten(self, ids: list[list[int]], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # chats: ids [[5, 6], [], [7]] + EOS 2 -> flat [5, 6, 2, 7, 2], lengths [3, 0, 2]; EOS carries loss iff the
        # document's last token does
        n = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        lengths = np.where(n > 0, n + 1, 0)
        eos = [self.eos_id]
        flat = np.fromiter(chain.from_iterable(chain.from_iterable((x, eos) for x in ids if x)), np.int32,
                           int(lengths.sum()))
        mask = np.concatenate([np.append(m, m[-1]) for m in masks if len(m)] or [np.zeros(0, np.uint8)])
        return flat, mask.astype(np.uint8), lengths.astype(np.int32)

    def _encode_chats(self, chats: list[list[dict]]):
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.folder} has no chat template; chat data needs one "
                             "(chat_template in tokenizer_config.json or chat_template.jinja)")
        rendered = [self.render(c) for c in chats]
        encs = self.rust.encode_batch([t for t, _ in rendered], add_special_tokens=False)
        ids, masks = [], []
        for enc, (text, spans) in zip(encs, rendered):
            m = np.zeros(len(enc.ids), np.uint8)
            for a, b in spans:
                ta, tb = _char_to_token(enc, a, b, forward=True), _char_to_token(enc, a, b, forward=False)
                if ta is not None and tb is not None:
                    m[ta : tb + 1] = 1
            ids.append(enc.ids)
            masks.append(m)
        return self._flatten(ids, masks)

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Chat template -> (text, character spans that carry loss)."""
        if not messages:
            return "", []
        template = self._compiled()
        text = template.render(messages=messages, add_generation_prompt=False, **self.special)
        if GEN_OPEN in text and not any(GEN_OPEN in m["content"] or GEN_CLOSE in m["content"] for m in messages):
            return _strip_markers(text)
        text = text.replace(GEN_OPEN, "").replace(GEN_CLOSE, "")
        return text, self._turn_spans(template, messages, text)

    def _turn_spans(self, template, messages, text) -> list[tuple[int, int]]:
        """No generation markers: each assistant message's content, located by rendering turn by turn."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not m["content"]:
                continue
            prefix = template.render(messages=messages[:i], add_generation_prompt=False, **self.special)
            prefix = prefix.replace(GEN_OPEN, "").replace(GEN_CLOSE, "") if i else ""
            pos = text.find(m["content"], len(prefix) if text.startswith(prefix) else 0)
            if pos >= 0:
                spans.append((pos, pos + len(m["content"])))
        return spans

    def _compiled(self):
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        return self._template


def _char_to_token(enc, a: int, b: int, forward: bool):
    """First (forward) or last token whose characters lie in [a, b); None when the span holds no token start."""
    rng = range(a, b) if forward else range(b - 1, a - 1, -1)
    for c in rng:
        t = enc.char_to_token(c)
        if t is not None:
            return t
    return None


def _strip_markers(text: str) -> tuple[str, list[tuple[int, int]]]:
    # "a\ue000bc\ue001d" -> ("abcd", [(1, 3)])
    out, spans, pos, start = [], [], 0, None
    for part, marker in _split_markers(text):
        out.append(part)
        pos += len(part)
        if marker == GEN_OPEN:
            start = pos
        elif marker == GEN_CLOSE and start is not None:
            if pos > start:
                spans.append((start, pos))
            start = None
    return "".join(out), spans


def _split_markers(text: str):
    i = 0
    while True:
        j = min((k for k in (text.find(GEN_OPEN, i), text.find(GEN_CLOSE, i)) if k >= 0), default=-1)
        if j < 0:
            yield text[i:], None
            return
        yield text[i:j], text[j]
        i = j + 1


def _jinja_env():
    """A sandboxed Jinja environment like transformers' chat-template renderer, with {% generation %}."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return GEN_OPEN + caller() + GEN_CLOSE

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


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


_TOKENIZERS: dict[str, Tokenizer] = {}  # per process; forked workers inherit the driver's (loading Qwen's: ~1 s)


def preload(tok: Tokenizer) -> None:
    """Let tasks in this process, and in workers forked from it, reuse an already loaded tokenizer."""
    _TOKENIZERS[str(tok.folder)] = tok


def tokenize_task(task: ReadTask, ctx: TokenizeContext) -> spool.TaskResult:
    """Read one task's records, tokenize them and spool ids/mask/lengths (`packprep.spool`, marker last).

    Idempotent: a task the spool holds as finished is not redone (what a resumed build relies on). Under
    on_error=skip a bad record keeps its place in the lengths as -1 (so document indices stay those of the input
    records) and is spooled as a reject.
    """
    done = spool.finished(ctx.spool, task.index)
    if done is not None:
        return done
    tok = _TOKENIZERS.get(ctx.tokenizer) or _TOKENIZERS.setdefault(ctx.tokenizer, Tokenizer(ctx.tokenizer))
    rejects: list[Reject] | None = [] if ctx.on_error == "skip" else None
    parts = [tok.encode(docs) for docs in read_task(task, rejects=rejects) if len(docs)]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    mask = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint8)
    lengths = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int32)
    if rejects:
        at = np.array([r.index for r in rejects], np.int64)  # record positions, increasing
        lengths = np.insert(lengths, at - np.arange(len(at)), np.int32(-1))
    return spool.write(ctx.spool, task.index, ids, mask, lengths, [r.to_json() for r in rejects or ()])
