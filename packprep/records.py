"""Records -> documents: the five record formats, their detection, per-record validation and reject reasons.

    fmt = resolve_format(path, schema, "auto")                 # Format("chat", ("messages",)) from the field names
    if not table_ok(table, fmt): part = table_records(table)   # the fast path keeps the table
    docs = to_docs(part, task, first, locate, rejects)          # Docs: texts | prompts+completions | chats

Formats: text (`text`), prompt-completion (`prompt`/`completion` or `question`/`answer`), chat (`messages` of
role/content), ShareGPT (`conversations` of from/value; roles mapped by ROLES), alpaca (`instruction`, optional
`input`, `output`; the prompt is `instruction\\n\\ninput\\n\\n`). A bad record (wrong type, missing or null field,
unknown role) raises `RecordError` as one line, or, given a `rejects` list, becomes a `Reject` and is skipped.

Cost: the good path is whole-column work (one validity pass per column, then `to_pylist`); only a table that fails
`table_ok` is converted and checked record by record in Python, and chat records always are (one pass per message).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool",
         "function": "tool", "observation": "tool"}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")  # kept as they are; ROLES' aliases map
RAW_PREFIX = 200  # characters of a rejected record kept in rejects.jsonl


@dataclass(frozen=True)
class Format:
    """How the records of one file become documents: format name and the fields it reads."""

    name: str  # text | prompt-completion | chat | sharegpt | alpaca
    fields: tuple[str, ...]  # text: (text,)  pc: (prompt, completion)  chat/sharegpt: (messages,)  alpaca: 3 fields


@dataclass
class Docs:
    """A batch of documents in one of three shapes (exactly one is set)."""

    texts: list[str] | None = None
    prompts: list[str] | None = None
    completions: list[str] | None = None
    chats: list[list[dict]] | None = None
    rendered: list[tuple[str, list]] | None = None  # chats through the template: (text, loss spans), when rendered

    def __len__(self) -> int:
        return len(next(x for x in (self.texts, self.prompts, self.chats) if x is not None))


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


class BadRecord(Exception):
    """One record's problem, raised or yielded in place of the record; becomes a Reject or a RecordError."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# ---------------------------------------------------------------------------------------------------- detection


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


# ---------------------------------------------------------------------------------------------------- validation


def table_ok(table: pa.Table, fmt: Format) -> bool:
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


def table_records(table: pa.Table) -> list:
    """A table that failed the column checks as Python records (a row with invalid UTF-8 becomes a BadRecord)."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        out = []
        for i in range(table.num_rows):
            try:
                out += table.slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
                out.append(BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of a text field"))
        return out


def to_docs(part, task, first: int, locate, rejects, render=None) -> Docs:
    """A checked table slice (fast: whole columns) or a list of Python records (each checked) -> Docs.

    `task` is the ReadTask (its path and format), `first` the task-relative index of part's first record,
    `locate(i)` -> (where, at, raw or None) for part's record i; bad records go to `rejects`, or raise without it.
    `render(messages)` (chats, optional): the chat template's render, run here so that a conversation the template
    refuses is a bad record with its file and line; Docs.rendered then holds its results.
    """
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
    good, rendered = [], []
    for i, rec in enumerate(records):
        try:
            if isinstance(rec, BadRecord):
                raise rec
            doc = convert(rec)
            if render is not None:
                rendered.append(render(doc))
            good.append(doc)
        except BadRecord as bad:
            where, at, raw = locate(i)
            reject = Reject(first + i, task.path, where, at, bad.kind, bad.reason, raw if raw is not None else
                            raw_json(rec if not isinstance(rec, BadRecord) else None))
            if rejects is None:
                raise RecordError(reject.message() + " (--on-error skip sets bad records aside)") from None
            rejects.append(reject)
    if fmt.name in ("chat", "sharegpt"):
        return Docs(chats=good, rendered=rendered if render is not None else None)
    if fmt.name == "text":
        return Docs(texts=good)
    return Docs(prompts=[p for p, _ in good], completions=[c for _, c in good])


def _record(rec, fmt: Format):
    """One Python record -> a text, a (prompt, completion) pair or a conversation; raises BadRecord."""
    if not isinstance(rec, dict):
        raise BadRecord("wrong_type", f"expected an object with field(s) {', '.join(fmt.fields)}, got {jtype(rec)}")
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
        raise BadRecord("missing_field", f"field {name!r} missing ({fmt.name} format); fields: {list(rec)}")
    v = rec[name]
    if v is None:
        raise BadRecord("null", f"field {name!r} is null")
    if check and not isinstance(v, str):
        raise BadRecord("wrong_type", f"field {name!r} holds {jtype(v)}, expected text")
    return v


def _alpaca_prompt(instruction: str, inp: str | None) -> str:
    return instruction + ("\n\n" + inp if inp else "") + "\n\n"


def _conversation(conv, fmt: Format) -> list[dict]:
    """A list of messages (role/content, or ShareGPT from/value) -> the messages the template gets; raises BadRecord.

    Chat messages pass through as transformers hands them to a template: `tool_calls`, tool messages, `content:
    null` and content-part lists included (what a template cannot render is rejected when it renders). Only the
    role is checked (ShareGPT's names mapped by ROLES) and `content` must be present: a message without it is a
    bad record, not an empty turn.
    """
    if conv is None:
        raise BadRecord("null", f"field {fmt.fields[0]!r} is null")
    if not isinstance(conv, list):
        raise BadRecord("wrong_type", f"field {fmt.fields[0]!r} holds {jtype(conv)}, expected a list of messages")
    out = []
    for k, m in enumerate(conv):
        if not isinstance(m, dict):
            raise BadRecord("wrong_type", f"message {k} is {jtype(m)}, expected an object with role and content")
        sharegpt = m.get("role") is None and m.get("from") is not None
        role = m.get("from") if sharegpt else m.get("role")
        if role in CHAT_ROLES and not sharegpt:
            pass
        elif isinstance(role, str) and role.lower() in ROLES:
            role = ROLES[role.lower()]
        else:
            accepted = ", ".join(dict.fromkeys((*CHAT_ROLES, *ROLES))) if not sharegpt else ", ".join(ROLES)
            raise BadRecord("unknown_role", f"message {k}: unknown role {role!r}; accepted: {accepted}")
        key = "value" if sharegpt else "content"
        if key not in m:
            raise BadRecord("missing_field", f"message {k} ({role}): no {key!r} (use null for a message without "
                                             "text, e.g. one with tool_calls)")
        content = m[key]
        if content is not None and not isinstance(content, (str, list)):
            raise BadRecord("wrong_type", f"message {k}: content holds {jtype(content)}, expected text, a list of "
                                          "content parts or null")
        if sharegpt:
            out.append({"role": role, "content": content})
        else:
            out.append({**{k2: v for k2, v in m.items() if v is not None or k2 == "content"}, "role": role})
    return out


def jtype(v) -> str:
    """The JSON name of a Python value's type: 3 -> 'a number (3)'."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    return {str: "text", list: "a list", dict: "an object", bytes: "bytes"}.get(type(v), type(v).__name__)


def raw_json(rec) -> str:
    """The start of a record as JSON (for rejects.jsonl)."""
    try:
        return json.dumps(rec, ensure_ascii=False, default=str)[:RAW_PREFIX]
    except (TypeError, ValueError):
        return repr(rec)[:RAW_PREFIX]
    except RecursionError:  # a record nested too deep to print
        return "(nested too deep to show)"
