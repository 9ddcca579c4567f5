"""Sources: input paths -> files -> read tasks -> record batches -> documents, with pyarrow's C++ readers.

    files = resolve_inputs(["data/*.jsonl", "hf_folder/"])          # globs, folders, HF save_to_disk folders
    tasks = plan_tasks(files, config)                               # fixed byte/row-group chunks, format per file
    for docs in read_task(tasks[0]): ...                            # Docs: texts | prompts+completions | chats

A task is a deterministic slice of one file (JSONL: newline-aligned byte range of ~chunk_bytes; Parquet: row
groups; Arrow: record batches; JSON arrays and CSV: the whole file), so the split of work depends only on the
inputs and `chunk_bytes`, never on the number of workers. Planning costs one seek per chunk plus a peek at each
file's first record (format detection); reading costs pyarrow's parse (~100-300 MB/s per core for JSONL).
"""

from __future__ import annotations

import glob
import json
import re
import sysconfig
from dataclasses import dataclass
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
        fmt = resolve_format(path, peek_schema(path, kind), format, **fields)
        for start, stop in _chunks(path, kind, chunk_bytes):
            tasks.append(ReadTask(len(tasks), str(path), kind, start, stop, fmt))
    return tasks


def _chunks(path: Path, kind: str, chunk_bytes: int) -> list[tuple[int, int]]:
    if kind == "jsonl":
        size = path.stat().st_size
        cuts = [0]
        with open(path, "rb") as f:
            while cuts[-1] + chunk_bytes < size:
                f.seek(cuts[-1] + chunk_bytes - 1)
                f.readline()  # the line holding byte (cut - 1) ends this chunk
                if f.tell() >= size:
                    break
                cuts.append(f.tell())
        return list(zip(cuts, cuts[1:] + [size]))
    if kind == "parquet":
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    elif kind == "arrow":
        sizes = [b.nbytes for b in _arrow_batches(path)]
    else:  # json arrays and CSV: one task per file
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


def peek_schema(path: Path, kind: str) -> pa.Schema:
    """The schema of a file's first records, read without parsing the whole file."""
    try:
        if kind == "jsonl":
            with open(path, "rb") as f:
                head = f.readline()
            if not head.strip():
                raise ValueError(f"{path}: empty file (or first line empty); no records to read")
            return _parse_jsonl(head, path, 0).schema
        if kind == "json":
            return pa.Table.from_pylist(_first_json_record(path)).schema
        if kind == "parquet":
            return pq.read_schema(path)
        if kind == "arrow":
            return _open_arrow(path).schema
        if kind == "csv":
            return pcsv.open_csv(path, parse_options=_csv_parse(path)).schema
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as {kind}: {_first_line(e)}") from None
    raise AssertionError(kind)


def _first_json_record(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")  # one JSON array: the whole file is one task anyway
    data = json.loads(text)
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
        raise ValueError(f"{path}: expected a JSON array of objects (or JSON lines)")
    if not data:
        raise ValueError(f"{path}: empty JSON array; no records to read")
    return data[:1]


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


def read_task(task: ReadTask, batch_rows: int = 2048) -> Iterator[Docs]:
    """The task's documents, in file order, in batches of at most batch_rows."""
    for table in _read_tables(task):
        for off in range(0, table.num_rows, batch_rows):
            yield to_docs(table.slice(off, batch_rows), task)


def _read_tables(task: ReadTask) -> Iterator[pa.Table]:
    path = Path(task.path)
    cols = [f for f in task.format.fields]
    try:
        if task.kind == "jsonl":
            with open(path, "rb") as f:
                f.seek(task.start)
                buf = f.read(task.stop - task.start)
            yield _parse_jsonl(buf, path, task.start)
        elif task.kind == "json":
            yield pa.Table.from_pylist(json.loads(path.read_text(encoding="utf-8")))
        elif task.kind == "parquet":
            pf = pq.ParquetFile(path)
            have = [c for c in cols if c in pf.schema_arrow.names]
            for rg in range(task.start, task.stop):
                yield pf.read_row_group(rg, columns=have, use_threads=False)
        elif task.kind == "arrow":
            for i, batch in enumerate(_arrow_batches(path)):
                if task.start <= i < task.stop:
                    yield pa.Table.from_batches([batch])
        elif task.kind == "csv":
            reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(use_threads=False),
                                   parse_options=_csv_parse(path),
                                   convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in cols}))
            for batch in reader:
                yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as {task.kind}: {_first_line(e)}") from None


def _parse_jsonl(buf: bytes, path: Path, byte_start: int) -> pa.Table:
    try:
        return pjson.read_json(pa.BufferReader(buf),
                               read_options=pjson.ReadOptions(use_threads=False, block_size=max(len(buf), 1 << 16)))
    except pa.ArrowInvalid as e:
        line = _line_of(path, byte_start)
        raise ValueError(f"{path}: malformed JSON lines after line {line}: {_first_line(e)}") from None


def _line_of(path: Path, byte_pos: int) -> int:
    """1-based line number of byte_pos (only on the error path: reads the file prefix)."""
    with open(path, "rb") as f:
        return f.read(byte_pos).count(b"\n") + 1


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


def to_docs(table: pa.Table, task: ReadTask) -> Docs:
    """Columns of one record batch -> Docs in the shape the tokenizer wants (checks types and nulls)."""
    fmt = task.format
    if fmt.name == "text":
        return Docs(texts=_strings(table, fmt.fields[0], task))
    if fmt.name == "prompt-completion":
        return Docs(prompts=_strings(table, fmt.fields[0], task), completions=_strings(table, fmt.fields[1], task))
    if fmt.name == "alpaca":
        inst, out = _strings(table, "instruction", task), _strings(table, "output", task)
        inp = _strings(table, "input", task, optional=True)
        prompts = [i + ("\n\n" + x if x else "") + "\n\n" for i, x in zip(inst, inp)]
        return Docs(prompts=prompts, completions=out)
    return Docs(chats=[_messages(conv, task) for conv in _column(table, fmt.fields[0], task).to_pylist()])


def _column(table: pa.Table, name: str, task: ReadTask) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ValueError(f"{task.path}: field {name!r} not found; fields: {table.column_names}")
    col = table[name]
    if col.null_count:
        raise ValueError(f"{task.path}: field {name!r} is null in {col.null_count} record(s) of task {task.index}")
    return col


def _strings(table: pa.Table, name: str, task: ReadTask, optional: bool = False) -> list[str]:
    if optional and name not in table.column_names:
        return [""] * table.num_rows
    col = _column(table, name, task)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ValueError(f"{task.path}: field {name!r} holds {col.type}, expected text")
    return col.to_pylist()


def _messages(conv, task: ReadTask) -> list[dict]:
    if not isinstance(conv, list):
        raise ValueError(f"{task.path}: field {task.format.fields[0]!r} must hold a list of messages")
    out = []
    for m in conv:
        if "from" in m and m.get("role") is None:
            role = ROLES.get(str(m["from"]).lower())
            if role is None:
                raise ValueError(f"{task.path}: unknown chat role {m['from']!r}; known: {', '.join(ROLES)}")
            out.append({"role": role, "content": m.get("value") or ""})
        else:
            out.append({"role": m.get("role"), "content": m.get("content") or ""})
    return out


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
