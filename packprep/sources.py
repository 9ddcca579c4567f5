"""Sources: input paths -> files -> read tasks -> record batches -> documents, with pyarrow's C++ readers.

    files = resolve_inputs(["data/*.jsonl", "hf_folder/"])          # globs, folders, HF save_to_disk folders
    tasks = plan_tasks(files, chunk_bytes=2 << 20)                  # fixed byte/row-group chunks, format per file
    for docs in read_task(tasks[0]): ...                            # Docs: texts | prompts+completions | chats

A task is a deterministic slice of one file (JSONL: newline-aligned byte range of ~chunk_bytes; Parquet: row
groups; Arrow: record batches; JSON arrays and CSV: the whole file), so the split of work depends only on the
inputs and `chunk_bytes`, never on the number of workers. Planning costs one seek per chunk plus a peek at each
file's first records (format detection); reading costs pyarrow's parse (~100-300 MB/s per core for JSONL).

Bad records (malformed JSON, invalid UTF-8, a wrong type, a missing or null field, an unknown chat role, a CSV row
with the wrong number of columns) raise `RecordError` naming file, line (JSONL/CSV, 1-based), element (JSON array)
or row (Parquet/Arrow, 0-based) and the reason, or, given a `rejects` list, become `Reject`s and are skipped. The
good path stays vectorised: a chunk's columns are checked at once (type, nulls, UTF-8); only a chunk that fails is
read again record by record in Python (JSONL: line by line, since pyarrow fails a whole block on one bad line).
"""

from __future__ import annotations

import functools
import glob
import json
import re
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow",
              ".feather": "arrow", ".ipc": "arrow", ".csv": "csv", ".tsv": "csv"}
_METADATA_FILES = {"state.json", "dataset_info.json", "dataset_dict.json", "packprep.json"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool",
         "function": "tool", "observation": "tool"}


@dataclass(frozen=True)
class Format:
    """How the records of one file become documents: format name and the fields it reads."""

    name: str  # text | prompt-completion | chat | sharegpt | alpaca
    fields: tuple[str, ...]  # text: (text,)  pc: (prompt, completion)  chat/sharegpt: (messages,)  alpaca: 3 fields


@dataclass(frozen=True)
class ReadTask:
    """One unit of tokenize work: records [start, stop) of one file (bytes, row groups or batches by kind)."""

    index: int
    path: str
    kind: str  # jsonl | json | parquet | arrow | csv
    start: int
    stop: int
    format: Format


@dataclass
class Docs:
    """A batch of documents in one of three shapes (exactly one is set)."""

    texts: list[str] | None = None
    prompts: list[str] | None = None
    completions: list[str] | None = None
    chats: list[list[dict]] | None = None

    def __len__(self) -> int:
        return len(next(x for x in (self.texts, self.prompts, self.chats) if x is not None))


# ---------------------------------------------------------------------------------------------------- inputs


def resolve_inputs(inputs) -> list[tuple[Path, str]]:
    """Expand paths, globs, folders and HF save_to_disk folders into (file, kind) in a stable order."""
    files: list[tuple[Path, str]] = []
    for spec in inputs:
        spec = str(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no input matches {spec!r}")
            for m in matches:
                files += _expand(Path(m))
        else:
            p = Path(spec)
            if not p.exists():
                raise FileNotFoundError(f"input not found: {spec}")
            files += _expand(p, explicit=True)
    if not files:
        raise ValueError(f"no input files found in {', '.join(map(str, inputs))} "
                         f"(looked for {', '.join(sorted(EXTENSIONS))})")
    return files


def _expand(p: Path, explicit: bool = False) -> list[tuple[Path, str]]:
    if p.is_file():
        kind = file_kind(p) if explicit else EXTENSIONS.get(p.suffix.lower())
        return [(p, kind)] if kind and p.name not in _METADATA_FILES else []
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{p} is a DatasetDict folder; pass one split folder, e.g. {p / (splits or ['train'])[0]}")
    if (p / "state.json").exists():  # HF datasets save_to_disk: Arrow stream files listed in state.json
        state = json.loads((p / "state.json").read_text())
        return [(p / f["filename"], "arrow") for f in state.get("_data_files", [])]
    out = []
    for child in sorted(p.iterdir()):
        if not child.name.startswith((".", "_")):
            out += _expand(child)
    return out


def file_kind(path: Path) -> str:
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown input format {path.suffix or '(no extension)'!r}; "
                         f"expected one of {', '.join(sorted(EXTENSIONS))}")
    return kind


