"""The build's `--tokenizer-backend auto|hf|tiktoken` choice, and the loaded tokenizer of the chosen backend.

    backend, why, tok = choose_backend(folder, "auto", tasks)   # tok: a packprep.tokenizer.Tokenizer, loaded once
    mismatch = check_sample(tiktoken_backend, texts)             # ids only: the first difference from HF, or None

auto: tiktoken when `packprep.tiktoken_backend` can represent the tokenizer.json and the first task's first `sample`
documents get the same ids, masks and lengths from both backends; else hf, saying why. The verdict is cached
(`packprep.cache`) under a key of everything it depends on: the tokenizer's sha256, the sampled records themselves,
the record format, --special-tokens-in-text, CHECK_VERSION and the tiktoken and tokenizers versions. A second build of
the same corpus (or a rebuild) reads the verdict instead of checking again; any other sample is checked afresh.

Cost: reading the sample (the first task's first part); on a cache miss also loading the tokenizer a second time
(for HF) and encoding the sample with both backends (about a second for 2048 documents with a 151k vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from packprep import cache
from packprep.readers import read_task

CHECK_VERSION = 1  # of the check below; part of the verdict's key


@dataclass(frozen=True)
class Mismatch:
    """The first document where the tiktoken backend and HF disagree."""

    index: int          # position of the document in the sample
    position: int       # first differing token
    hf: list[int]       # HF's ids from `position` (up to 8)
    tiktoken: list[int]  # the backend's ids from `position` (up to 8)
    text: str           # the document's text around the difference (up to 80 characters)

    def __str__(self) -> str:
        return (f"document {self.index}, token {self.position}: HF {self.hf} vs tiktoken {self.tiktoken} "
                f"near {self.text!r}")


def check_sample(tt, texts: list[str], add_special_tokens: bool = False) -> Mismatch | None:
    """Encode `texts` with HF `tokenizers` and with the `TiktokenBackend` tt; the first difference, or None."""
    from tokenizers import Tokenizer

    src = tt._source
    hf = Tokenizer.from_file(src) if isinstance(src, str) else Tokenizer.from_str(json.dumps(src))
    hf.encode_special_tokens = tt.encode_special_tokens
    ref = [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
    for i, (a, b) in enumerate(zip(ref, tt.encode_batch(texts, add_special_tokens))):
        if a != b:
            k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            near = len(hf.decode(a[:k], skip_special_tokens=False))
            return Mismatch(i, k, a[k:k + 8], b[k:k + 8], texts[i][max(0, near - 40):near + 40])
    return None


def choose_backend(folder: Path, requested: str, tasks: list, special_tokens_in_text: str = "parse",
                   sample: int = 2048):
    """(backend, why, tokenizer) for --tokenizer-backend (module docstring). Bad records are left out of the sample:
    the build reports them."""
    from packprep.tokenizer import Tokenizer, chat_renderer, tokenizer_sha256

    if requested != "auto":
        return requested, f"--tokenizer-backend {requested}", Tokenizer(folder, requested, special_tokens_in_text)
    try:
        import tiktoken
        import tokenizers
    except ImportError:
        return "hf", "auto: tiktoken is not installed (pip install tiktoken)", Tokenizer(folder, "hf",
                                                                                      special_tokens_in_text)
    from packprep.tiktoken_backend import Unrepresentable

    task = tasks[0] if tasks else None
    chats = task is not None and task.format.name in ("chat", "sharegpt")
    records = next(iter(read_task(task, batch_rows=sample, rejects=[])), None) if task else None
    fmt = [task.format.name, *task.format.fields] if task else None
    k = cache.key("backend", tokenizer_sha256(folder), _records_hash(records), fmt, special_tokens_in_text,
                  CHECK_VERSION, tiktoken.__version__, tokenizers.__version__)
    if (found := cache.read_verdict(k)) is not None:
        why = f"{found['why']}; verdict cached in {cache.cache_dir()}"
        return found["backend"], why, Tokenizer(folder, found["backend"], special_tokens_in_text)
    try:
        tt = Tokenizer(folder, "tiktoken", special_tokens_in_text)
    except Unrepresentable as e:
        return "hf", f"auto: {e}", Tokenizer(folder, "hf", special_tokens_in_text)
    if chats and (tt.chat is None or tt.literal):
        return "hf", "auto: chats need HF's parse of the template's special tokens here", Tokenizer(
            folder, "hf", special_tokens_in_text)
    hf, n = Tokenizer(folder, "hf", special_tokens_in_text), 0
    docs = None
    if records is not None and len(records):
        docs = records if not chats else next(iter(read_task(task, batch_rows=sample, rejects=[],
                                                             render=chat_renderer(hf, skip=True))), None)
    if docs is not None and len(docs):
        a, b = hf.encode(docs), tt.encode(docs)
        if (where := _first_difference(a, b)) is not None:
            why = f"auto: tiktoken differs from HF on the first task's sample ({where}); using HF"
            cache.write_verdict(k, {"backend": "hf", "why": why})
            return "hf", why + "; checked now", hf
        n = len(a[0])
    tt._rust = hf.rust  # loaded already: documents that need HF's offsets (rare) do not load it again
    why = f"auto: tiktoken equals HF on the first task's sample ({n} tokens)"
    cache.write_verdict(k, {"backend": "tiktoken", "why": why})
    return "tiktoken", why + "; checked now", tt


def _first_difference(a, b) -> str | None:
    """Where two encodings (ids, mask, lengths) of the same documents first differ, or None when they agree."""
    for name, x, y in (("lengths", a[2], b[2]), ("ids", a[0], b[0]), ("loss masks", a[1], b[1])):
        if not np.array_equal(x, y):
            n = min(len(x), len(y))
            at = np.flatnonzero(np.asarray(x[:n]) != np.asarray(y[:n]))
            return f"{name} differ at {'document' if name == 'lengths' else 'token'} {int(at[0]) if len(at) else n}"
    return None


def _records_hash(docs) -> str | None:
    """sha256 of a batch of documents as read (texts, prompt/completion pairs or conversations)."""
    if docs is None:
        return None
    h = hashlib.sha256()
    for part in (docs.texts, docs.prompts, docs.completions, docs.chats):
        h.update(json.dumps(part, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()
