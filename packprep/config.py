"""`BuildConfig`: every setting of one `packprep build`, validated once, written whole into the manifest; and the
typed-settings machinery that `TrainConfig` shares (`setting`, `check_types`, `load_config_file`).

Each setting is declared once, as a dataclass field made by `setting(default, doc)`: its type, its default and its
help text. The CLI's options (`packprep.cli`) and the config-file checks are generated from those fields. A config
file (`--config FILE`, TOML or YAML) holds the same keys; each value must have the field's type (`overwrite = "no"`
is refused, not read as true), and command-line flags win over the file (`merge`). Costs nothing measurable: this
module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Literal

Strategy = Literal["ffd", "bfd", "greedy", "random", "none", "b2f"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)  # the one list: packprep.pack and simulate use it too
LongDocs = Literal["truncate", "split", "drop"]
RecordFormat = Literal["auto", "text", "prompt-completion", "chat", "sharegpt", "alpaca"]
OnError = Literal["raise", "skip"]
TokenizerBackend = Literal["auto", "hf", "tiktoken"]
SpecialTokensInText = Literal["parse", "literal"]
Executor = Literal["local", "ray"]
Check = Literal["size", "full"]
INT32_MAX = 2**31 - 1
DEFAULT_OUT = "packprep_out"
DEFAULT_TOKENIZER = "builtin"  # packprep/assets/tokenizer: the byte-level BPE the project trains itself
# Field flags and the record formats they apply to; flags of two families cannot be combined.
FIELD_FORMATS = {"text_field": ("text",), "prompt_field": ("prompt-completion",),
                 "completion_field": ("prompt-completion",), "messages_field": ("chat", "sharegpt")}


def setting(default=MISSING, doc: str = "", *, factory=None, cli: bool = True):
    """A dataclass field with its help text: `seq_len: int = setting(4096, "Tokens per packed row.")`. cli=False:
    a config-file key only (no command-line option)."""
    doc = " ".join(doc.split())
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc, "cli": cli})
    return field(default=default, metadata={"doc": doc, "cli": cli})


def default_workers() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """One build: inputs -> tokenize -> pack -> shards."""

    inputs: tuple[str, ...] = setting((), """Input files, globs or folders (JSONL, JSON, Parquet, Arrow, CSV, HF
        save_to_disk folders). None given: the embedded default corpus (the Python standard library's own sources).""")
    sources: tuple[Source, ...] = setting((), """Mixture sources: the config file's [[sources]] tables (paths, weight
        or epochs, format and field flags; packprep.mixture). Used instead of INPUTS.""", cli=False)
    max_tokens: int | None = setting(None, """Output tokens of a weighted [[sources]] mixture (default: the source that
        runs out first at its weight sets the total; sources smaller than their share are repeated).""")
    out: str = setting(DEFAULT_OUT, """Output folder (shards, HF metadata, packprep.json manifest): a local path or an
        fsspec URL (s3://bucket/prefix, gs://, az://), uploaded shard by shard with the manifest last.""")
    tokenizer: str = setting(DEFAULT_TOKENIZER, """Hugging Face tokenizer: a local folder or tokenizer.json, a hub
        name when online, or 'builtin'.""")
    tokenizer_backend: TokenizerBackend = setting("auto", """Who encodes: hf (`tokenizers`), tiktoken (byte-level
        BPEs it represents exactly; same ids) or auto (tiktoken when it can represent the tokenizer and equals HF on
        the first task's documents, else hf; the choice and why are in the manifest).""")
    special_tokens_in_text: SpecialTokensInText = setting("parse", """Special-token strings inside record text
        (a literal <|im_end|> in a text or prompt/completion): parse (HF's default: they become the special token)
        or literal (encoded as plain text). Documents holding them are counted in the manifest.""")
    seq_len: int = setting(4096, "Tokens per packed row (the training context length).")
    strategy: Strategy = setting("ffd", """Packing strategy (b2f: ffd + exact two-document repairs).""")
    long_docs: LongDocs = setting("truncate", """Documents longer than seq_len: truncate (keep the first seq_len
        tokens), split (pieces) or drop; each is counted.""")
    pad_docs_to_multiple: int = setting(1, """Pad every document (every piece, with --long-docs split) with pad tokens
        that carry no loss up to a multiple of N, for context parallelism (N = 2 x CP for Megatron/TransformerEngine
        THD) or an FP8 granularity; packing uses the padded lengths. seq_len must be a multiple of N. 1: no
        padding.""")
    workers: int = setting(doc="Worker processes for tokenizing and writing (default: all cores).",
                           factory=default_workers)
    seed: int = setting(0, "Seed for the row shuffle and the `random` strategy.")
    shuffle: bool = setting(True, "Shuffle rows (seeded) after packing, so rows are not ordered by length.")
    format: RecordFormat = setting("auto", "Record format (auto: detected from the fields).")
    text_field: str | None = setting(None, "Field holding plain text (format text; default 'text').")
    prompt_field: str | None = setting(None, """Field holding the prompt (format prompt-completion; default 'prompt'
        or 'question').""")
    completion_field: str | None = setting(None, """Field holding the completion (format prompt-completion; default
        'completion' or 'answer').""")
    messages_field: str | None = setting(None, """Field holding a conversation (chat: 'messages' of role/content;
        sharegpt: 'conversations' of from/value).""")
    shard_rows: int | None = setting(None, "Rows per shard (default: about 256 MB of tokens per shard).")
    on_error: OnError = setting("raise", """A bad input record (malformed JSON, wrong type, missing or null field,
        unknown chat role): raise (stop with file, line and reason) or skip (set it aside in OUT/rejects.jsonl, count
        it in the manifest, go on).""")
    chunk_bytes: int = setting(2 << 20, """Input bytes per tokenize task (the unit of parallel work; the output does
        not depend on it).""")
    overwrite: bool = setting(False, "Replace a finished build in `out` made with other settings or inputs.")
    check: Check = setting("size", """On a folder holding this build already: check its shards' sizes (size) or also
        their sha256 (full) before saying so.""")
    executor: Executor = setting("local", """Where tokenize and write tasks run: local (worker processes) or ray (a
        Ray cluster; same bytes).""")
    ray_address: str | None = setting(None, """Ray cluster to join with --executor ray ('auto', 'HOST:6379',
        'ray://HOST:10001'; default: RAY_ADDRESS, else a local Ray runtime).""")
    storage_options: str | None = setting(None, """JSON object of fsspec filesystem options for remote inputs and
        output (e.g. '{"anon": true}'; per protocol: '{"s3": {...}, "gs": {...}}'); credentials and endpoints
        otherwise come from each store's environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).""")
    work_dir: str | None = setting(None, """Local work folder of a build with a remote --out (spool, shards before
        upload, resume state; default: under the system temp folder, named after the output URL).""")

    def __post_init__(self):
        if isinstance(self.inputs, (str, Path)):
            object.__setattr__(self, "inputs", (self.inputs,))
        if isinstance(self.inputs, (list, tuple)):
            object.__setattr__(self, "inputs", tuple(str(p) if isinstance(p, Path) else p for p in self.inputs))
        if isinstance(self.sources, (list, tuple)):  # config-file tables, or a manifest's config read back
            object.__setattr__(self, "sources", tuple(s if isinstance(s, Source) else _source(s, i)
                                                      for i, s in enumerate(self.sources)))
        check_types(self)
        _check_mixture(self)
        for name in ("seq_len", "workers", "chunk_bytes"):
            _at_least(name, getattr(self, name), 1)
        if self.shard_rows is not None:
            _at_least("shard_rows", self.shard_rows, 1)
        _at_least("seed", self.seed, 0)
        _at_least("pad_docs_to_multiple", self.pad_docs_to_multiple, 1)
        if self.seq_len % self.pad_docs_to_multiple:
            raise ValueError(f"seq_len {self.seq_len} is not a multiple of --pad-docs-to-multiple "
                             f"{self.pad_docs_to_multiple}: a padded document of seq_len tokens would not fit a row; "
                             "pick a seq_len that N divides")
        if self.seq_len > INT32_MAX:  # token offsets in a row are int32 (shards, spool, the packing kernels)
            raise ValueError(f"seq_len must be at most {INT32_MAX:,} (2**31 - 1), got {self.seq_len:,} (--seq-len)")
        if not self.out:
            raise ValueError("out must name a folder")
        if not self.tokenizer:
            raise ValueError("tokenizer must name a local folder, a tokenizer.json, a hub name or 'builtin'")
        _check_field_flags(self)
        if self.storage_options is not None:
            from packprep.storage import parse_options

            parse_options(self.storage_options)

    @property
    def rows_per_shard(self) -> int:
        """shard_rows, or rows of about 256 MB of tokens (int32 ids + uint8 mask)."""
        return self.shard_rows or max(1, (256 << 20) // (5 * self.seq_len))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        d["sources"] = [{**s, "paths": list(s["paths"])} for s in d["sources"]]
        return d

    def output_keys(self) -> dict:
        """The settings the output bytes depend on (workers and chunk size do not change a byte)."""
        d = self.to_dict()
        for k in ("workers", "chunk_bytes", "out", "overwrite", "check", "executor", "ray_address", "storage_options",
                  "work_dir", "tokenizer_backend"):
            d.pop(k)
        if self.pad_docs_to_multiple == 1:  # unpadded builds keep the identity they had before the setting existed
            d.pop("pad_docs_to_multiple")
        return d


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r} ({_flag(name)})")


def _check_field_flags(cfg, where: str = "") -> None:
    """`--text-field` with `--prompt-field`, or `--format text --prompt-field q`: refused, not ignored."""
    given = [name for name in FIELD_FORMATS if getattr(cfg, name) is not None]
    for name in given:
        if cfg.format != "auto" and cfg.format not in FIELD_FORMATS[name]:
            raise ValueError(f"{where}{_flag(name)} does not apply to --format {cfg.format} (it applies to "
                             f"{' / '.join(FIELD_FORMATS[name])})")
    families = {FIELD_FORMATS[name] for name in given}
    if len(families) > 1:
        raise ValueError(f"{where}{' and '.join(map(_flag, given))} cannot be combined: they name fields of different "
                         "record formats; give the flags of one format")


# ---------------------------------------------------------------------------------------------------- mixtures


@dataclass(frozen=True, kw_only=True)
class Source:
    """One [[sources]] table of a mixture (packprep.mixture samples it): its inputs, its size in the output (a
    token-share weight or a repeat factor) and its record format."""

    paths: tuple[str, ...] = setting((), "Input files, globs or folders of this source.")
    weight: float | None = setting(None, """Share of the output's tokens (relative: weights are normalized to sum to
        1).""")
    epochs: float | None = setting(None, "Repeat factor: whole copies of the documents, a fraction a seeded subsample.")
    format: RecordFormat = setting("auto", "Record format of this source (auto: detected from the fields).")
    text_field: str | None = setting(None, "Field holding plain text.")
    prompt_field: str | None = setting(None, "Field holding the prompt.")
    completion_field: str | None = setting(None, "Field holding the completion.")
    messages_field: str | None = setting(None, "Field holding a conversation.")


def _source(table, index: int, outer: str = "") -> Source:
    """A [[sources]] table -> Source, each key and value checked (one line naming the table)."""
    where = f"{outer}[[sources]] #{index + 1}: "
    if not isinstance(table, dict):
        raise ValueError(f"{where}expected a table (paths, weight or epochs, format, field flags), got {_kind(table)}")
    table = _typed(table, Source, where, "key")
    source = Source(**table)
    if not source.paths:
        raise ValueError(f"{where}paths must name at least one input file, glob or folder")
    if (source.weight is None) == (source.epochs is None):
        raise ValueError(f"{where}give either weight (a share of the output's tokens) or epochs (a repeat factor)"
                         f"{', not both' if source.weight is not None else ''}")
    for name in ("weight", "epochs"):
        value = getattr(source, name)
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"{where}{name} must be a number > 0, got {value!r}")
    _check_field_flags(source, where)
    return source