def _json_kind(path: Path) -> str:
    """.json holds either one array of records or JSON lines: the first non-space byte tells."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return "json" if head[:1] == b"[" else "jsonl"


# ---------------------------------------------------------------------------------------------------- planning


def plan_tasks(files: list[tuple[Path, str]], *, chunk_bytes: int, format: str = "auto", **fields) -> list[ReadTask]:
    """Split files into read tasks and resolve each file's record format (raises on a missing field)."""
    tasks: list[ReadTask] = []
    for path, kind in files:
        if path.stat().st_size == 0:
            continue  # an empty file holds no records (it still counts as an input in the manifest)
        if kind == "json":
            kind = _json_kind(path)
        ranges = _json_ranges(path, chunk_bytes) if kind == "json" else None  # one scan, for peek and tasks
        schema = _peek_json(path, ranges[0]) if kind == "json" else peek_schema(path, kind)
        if schema is None:
            continue  # no records (blank lines, an empty array): ignored like an empty file
        fmt = resolve_format(path, schema, format, **fields)
        for start, stop in ranges or _chunks(path, kind, chunk_bytes):
            tasks.append(ReadTask(len(tasks), str(path), kind, start, stop, fmt))
    return _split_tail(tasks, chunk_bytes)


TASK_PLAN_VERSION = 2  # part of a build's identity: spool files of another plan are never reused
TAIL_CHUNKS, TAIL_SPLIT = 2, 4  # the last 2 chunks' worth of JSONL input is cut into quarter chunks


