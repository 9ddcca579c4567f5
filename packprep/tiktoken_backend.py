"""A tiktoken encoder built from a Hugging Face `tokenizer.json`, for the byte-level BPEs it can represent.

Owns: deciding whether a `tokenizer.json` is representable (`unsupported_reason`), building the tiktoken `Encoding`
from its vocabulary and merges, and reproducing what HF does around the model: added and special tokens found in the
text (two passes as `tokenizers` does: first the non-normalized tokens in the raw text, then the normalized ones in
the normalized rest; leftmost-longest; `single_word`, `lstrip`, `rstrip` as in `tokenizers`' `AddedVocabulary`), NFC,
and a `TemplateProcessing` post-processor (BOS/EOS) when special tokens are asked for.

Representable: model BPE (no dropout, byte fallback, subword prefix or word suffix) over the 256 byte-level symbols;
pre-tokenizer `ByteLevel(use_regex=True)` (GPT-2's pattern) or `Split(Regex, Isolated)` + `ByteLevel(use_regex=False)`,
both without `add_prefix_space`; normalizer none or NFC; no truncation or padding; merges whose results have
increasing ids (tiktoken merges by the id of the merged bytes, HF by the merge's rank; the two orders must agree).
That covers Qwen 2/2.5/3, Llama 3, GPT-2 style and BPEs trained with `tokenizers`' `ByteLevel`.

Not provable: tiktoken merges any two adjacent pieces whose bytes form a token, HF only the listed pairs. They agree
on vocabularies converted from tiktoken (every split is listed) and agreed on every document tried with BPEs trained
by `tokenizers`, so a caller checks a sample against HF before trusting a corpus to it (`packprep.backend`: the
build's `--tokenizer-backend auto` check, and `check_sample`).

Cost: building the encoder parses tokenizer.json and walks its merges once (seconds for a 151k vocabulary); the rank
table and the rest of what it needs are then cached by the file's sha256 (`packprep.cache`), and later builds load
them in a fraction of a second. Encoding is tiktoken's Rust BPE plus one regex search per text for added tokens, on
one thread unless `num_threads` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import numpy as np
import regex

from packprep import cache

RANKS_VERSION = 1  # of `_ranks`: part of the cached rank table's key
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# `tokenizers`' AddedVocabulary uses Rust regex's Unicode \w and \s; spelled out so Python matches the same chars.
_WORD = r"[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]"
_ENDS_WITH_WORD = regex.compile(_WORD + r"\Z")
_STARTS_WITH_WORD = regex.compile(_WORD)
_TRAILING_SPACE = regex.compile(r"\p{White_Space}*\Z")
_LEADING_SPACE = regex.compile(r"\p{White_Space}*")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable symbol that stands for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(extra)}


def _load_spec(tokenizer) -> dict:
    """tokenizer.json as a dict, from a dict, a `tokenizers.Tokenizer`, a tokenizer.json path or its folder."""
    if isinstance(tokenizer, dict):
        return tokenizer
    if hasattr(tokenizer, "to_str"):
        return json.loads(tokenizer.to_str())
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"no tokenizer.json at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _pattern(pre: dict | None) -> tuple[str | None, str | None]:
    """(regex the pre-tokenizer splits with, None) or (None, why it is not representable)."""
    def byte_level(p, regex_on):
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and bool(p.get("use_regex", True)) == regex_on)
    if pre is None:
        return None, "no pre-tokenizer (tiktoken needs a regex split and byte-level symbols)"
    if pre.get("type") == "ByteLevel":
        return (GPT2_PATTERN, None) if byte_level(pre, True) else (None, "ByteLevel with add_prefix_space")
    subs = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(subs) == 2 and subs[0].get("type") == "Split" and byte_level(subs[1], False):
        split = subs[0]
        if "Regex" not in split.get("pattern", {}) or split.get("behavior") != "Isolated" or split.get("invert"):
            return None, "a Split pre-tokenizer that is not an isolated regex split"
        return split["pattern"]["Regex"], None
    return None, f"pre-tokenizer {json.dumps(pre)[:120]} (tiktoken represents ByteLevel or Split(regex) + ByteLevel)"


def _normalizes_nfc(norm: dict | None) -> bool | None:
    """False for no normalizer, True for NFC, None for anything else."""
    if norm is None:
        return False
    if norm.get("type") == "NFC":
        return True
    if norm.get("type") == "Sequence":
        kinds = [n.get("type") for n in norm.get("normalizers", [])]
        return None if set(kinds) - {"NFC"} else bool(kinds)
    return None


def unsupported_reason(tokenizer) -> str | None:
    """None when tiktoken can represent this tokenizer.json, else one line saying why not.

    `tokenizer`: a `tokenizers.Tokenizer`, a tokenizer.json path, a folder holding one, or the parsed dict.
    """
    return _check(_load_spec(tokenizer))[0]


def _check(spec: dict) -> tuple[str | None, list[str]]:
    """(why not representable or None, each merge's result token: "a" + "b")."""
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        return f"model {model.get('type')} is not BPE", []
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE with {key}={model[key]!r}", []
    if model.get("byte_fallback"):
        return "BPE with byte_fallback (SentencePiece style, not byte-level)", []
    if spec.get("truncation") or spec.get("padding"):
        return "tokenizer.json sets truncation or padding", []
    if _normalizes_nfc(spec.get("normalizer")) is None:
        return f"normalizer {json.dumps(spec['normalizer'])[:120]} (only none or NFC is represented)", []
    pattern, why = _pattern(spec.get("pre_tokenizer"))
    if why:
        return why, []
    symbols = _byte_decoder()
    vocab = model.get("vocab", {})
    if missing := [s for s in symbols if s not in vocab]:
        return f"{len(missing)} of the 256 byte-level symbols are not in the vocabulary (not a byte-level BPE)", []
    if not set("".join(vocab)) <= symbols.keys():
        return "vocabulary tokens outside the byte-level alphabet", []
    pairs = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]  # older files: "a b"
    joined = [a + b for a, b in pairs]
    merged = [vocab.get(t) for t in joined]
    if None in merged:
        a, b = pairs[merged.index(None)]
        return f"merge {a!r} + {b!r} makes no vocabulary token", []
    if len(merged) > 1 and (np.diff(np.array(merged, np.int64)) < 0).any():
        return "merge results' ids are not in merge order (tiktoken ranks merges by token id)", []
    try:
        regex.compile(pattern)
    except regex.error as e:
        return f"pre-tokenizer regex does not compile in Python's regex ({e})", []
    return None, joined


