"""Chat templates: rendering a conversation as transformers does, and finding the characters that carry loss.

    template = ChatTemplate(source, special, name="Qwen/Qwen2.5-0.5B")  # jinja2 source, bos/eos strings
    text, spans = template.render(messages)                                # spans: [(a, b), ...] character ranges

The text is exactly `apply_chat_template(messages, tokenize=False)`: the same sandboxed jinja2 environment, globals
(`raise_exception`, `strftime_now`, `tojson`) and message clean-up (keys whose value is None are dropped). The loss
spans cover each assistant turn's content and its end-of-turn marker, never role headers or other turns:
  - with `{% generation %}` markers: exactly what they mark (transformers' `return_assistant_tokens_mask`);
  - without: located turn by turn. The turn's content is found after the render of the messages before it, and the
    span runs on over the special tokens that follow the content inside the turn (`<|im_end|>`, `<|eot_id|>`,
    `</s>`...). The turn ends where the render of the messages up to it stops agreeing with the whole render.
    A turn whose content or end-of-turn marker cannot be found this way raises `TemplateError` naming the template:
    packprep never guesses a span.
Cost: one render per conversation with markers; without, three more renders per assistant turn (prefixes).
"""

from __future__ import annotations

import json
import re

GEN_OPEN, GEN_CLOSE = "\ue000", "\ue001"  # private-use code points bracketing {% generation %} output


class TemplateError(ValueError):
    """A conversation the chat template cannot render, or whose assistant spans it cannot locate."""


class ChatTemplate:
    """One jinja2 chat template, compiled once; `special` holds bos_token/eos_token/... strings for the template."""

    def __init__(self, source: str, special: dict, special_tokens: list[str], name: str = "chat template"):
        self.source, self.name = source, name
        self.special = {k: v for k, v in special.items() if v is not None}  # an unset bos_token renders as ""
        self.compiled = _jinja_env().from_string(source)
        self.has_markers = "{% generation %}" in source or "{%- generation %}" in source or bool(
            re.search(r"{%-?\s*generation\s*-?%}", source))
        # the end-of-turn marker: special tokens right after the content, longest first
        toks = sorted((t for t in special_tokens if t), key=len, reverse=True)
        self._specials = re.compile("(?:" + "|".join(map(re.escape, toks)) + ")+") if toks else None

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except TemplateError as e:
            raise TemplateError(f"{self.name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - jinja errors of every kind: the template cannot render this
            raise TemplateError(f"{self.name} cannot render this conversation: {type(e).__name__}: {e}") from None

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(text, character spans that carry loss) of one conversation; raises TemplateError."""
        if not messages:
            return "", []
        messages = clean(messages)
        text = self._render(messages)
        if self.has_markers:
            if any(_holds_marker(m) for m in messages):
                raise TemplateError(f"{self.name}: a message holds the private-use characters U+E000/U+E001 that "
                                    "mark {% generation %} blocks")
            return _strip_markers(text)
        return text, self._turn_spans(messages, text)

    def _turn_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        spans, done = [], 0
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            content = m.get("content")
            if not isinstance(content, str):
                raise TemplateError(f"{self.name} has no {{% generation %}} markers, and assistant message {i} has "
                                    f"no text content to locate (content: {type(content).__name__}); add markers "
                                    "to the template")
            start = done
            for agp in (True, False):  # the render of the turns before it, ending in the assistant header if it can
                prefix = self._render(messages[:i], agp) if i else ""
                if text.startswith(prefix):
                    start = max(start, len(prefix))
                    break
            upto = self._render(messages[: i + 1])
            end = len(text) if upto == text else _common_prefix(upto, text)
            span = seen = None
            for c in dict.fromkeys((content, content.strip())):  # as given, or trimmed by the template (`| trim`)
                pos = text.find(c, start, end) if c else (start if not content.strip() else -1)
                while pos >= 0 and span is None:  # the occurrence followed by the end-of-turn marker
                    seen = pos
                    tail = self._specials.match(text, pos + len(c), end) if self._specials else None
                    if tail is not None:
                        span = (pos, tail.end())
                    pos = text.find(c, pos + 1, end) if c else -1
            if span is None and seen is None:
                raise TemplateError(f"{self.name}: cannot locate assistant message {i}'s content in the rendered "
                                    "conversation; add {% generation %} markers to the template")
            if span is None:
                raise TemplateError(f"{self.name}: cannot locate the end-of-turn marker of assistant message {i} "
                                    "(no special token follows its content in the turn); add {% generation %} "
                                    "markers to the template")
            spans.append(span)
            done = span[1]
        return spans


def chat_renderer(tok, skip: bool):
    """The per-record hook `records.to_docs` calls on each conversation, for a packprep Tokenizer `tok`: the
    template's render, whose failures (raise_exception, a shape the template cannot take, a span it cannot locate)
    become that record's reject or error; with `skip`, a conversation without an assistant message is also set
    aside (kind no_assistant)."""
    from packprep.records import BadRecord  # records does not import chat: no cycle

    def render(messages: list[dict]):
        if tok.chat is None:
            raise ValueError(f"tokenizer {tok.folder} has no chat template; chat data needs one")
        if skip and messages and not any(m.get("role") == "assistant" for m in messages):  # [] is just empty
            raise BadRecord("no_assistant", "no assistant message: nothing to train on (kept, without loss, under "
                                            "--on-error raise)")
        try:
            return tok.chat.render(messages)
        except TemplateError as e:
            raise BadRecord("chat_template", str(e)) from None
    return render


def clean(messages: list[dict]) -> list[dict]:
    """What transformers hands the template: each message without its None-valued keys (`content: null`)."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _holds_marker(m: dict) -> bool:
    s = json.dumps(m, ensure_ascii=False)
    return GEN_OPEN in s or GEN_CLOSE in s


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k] != b[k]), n)
    return i


def _strip_markers(text: str) -> tuple[str, list[tuple[int, int]]]:
    # "a\ue000bc\ue001d" -> ("abcd", [(1, 3)])
    out, spans, pos, start = [], [], 0, None
    for part in re.split(f"([{GEN_OPEN}{GEN_CLOSE}])", text):
        if part == GEN_OPEN:
            start = pos
        elif part == GEN_CLOSE:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            out.append(part)
            pos += len(part)
    return "".join(out), spans


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
        raise TemplateError(f"chat template raised: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