def _split_tail(tasks: list[ReadTask], chunk_bytes: int) -> list[ReadTask]:
    """Cut the last TAIL_CHUNKS x chunk_bytes of JSONL input into chunks of chunk_bytes / TAIL_SPLIT.

    Workers take tasks in order, so the last ones run while the other workers have nothing left: with 2 MB tasks
    (~1 s of tokenizing each) a worker could sit idle for up to a second at the end, ~4% of a 13M-token build on
    2 cores. Quarter-size tasks at the end bound that to ~0.25 s. Depends only on the inputs and chunk_bytes (never
    on the number of workers), like the rest of the plan; the output does not depend on the plan at all.
    """
    i, budget = len(tasks), TAIL_CHUNKS * chunk_bytes
    while i > 0 and budget > 0 and tasks[i - 1].kind == "jsonl":
        i -= 1
        budget -= tasks[i].stop - tasks[i].start
    small = max(1, chunk_bytes // TAIL_SPLIT)
    tail = [replace(t, start=a, stop=b) for t in tasks[i:] for a, b in _line_cuts(Path(t.path), t.start, t.stop, small)]
    return [replace(t, index=k) for k, t in enumerate(tasks[:i] + tail)]


def _line_cuts(path: Path, start: int, stop: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Newline-aligned byte ranges of ~chunk_bytes covering [start, stop) of a JSONL file (start is a line start)."""
    cuts = [start]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < stop:
            f.seek(cuts[-1] + chunk_bytes - 1)
            f.readline()  # the line holding byte (cut - 1) ends this chunk
            if f.tell() >= stop:
                break
            cuts.append(f.tell())
    return list(zip(cuts, cuts[1:] + [stop]))


def _chunks(path: Path, kind: str, chunk_bytes: int) -> list[tuple[int, int]]:
    if kind == "jsonl":
        return _line_cuts(path, 0, path.stat().st_size, chunk_bytes)
    if kind == "parquet":
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    elif kind == "arrow":
        sizes = [b.nbytes for b in _arrow_batches(path)]
    else:  # CSV: one task per file (JSON arrays: plan_tasks cuts them with _json_ranges)
        return [(0, 1)]
    return _group(sizes, chunk_bytes)


def _group(sizes: list[int], chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive items into groups of >= chunk_bytes: sizes [5, 5, 5] with 8 -> [(0, 2), (2, 3)]."""
    groups, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= chunk_bytes:
            groups.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes) or not groups:
        groups.append((start, len(sizes)))
    return groups


def peek_schema(path: Path, kind: str) -> pa.Schema | None:
    """The schema of a file's first records (JSONL: the union of the first records' fields), read without parsing
    the whole file; None for a file without records (empty, blank lines only). JSON arrays: `_peek_json`."""
    try:
        if kind == "jsonl":
            return _peek_jsonl(path)
        if kind == "parquet":
            return pq.read_schema(path)
        if kind == "arrow":
            return _open_arrow(path).schema
        if kind == "csv":
            parse = _csv_parse(path)
            parse.invalid_row_handler = lambda row: "skip"  # the read reports bad rows
            return pcsv.open_csv(path, parse_options=parse).schema
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as {kind}: {_first_line(e)}") from None
    raise AssertionError(kind)


def _peek_jsonl(path: Path) -> pa.Schema | None:
    with open(path, "rb") as f:
        head = f.read(_PEEK_BYTES)
        head += f.readline()  # whole lines only (the first may be tens of MB)
    lines = [x for x in head.split(b"\n") if x.strip()][:_PEEK_LINES]
    schemas, first_bad = [], None
    for raw in lines:
        rec = _json_line(raw)
        if isinstance(rec, dict):
            try:
                schemas.append(_parse_jsonl(raw).schema)
            except pa.ArrowInvalid:  # valid JSON that pyarrow does not take (the read reports it)
                continue
        elif first_bad is None:
            first_bad = rec if isinstance(rec, _Bad) else _Bad("wrong_type", f"expected an object, got {_jtype(rec)}")
    if lines and not schemas:  # no record to tell the format from: the first line's problem
        line = _line_of_text(path, lines[0].rstrip(b"\r").decode("utf-8", "replace"))
        raise RecordError(f"{path} line {line}: {first_bad.reason if first_bad else 'no JSON object'}")
    return _union(schemas) if schemas else None


def _union(schemas: list[pa.Schema]) -> pa.Schema:
    """Fields of all schemas in first-seen order; a field's type from the first schema where it is not null."""
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for f in schema:
            if f.name not in fields or pa.types.is_null(fields[f.name].type):
                fields[f.name] = f
    return pa.schema(list(fields.values()))


def resolve_format(path, schema: pa.Schema, format: str = "auto", *, text_field=None, prompt_field=None,
                   completion_field=None, messages_field=None) -> Format:
    """Pick the record format from flags or field names, and check that its fields exist."""
    names = schema.names
    has = set(names).__contains__
    if format == "auto":
        if messages_field:
            format = "sharegpt" if _is_sharegpt(schema, messages_field) else "chat"
        elif prompt_field or completion_field:
            format = "prompt-completion"
        elif text_field:
            format = "text"
        elif has("messages"):
            format = "chat"
        elif has("conversations"):
            format = "sharegpt"
        elif has("instruction") and has("output"):
            format = "alpaca"
        elif (has("prompt") and has("completion")) or (has("question") and has("answer")):
            format = "prompt-completion"
        elif has("text"):
            format = "text"
        else:
            raise ValueError(f"{path}: cannot tell the record format from its fields {names}; pass --format "
                             "text|prompt-completion|chat|sharegpt|alpaca and a field flag (e.g. --text-field)")
    if format == "text":
        fields = (text_field or "text",)
    elif format == "prompt-completion":
        pair = ("question", "answer") if has("question") and not has("prompt") else ("prompt", "completion")
        fields = (prompt_field or pair[0], completion_field or pair[1])
    elif format in ("chat", "sharegpt"):
        fields = (messages_field or ("messages" if format == "chat" else "conversations"),)
    else:  # alpaca; `input` is optional
        fields = ("instruction", "input", "output")
    missing = [f for f in fields if not has(f) and not (format == "alpaca" and f == "input")]
    if missing:
        raise ValueError(f"{path}: field {missing[0]!r} not found ({format} format); fields: {names}")
    return Format(format, fields)


def _is_sharegpt(schema: pa.Schema, field: str) -> bool:
    t = schema.field(field).type if field in schema.names else None
    return bool(t is not None and pa.types.is_list(t) and pa.types.is_struct(t.value_type)
                and t.value_type.get_field_index("from") >= 0)


# ---------------------------------------------------------------------------------------------------- reading


class RecordError(ValueError):
    """A bad input record under --on-error raise, as one line: 'data.jsonl line 17: malformed JSON: ...'."""


@dataclass(frozen=True)
class Reject:
    """A record that cannot become a document: where it is, why, and the start of its raw text."""

    index: int  # position among its task's records (the document index it would have had)
    file: str
    where: str  # line (JSONL/CSV, 1-based) | element (JSON array, 0-based) | row (Parquet/Arrow, 0-based)
    at: int | None
    kind: str  # malformed_json | invalid_utf8 | wrong_type | missing_field | null | unknown_role | bad_row
    reason: str
    raw: str

    def message(self) -> str:
        at = f" {self.where} {self.at}" if self.at is not None else ""
        return f"{self.file}{at}: {self.reason}"

    def to_json(self) -> dict:
        return {"file": self.file, self.where: self.at, "kind": self.kind, "reason": self.reason, "raw": self.raw}


class _Bad(Exception):
    """One record's problem (internal; becomes a Reject or a RecordError)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


RAW_PREFIX = 200  # characters of a rejected record kept in rejects.jsonl
_PEEK_BYTES, _PEEK_LINES = 1 << 16, 100  # format detection reads the union of the first lines' fields


def read_task(task: ReadTask, batch_rows: int = 2048, rejects: list[Reject] | None = None) -> Iterator[Docs]:
    """The task's documents, in file order, in batches of at most batch_rows.

    A bad record raises RecordError (file, line/row, reason); given a `rejects` list, it is appended there and
    reading goes on. Fast path: pyarrow parses a whole chunk and its columns are checked at once (types, nulls,
    UTF-8); only a chunk that fails those checks is read again record by record, in Python, to find the bad ones.
    """
    seen = 0  # records of this task so far
    for part, locate in _read_parts(task):
        n = part.num_rows if isinstance(part, pa.Table) else len(part)
        for off in range(0, n, batch_rows):
            yield _to_docs(part[off : off + batch_rows], task, seen + off, lambda i, o=off: locate(o + i), rejects)
        seen += n


def _read_parts(task: ReadTask):
    """(a checked table, or a list of Python records, and locate(i) -> (where, at, raw)) per piece of the task."""
    path = Path(task.path)
    cols = [f for f in task.format.fields]
    try:
        if task.kind == "jsonl":
            with open(path, "rb") as f:
                f.seek(task.start)
                buf = f.read(task.stop - task.start)
            lines = _Lines(buf, path, task.start)
            try:
                table = _parse_jsonl(buf)
            except pa.ArrowInvalid:  # pyarrow fails the whole chunk on one bad line
                table = None
            if table is not None and _table_ok(table, task.format):
                yield table, lines.locate
            else:  # find the bad lines one by one (only in a chunk that failed)
                yield [_json_line(raw) for _, raw in lines.lines], lines.locate
        elif task.kind == "json":
            from packprep._jsonscan import scan_json_array

            records = _json_range(path, task.start, task.stop)
            # the index of the range's first element: computed only if a reject needs it
            first = functools.cache(lambda: scan_json_array(path, 1 << 62, stop_at=task.start)[3])
            yield records, lambda i: ("element", first() + i, _raw(records[i]))
        elif task.kind in ("parquet", "arrow"):
            if task.kind == "parquet":
                pf = pq.ParquetFile(path)
                have = [c for c in cols if c in pf.schema_arrow.names]
                row = sum(pf.metadata.row_group(i).num_rows for i in range(task.start))
                tables = (pf.read_row_group(rg, columns=have, use_threads=False) for rg in range(task.start, task.stop))
            else:
                batches = list(_arrow_batches(path))
                row = sum(b.num_rows for b in batches[: task.start])
                tables = (pa.Table.from_batches([b]) for b in batches[task.start : task.stop])
            for table in tables:
                yield _checked(table, task.format), lambda i, r=row: ("row", r + i, None)
                row += table.num_rows
        elif task.kind == "csv":
            bad: list = []
            parse = _csv_parse(path)
            parse.invalid_row_handler = lambda r: bad.append(r) or "skip"
            reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(use_threads=False), parse_options=parse,
                                   convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in cols}))
            line = 2  # 1-based, after the header (exact unless a value holds a newline)
            for batch in reader:
                table = _checked(pa.Table.from_batches([batch]), task.format)
                yield table, lambda i, b=line: ("line", b + i, None)
                line += batch.num_rows
                for r in bad:  # rows with the wrong number of columns (placed after the batch they were in)
                    yield [_Bad("bad_row", f"expected {r.expected_columns} columns, got {r.actual_columns}")], \
                        lambda i, t=r.text: ("line", _line_of_text(path, t), t[:RAW_PREFIX])
                bad.clear()
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as {task.kind}: {_first_line(e)}") from None


class _Lines:
    """The non-blank lines of a JSONL chunk with their 1-based line numbers (computed only when asked)."""

    def __init__(self, buf: bytes, path: Path, start: int):
        self.buf, self.path, self.start, self._lines = buf, path, start, None

    @property
    def lines(self) -> list[tuple[int, bytes]]:
        if self._lines is None:
            first = _line_of(self.path, self.start)
            self._lines = [(first + k, x) for k, x in enumerate(self.buf.split(b"\n")) if x.strip()]
        return self._lines

    def locate(self, i: int) -> tuple[str, int, str]:
        line, raw = self.lines[i]
        return "line", line, raw.decode("utf-8", "replace")[:RAW_PREFIX]


def _json_line(raw: bytes):
    """One JSONL line -> a Python record, or a _Bad saying why it is not one."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return _Bad("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
    except json.JSONDecodeError as e:
        return _Bad("malformed_json", f"malformed JSON: {e.msg} (column {e.colno})")


def _json_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of whole elements of a JSON array file, ~chunk_bytes each (see packprep._jsonscan)."""
    from packprep._jsonscan import JsonScanError, scan_json_array

    try:
        array_start, end, cuts, _ = scan_json_array(path, chunk_bytes)
    except JsonScanError as e:  # report the parser's precise error when the file is small enough to parse
        if path.stat().st_size <= _PARSE_WHOLE_MAX:
            _json_range(path, 0, path.stat().st_size, wrapped=False)
        raise ValueError(f"{e}; expected a JSON array of objects (or JSON lines)") from None
    ranges = list(zip([array_start + 1] + [c + 1 for c in cuts], cuts + [end]))
    if cuts:  # a trailing comma that fell on a cut leaves a blank last range: `[{...},\n]` is not JSON
        with open(path, "rb") as f:
            f.seek(ranges[-1][0])
            if not f.read(end - ranges[-1][0]).strip():
                line, col = _position(path, end, 1, 1)
                raise ValueError(f"{path}: malformed JSON at line {line} column {col}: Expecting value")
    return ranges


_PARSE_WHOLE_MAX = 256 << 20


def _json_range(path: Path, start: int, stop: int, wrapped: bool = True) -> list:
    """The elements in bytes [start, stop) of a JSON array file (a range from _json_ranges), as Python values."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(stop - start)
    try:
        text = raw.decode("utf-8")
        data = json.loads("[" + text + "]" if wrapped else text)
    except UnicodeDecodeError as e:
        line, col = _position(path, start + e.start, 0, 1)
        raise ValueError(f"{path}: invalid UTF-8 at line {line} column {col}") from None
    except json.JSONDecodeError as e:
        line, col = _position(path, start, e.lineno, e.colno - (wrapped and e.lineno == 1))  # the added '['
        raise ValueError(f"{path}: malformed JSON at line {line} column {col}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects (or JSON lines)")
    return data


def _position(path: Path, start: int, lineno: int, colno: int) -> tuple[int, int]:
    """File line and column of (lineno, colno) counted from byte `start` (error path only: reads the prefix)."""
    with open(path, "rb") as f:
        prefix = f.read(start)
    line = prefix.count(b"\n") + 1
    col = start - (prefix.rfind(b"\n") + 1)  # 0-based column of `start` on its line
    if lineno <= 1:
        return line, col + max(colno, 1)
    return line + lineno - 1, colno


def _peek_json(path: Path, first: tuple[int, int]) -> pa.Schema | None:
    """The union schema of the first records of a JSON array file (parses only its first range)."""
    records = [r for r in _json_range(path, *first)[:_PEEK_LINES] if isinstance(r, dict)]
    return _union([pa.Table.from_pylist([r]).schema for r in records]) if records else None


def _parse_jsonl(buf: bytes) -> pa.Table:
    """pyarrow's JSON reader over a whole chunk (block_size >= the chunk, so a record of any size fits)."""
    return pjson.read_json(pa.BufferReader(buf),
                           read_options=pjson.ReadOptions(use_threads=False, block_size=max(len(buf), 1 << 16)))


def _line_of(path: Path, byte_pos: int) -> int:
    """1-based line number of byte_pos (only on the error path: reads the file prefix)."""
    with open(path, "rb") as f:
        return f.read(byte_pos).count(b"\n") + 1


def _line_of_text(path: Path, text: str) -> int | None:
    """1-based line of the first line equal to `text` (a CSV row pyarrow could not parse; error path only)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return next((k for k, x in enumerate(f, 1) if x.rstrip("\r\n") == text), None)


def _open_arrow(path: Path):
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(source)


def _arrow_batches(path: Path):
    reader = _open_arrow(path)
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


def _csv_parse(path: Path) -> pcsv.ParseOptions:
    return pcsv.ParseOptions(delimiter="\t" if Path(path).suffix.lower() == ".tsv" else ",", newlines_in_values=True)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------------- records

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")  # kept as they are; ROLES' aliases map


def _table_ok(table: pa.Table, fmt: Format) -> bool:
    """Whole-column checks (the fast path): every field present, no nulls, the right type, valid UTF-8."""
    for name in fmt.fields:
        optional = fmt.name == "alpaca" and name == "input"
        if name not in table.column_names:
            if optional:
                continue
            return False
        col = table[name]
        t = col.type
        if col.null_count and not optional:
            return False
        if fmt.name in ("chat", "sharegpt"):
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                return False
        elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            return False
        try:
            col.validate(full=True)  # UTF-8 (pyarrow's JSON reader does not check it)
        except pa.ArrowInvalid:
            return False
    return True


def _checked(table: pa.Table, fmt: Format):
    return table if _table_ok(table, fmt) else _table_records(table)


def _table_records(table: pa.Table) -> list:
    """A table that failed the column checks as Python records (a row with invalid UTF-8 becomes a _Bad)."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        out = []
        for i in range(table.num_rows):
            try:
                out += table.slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
                out.append(_Bad("invalid_utf8", f"invalid UTF-8 at byte {e.start} of a text field"))
        return out


def _to_docs(part, task: ReadTask, first: int, locate, rejects) -> Docs:
    """A checked table slice (fast: whole columns) or a list of Python records (each checked) -> Docs."""
    fmt = task.format
    if isinstance(part, pa.Table) and fmt.name not in ("chat", "sharegpt"):
        texts = {f: part[f].to_pylist() if f in part.column_names else [""] * part.num_rows for f in fmt.fields}
        if fmt.name == "text":
            return Docs(texts=texts[fmt.fields[0]])
        if fmt.name == "prompt-completion":
            return Docs(prompts=texts[fmt.fields[0]], completions=texts[fmt.fields[1]])
        return Docs(prompts=[_alpaca_prompt(i, x) for i, x in zip(texts["instruction"], texts["input"])],
                    completions=texts["output"])
    if isinstance(part, pa.Table):  # chats: a Python pass per conversation in any case
        records, convert = part[fmt.fields[0]].to_pylist(), lambda conv: _conversation(conv, fmt)
    else:
        records, convert = part, lambda rec: _record(rec, fmt)
    good = []
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, _Bad):
                raise rec
            good.append(convert(rec))
        except _Bad as bad:
            where, at, raw = locate(i)
            reject = Reject(first + i, task.path, where, at, bad.kind, bad.reason, raw if raw is not None else
                            _raw(rec if not isinstance(rec, _Bad) else None))
            if rejects is None:
                raise RecordError(reject.message() + " (--on-error skip sets bad records aside)") from None
            rejects.append(reject)
    if fmt.name in ("chat", "sharegpt"):
        return Docs(chats=good)
    if fmt.name == "text":
        return Docs(texts=good)
    return Docs(prompts=[p for p, _ in good], completions=[c for _, c in good])