def _check_mixture(cfg: BuildConfig) -> None:
    """Sources replace INPUTS and the build-wide format flags; weights and epochs do not mix (a weight is a share of
    a total that epochs would fix)."""
    if cfg.max_tokens is not None:
        _at_least("max_tokens", cfg.max_tokens, 1)
        if not cfg.sources:
            raise ValueError("--max-tokens sets the size of a [[sources]] mixture; for one corpus give a single "
                             "[[sources]] table with weight = 1")
    if not cfg.sources:
        return
    if cfg.inputs:
        raise ValueError("give the inputs either as INPUTS or as [[sources]] tables in --config, not both")
    flags = [_flag(n) for n in ("format", *FIELD_FORMATS) if getattr(cfg, n) not in (None, "auto")]
    if flags:
        raise ValueError(f"{', '.join(flags)} with [[sources]]: set format and field flags in each [[sources]] table")
    weighted = {s.weight is not None for s in cfg.sources}
    if len(weighted) > 1:
        raise ValueError("[[sources]] mix weight and epochs: give every source a weight (token shares) or every "
                         "source epochs (repeat factors)")
    if cfg.max_tokens is not None and weighted == {False}:
        raise ValueError("--max-tokens applies to weighted [[sources]]; epochs fix each source's tokens")


# ---------------------------------------------------------------------------------------------------- typed values


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_types(obj) -> None:
    """Check every field of a config dataclass against its annotation (one line naming key, value, expected)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        check_value(f.name, getattr(obj, f.name), hints[f.name])


def check_value(key: str, value, hint, where: str = "") -> None:
    """Raise ValueError unless `value` has type `hint` (int, float, bool, str, X | None, Literal, tuple[str, ...])."""
    if not _matches(value, hint):
        closed = [a for a in (hint, *_args(hint)) if typing.get_origin(a) is Literal]
        if closed:
            choices = ", ".join(typing.get_args(closed[0]))
            raise ValueError(f"{where}unknown {key} {value!r}; expected one of: {choices}")
        raise ValueError(f"{where}{key} = {value!r}: expected {_describe(hint)}, got {_kind(value)}")


def _args(hint) -> tuple:
    """X | None -> (X, None); anything else -> ()."""
    return tuple(None if a is type(None) else a for a in typing.get_args(hint)) if _is_union(hint) else ()


def _is_union(hint) -> bool:
    import types

    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _matches(value, hint) -> bool:
    if _is_union(hint):
        return any(value is None if a is None else _matches(value, a) for a in _args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint) and isinstance(value, str)
    if origin is tuple:  # tuple[str, ...] or tuple[Source, ...]
        return isinstance(value, tuple) and all(isinstance(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if _is_union(hint):
        return " or ".join(_describe(a) for a in _args(hint) if a is not None)
    if typing.get_origin(hint) is tuple:
        return "a list of strings" if typing.get_args(hint)[0] is str else "a list of tables"
    names = {bool: "true or false (a boolean)", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table", type(None): "null"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------- config files


def load_config_file(path: str | Path, cls=BuildConfig, section: str = "build") -> dict:
    """Read a TOML or YAML config file into a dict of `cls` keys (dashes allowed: seq-len == seq_len), each value
    checked against its field's type; the settings may sit under a `[build]` (`section`) table."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    else:
        raise ValueError(f"{path}: config files are .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    if isinstance(data.get(section), dict) and len(data) == 1:
        data = data[section]
    return _typed(data, cls, f"{path}: ")


def _typed(data: dict, cls, where: str, noun: str = "setting") -> dict:
    """`data` as keys of `cls` (dashes allowed: seq-len == seq_len), each value checked against its field's type; a
    string or list for a list field becomes a tuple, [[sources]] tables become `Source`s."""
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"{where}unknown {noun}(s) {', '.join(unknown)}; known: {', '.join(sorted(hints))}")
    for key in ("inputs", "paths"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    if isinstance(data.get("sources"), list):
        data["sources"] = tuple(_source(t, i, where) for i, t in enumerate(data["sources"]))
    for key, value in data.items():
        check_value(key, value, hints[key], where=where)
    return data


def merge(config_file: str | Path | None = None, cls=BuildConfig, section: str = "build", **flags):
    """`cls` (BuildConfig) from a config file overridden by the flags that were given (None means 'not given')."""
    values = load_config_file(config_file, cls, section) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    return cls(**values)
