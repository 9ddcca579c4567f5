"""`BuildConfig`: every setting of one `packprep build`, validated once, written whole into the manifest.

A config file (`--config FILE`, TOML or YAML) holds the same keys as the dataclass; command-line flags win over
it (`merge`). Costs nothing measurable: this module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

STRATEGIES = ("ffd", "bfd", "greedy", "random", "none", "b2f")  # == packprep.pack.STRATEGIES (no numba import here)
EXECUTORS = ("local", "ray")
LONG_DOCS = ("truncate", "split", "drop")
ON_ERROR = ("raise", "skip")
FORMATS = ("auto", "text", "prompt-completion", "chat", "sharegpt", "alpaca")
DEFAULT_OUT = "packprep_out"
DEFAULT_TOKENIZER = "builtin"  # packprep/assets/tokenizer: the byte-level BPE the project trains itself


def default_workers() -> int:
    """Cores this process may use (cgroup/affinity aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """One build: inputs -> tokenize -> pack -> shards. Field docstrings are the CLI's help text."""

    inputs: tuple[str, ...] = ()
    """Input files, globs or folders (JSONL, JSON, Parquet, Arrow, CSV, HF save_to_disk folders). Empty: the
    embedded default corpus (the Python standard library's own sources, read at run time)."""
    out: str = DEFAULT_OUT
    """Output folder (shards, HF metadata, packprep.json manifest)."""
    tokenizer: str = DEFAULT_TOKENIZER
    """Hugging Face tokenizer: a local folder or tokenizer.json, a hub name when online, or 'builtin'."""
    seq_len: int = 4096
    """Tokens per packed row (the training context length)."""
    strategy: str = "ffd"
    """Packing strategy: ffd | bfd | greedy | random | none | b2f (ffd + exact two-document repairs)."""
    long_docs: str = "truncate"
    """Documents longer than seq_len: truncate (keep the first seq_len tokens) | split (pieces) | drop; counted."""
    workers: int = field(default_factory=default_workers)
    """Worker processes for tokenizing and writing (default: all cores)."""
    seed: int = 0
    """Seed for the row shuffle and the `random` strategy."""
    shuffle: bool = True
    """Shuffle rows (seeded) after packing, so rows are not ordered by length."""
    format: str = "auto"
    """Record format: auto | text | prompt-completion | chat | sharegpt | alpaca."""
    text_field: str | None = None
    """Field holding plain text (format text; default 'text')."""
    prompt_field: str | None = None
    """Field holding the prompt (format prompt-completion; default 'prompt' or 'question')."""
    completion_field: str | None = None
    """Field holding the completion (format prompt-completion; default 'completion' or 'answer')."""
    messages_field: str | None = None
    """Field holding a conversation (chat: 'messages' of role/content; sharegpt: 'conversations' of from/value)."""
    shard_rows: int | None = None
    """Rows per shard (default: about 256 MB of tokens per shard)."""
    on_error: str = "raise"
    """A bad input record (malformed JSON, wrong type, missing or null field, unknown chat role): raise (stop with
    file, line and reason) | skip (set it aside in OUT/rejects.jsonl, count it in the manifest, go on)."""
    chunk_bytes: int = 2 << 20
    """Input bytes per tokenize task (the unit of parallel work; the output does not depend on it)."""
    overwrite: bool = False
    """Replace a finished build in `out` that was made with different settings or inputs."""
    executor: str = "local"
    """Where tokenize and write tasks run: local (worker processes) | ray (a Ray cluster; same bytes)."""
    ray_address: str | None = None
    """Ray cluster to join with --executor ray ('auto', 'HOST:6379', 'ray://HOST:10001'; default: RAY_ADDRESS,
    else a local Ray runtime)."""

    def __post_init__(self):
        if isinstance(self.inputs, (str, Path)):
            object.__setattr__(self, "inputs", (str(self.inputs),))
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("long_docs", self.long_docs, LONG_DOCS)
        _choice("format", self.format, FORMATS)
        _choice("executor", self.executor, EXECUTORS)
        _choice("on_error", self.on_error, ON_ERROR)
        for name in ("seq_len", "workers", "chunk_bytes"):
            _positive(name, getattr(self, name))
        if self.shard_rows is not None:
            _positive("shard_rows", self.shard_rows)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not str(self.out):
            raise ValueError("out must name a folder")
        if not self.tokenizer:
            raise ValueError("tokenizer must name a local folder, a tokenizer.json, a hub name or 'builtin'")

    @property
    def rows_per_shard(self) -> int:
        """shard_rows, or rows of about 256 MB of tokens (int32 ids + uint8 mask)."""
        return self.shard_rows or max(1, (256 << 20) // (5 * self.seq_len))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        return d

    def output_keys(self) -> dict:
        """The settings the output bytes depend on (workers and chunk size do not change a byte)."""
        d = self.to_dict()
        for k in ("workers", "chunk_bytes", "out", "overwrite", "executor", "ray_address"):
            d.pop(k)
        return d


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of: {', '.join(choices)}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{name} must be an integer >= 1, got {value!r} ({flag})")


def load_config_file(path: str | Path) -> dict:
    """Read a TOML or YAML config file into a dict of BuildConfig keys (dashes allowed: seq-len == seq_len)."""
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
            raise ValueError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        raise ValueError(f"{path}: config files are .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data = data.get("build", data) if isinstance(data.get("build"), dict) else data
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(data.get("inputs"), str):
        data["inputs"] = [data["inputs"]]
    return data


def merge(config_file: str | Path | None = None, **flags) -> BuildConfig:
    """BuildConfig from a config file overridden by the flags that were given (None means 'not given')."""
    values = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    try:
        return BuildConfig(**values)
    except TypeError as e:  # a wrong type in a config file, e.g. seq_len = "abc"
        raise ValueError(f"bad setting: {e}") from None