def _record(rec, fmt: Format):
    """One Python record -> a text, a (prompt, completion) pair or a conversation; raises _Bad."""
    if not isinstance(rec, dict):
        raise _Bad("wrong_type", f"expected an object with field(s) {', '.join(fmt.fields)}, got {_jtype(rec)}")
    if fmt.name in ("chat", "sharegpt"):
        return _conversation(_field(rec, fmt.fields[0], fmt, check=False), fmt)
    if fmt.name == "text":
        return _field(rec, fmt.fields[0], fmt)
    if fmt.name == "prompt-completion":
        return _field(rec, fmt.fields[0], fmt), _field(rec, fmt.fields[1], fmt)
    inp = _field(rec, "input", fmt) if rec.get("input") is not None else ""
    return _alpaca_prompt(_field(rec, "instruction", fmt), inp), _field(rec, "output", fmt)


def _field(rec: dict, name: str, fmt: Format, check: bool = True):
    if name not in rec:
        raise _Bad("missing_field", f"field {name!r} missing ({fmt.name} format); fields: {list(rec)}")
    v = rec[name]
    if v is None:
        raise _Bad("null", f"field {name!r} is null")
    if check and not isinstance(v, str):
        raise _Bad("wrong_type", f"field {name!r} holds {_jtype(v)}, expected text")
    return v