class _AddedTokens:
    """One pass of `tokenizers`' added-token search: leftmost-longest over literal strings, then the token's flags."""

    def __init__(self, tokens: list[dict], skip_special: bool = False):
        self.by_content = {t["content"]: t for t in tokens}
        self.skip_special = skip_special
        contents = sorted(self.by_content, key=len, reverse=True)  # longest first == leftmost-longest
        self.search = regex.compile("|".join(map(regex.escape, contents))) if contents else None

    def split(self, text: str) -> list[str | int]:
        """`text` cut into plain pieces (str) and added-token ids (int), in order; no empty pieces."""
        out: list[str | int] = []
        done = 0
        for m in self.search.finditer(text):
            start, stop = m.span()
            token = self.by_content[m.group()]
            if self.skip_special and token.get("special"):  # HF's encode_special_tokens: left to the model
                continue
            if token.get("single_word") and (
                    (start > 0 and _ENDS_WITH_WORD.search(text, 0, start))
                    or (stop < len(text) and _STARTS_WITH_WORD.match(text, stop))):
                continue
            if token.get("lstrip"):
                start = max(_TRAILING_SPACE.search(text, 0, start).start(), done)
            if token.get("rstrip"):
                stop = _LEADING_SPACE.match(text, stop).end()
            if done < start:
                out.append(text[done:start])
            out.append(token["id"])
            done = stop
        if done < len(text):
            out.append(text[done:])
        return out


class Unrepresentable(ValueError):
    """tiktoken cannot represent this tokenizer.json exactly (the message says why)."""