def _alpaca_prompt(instruction: str, inp: str | None) -> str:
    return instruction + ("\n\n" + inp if inp else "") + "\n\n"


def _conversation(conv, fmt: Format) -> list[dict]:
    """A list of messages (role/content, or ShareGPT from/value) -> [{"role", "content"}]; raises _Bad."""
    if conv is None:
        raise _Bad("null", f"field {fmt.fields[0]!r} is null")
    if not isinstance(conv, list):
        raise _Bad("wrong_type", f"field {fmt.fields[0]!r} holds {_jtype(conv)}, expected a list of messages")
    out = []
    for k, m in enumerate(conv):
        if not isinstance(m, dict):
            raise _Bad("wrong_type", f"message {k} is {_jtype(m)}, expected an object with role and content")
        sharegpt = m.get("role") is None and m.get("from") is not None
        role, content = (m.get("from"), m.get("value")) if sharegpt else (m.get("role"), m.get("content"))
        if role in CHAT_ROLES and not sharegpt:
            pass
        elif isinstance(role, str) and role.lower() in ROLES:
            role = ROLES[role.lower()]
        else:
            accepted = ", ".join(dict.fromkeys((*CHAT_ROLES, *ROLES))) if not sharegpt else ", ".join(ROLES)
            raise _Bad("unknown_role", f"message {k}: unknown role {role!r}; accepted: {accepted}")
        if content is not None and not isinstance(content, str):
            raise _Bad("wrong_type", f"message {k}: content holds {_jtype(content)}, expected text")
        out.append({"role": role, "content": content or ""})
    return out