def _json_path(tokenizer) -> Path | None:
    """The tokenizer.json file `tokenizer` names (a path or a folder), or None (a dict or a tokenizers.Tokenizer)."""
    if isinstance(tokenizer, dict) or hasattr(tokenizer, "to_str"):
        return None
    path = Path(tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no tokenizer.json at {path}")
    return path


def _ranks(model: dict, joined: list[str]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks of a byte-level BPE: each token's bytes -> its id (joined: `_check`'s)."""
    symbols = _byte_decoder()
    reached = set(joined) | set(symbols)
    # A token no merge makes is never produced by HF's BPE (unless ignore_merges looks whole words up): keep it
    # out of tiktoken's ranks, or tiktoken's whole-piece lookup would produce it.
    keep = (lambda t: True) if model.get("ignore_merges") else reached.__contains__
    to_latin1 = str.maketrans({c: chr(b) for c, b in symbols.items()})  # symbol -> the byte, as a latin-1 char
    return {token.translate(to_latin1).encode("latin-1"): i for token, i in model["vocab"].items() if keep(token)}


def _head(spec: dict) -> dict:
    """What the backend needs of a tokenizer.json besides its ranks (small: cached with them), and the vocabulary
    size HF reports with added tokens (distinct token strings)."""
    vocab, added = spec["model"]["vocab"], spec.get("added_tokens", [])
    return {**{k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor")}, "added_tokens": added,
            "vocab_size": len(vocab.keys() | {t["content"] for t in added})}


def _token_sizes(ranks: dict[bytes, int], added: list[dict]) -> np.ndarray:
    """Bytes each token id stands for: a BPE token's bytes, an added token's UTF-8 content (0: never produced)."""
    n = max([-1, *ranks.values(), *(t["id"] for t in added)]) + 1
    sizes = np.zeros(n, np.int64)
    sizes[np.fromiter(ranks.values(), np.int64, len(ranks))] = np.fromiter(map(len, ranks), np.int64, len(ranks))
    for t in added:
        sizes[t["id"]] = len(t["content"].encode("utf-8"))
    return sizes


class TiktokenBackend:
    """HF-equivalent encoding of a byte-level BPE through tiktoken. Raises ValueError when not representable.

    `encode_batch(texts)` == `tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)` ids;
    `add_special_tokens=True` adds what a `TemplateProcessing` post-processor's single template adds (e.g. BOS).
    `encode_special_tokens=True` encodes special-token strings found in the text as plain text, as HF's
    `Tokenizer.encode_special_tokens = True` (transformers' `split_special_tokens=True`) does.
    """

    def __init__(self, tokenizer, name: str = "hf", encode_special_tokens: bool = False):
        import tiktoken

        path = _json_path(tokenizer)
        raw = path.read_bytes() if path is not None else None
        spec = _load_spec(tokenizer) if path is None else None
        # a tokenizer.json file's rank table and head are cached by its sha256 (packprep.cache); they were written
        # only after _check passed on the same bytes
        key = cache.key("ranks", hashlib.sha256(raw).hexdigest(), RANKS_VERSION) if raw is not None else None
        found = cache.read_table(key) if key else None
        if found is None:
            spec = spec if spec is not None else json.loads(raw)
            why, joined = _check(spec)
            if why:
                raise Unrepresentable(f"tiktoken cannot represent this tokenizer: {why}")
            found = _head(spec), _ranks(spec["model"], joined)
            if key:
                cache.write_table(key, *found)
        head, ranks = found
        self._source = str(path) if path is not None else spec  # what a pickle carries
        self.name, self.encode_special_tokens = name, encode_special_tokens
        self.head, self.vocab_size, self.added_tokens = head, head["vocab_size"], head["added_tokens"]
        pattern, _ = _pattern(head["pre_tokenizer"])
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.token_sizes = _token_sizes(ranks, self.added_tokens)
        self._nfc = bool(_normalizes_nfc(head["normalizer"]))
        added = [t for t in self.added_tokens if t["content"]]
        self._raw_pass = _AddedTokens([t for t in added if not t.get("normalized")], encode_special_tokens)
        normalized = [dict(t, content=self._normalize(t["content"])) for t in added if t.get("normalized")]
        self._normalized_pass = _AddedTokens(normalized, encode_special_tokens)
        self._template = _single_template(head["post_processor"])

    def __getstate__(self) -> dict:
        return {"source": self._source, "name": self.name, "encode_special_tokens": self.encode_special_tokens}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["source"], state["name"], state["encode_special_tokens"])

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self._nfc else text

    def _pieces(self, text: str) -> list[str | int]:
        """Plain pieces (normalized, to encode) and added-token ids, as HF's AddedVocabulary cuts them."""
        out: list[str | int] = []
        raw = self._raw_pass.split(text) if self._raw_pass.search else [text]
        for piece in raw:
            if isinstance(piece, int):
                out.append(piece)
                continue
            piece = self._normalize(piece)
            out += self._normalized_pass.split(piece) if self._normalized_pass.search else [piece]
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """Token ids of each text, as HF's `encode_batch(texts, add_special_tokens=...)` gives them."""
        if add_special_tokens and self._template is None:
            raise ValueError("tiktoken backend: add_special_tokens=True needs a TemplateProcessing (or no) "
                             f"post-processor, not {json.dumps(self.head['post_processor'])[:80]}")
        encode = self.encoding.encode_ordinary
        plain, needs_split = [], []
        raw, normalized = self._raw_pass.search, self._normalized_pass.search
        for i, text in enumerate(texts):  # texts holding an added token are cut first, the rest encoded as they are
            if not (raw and raw.search(text)):
                text = self._normalize(text)
                if not (normalized and normalized.search(text)):
                    plain.append(text)
                    continue
            needs_split.append(i)
            plain.append("")
        if num_threads > 1:
            out = self.encoding.encode_ordinary_batch(plain, num_threads=num_threads)
        else:
            out = [encode(t) for t in plain]
        for i in needs_split:
            ids: list[int] = []
            for piece in self._pieces(texts[i]):
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    ids += encode(piece)
            out[i] = ids
        if add_special_tokens and self._template != ([], []):
            prefix, suffix = self._template
            out = [prefix + ids + suffix for ids in out]
        return out


def _single_template(post: dict | None) -> tuple[list[int], list[int]] | None:
    """(ids before, ids after) a single sequence for add_special_tokens=True, or None if not representable."""
    if post is None or post.get("type") == "ByteLevel":
        return [], []
    if post.get("type") == "Sequence":
        before, after = [], []
        for part in map(_single_template, post.get("processors", [])):
            if part is None:
                return None
            before, after = part[0] + before, after + part[1]  # each processor wraps what the previous made
        return before, after
    if post.get("type") != "TemplateProcessing":
        return None
    before, after, seen = [], [], False
    for item in post.get("single", []):
        if "Sequence" in item:
            seen = True
        else:
            (after if seen else before).extend(post["special_tokens"][item["SpecialToken"]["id"]]["ids"])
    return before, after