def _jtype(v) -> str:
    """The JSON name of a Python value's type: 3 -> 'a number'."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    return {str: "text", list: "a list", dict: "an object", bytes: "bytes"}.get(type(v), type(v).__name__)


def _raw(rec) -> str:
    """The start of a record as JSON (for rejects.jsonl)."""
    try:
        return json.dumps(rec, ensure_ascii=False, default=str)[:RAW_PREFIX]
    except (TypeError, ValueError):
        return repr(rec)[:RAW_PREFIX]


# ---------------------------------------------------------------------------------------------------- default corpus


def stdlib_corpus(out: Path) -> Path:
    """The embedded default corpus: this Python's standard library sources as text documents, written once.

    Each module is split into blocks (module header, each def/class/method), so documents range from a few
    tokens to a few thousand; ~12 MB of real code and docstrings on CPython 3.11, read in ~1 s.
    Deterministic for a given Python installation (files sorted; tests, site-packages and caches left out).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"no standard library sources under {root}; pass input files")
    block = re.compile(r"\n\n(?=(?:    )?(?:def |class |async def |@))")  # a blank line, then a def/class/method
    texts: list[str] = []
    for p in files:
        try:
            src = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts += [f"# {p.relative_to(root)}\n{b.strip()}\n" for b in block.split(src) if b.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.table({"text": texts}), tmp, row_group_size=512)
    tmp.replace(out)
    return out
