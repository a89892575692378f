"""Tool calls: which format a model writes them in, parsing them out of its text, forcing them.

A model learns one way of writing a call from its chat template, and the template says which:

| format  | models                          | a call in the model's output                                  |
|---------|---------------------------------|---------------------------------------------------------------|
| hermes  | Qwen2.5, Qwen3, Hermes          | `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` |
| llama3  | Llama-3.1 / 3.2 / 3.3           | `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`)  |
| mistral | Mistral v0.3, Mixtral-8x22B     | `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`              |

`detect(template)` picks the row; `parse(fmt, text)` returns (content, calls); `StreamParser` does the
same on streamed text, passing ordinary content through as it comes and holding back what may be the
start of a call. `tool_choice: "required"` or a named function is enforced rather than hoped for: the
format's opening marker is appended to the prompt and the rest is constrained by a JSON schema
(`forced()`) through the grammar engine, so the output is always one well-formed call.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

FORMATS = ("hermes", "llama3", "mistral")


def detect(template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or None when it does not render tools."""
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t or "[AVAILABLE_TOOLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "tools" in t):
        return "llama3"
    return None


@dataclass
class Call:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


def new_id(fmt: str) -> str:
    """A tool-call id; Mistral's templates require exactly 9 letters or digits."""
    if fmt == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


def _as_call(obj, args_key: tuple[str, ...]) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_key if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list | None:
    """Every JSON value in text, separated by whitespace or ';' (Llama's parallel calls); None if any
    part is not JSON."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i >= len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        out.append(value)


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def parse(fmt: str, text: str) -> tuple[str | None, list[Call]]:
    """(content before the calls or None, calls); no calls (content = text) when the text holds none
    or they do not parse."""
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in _HERMES.findall(text[start:]):
            values = _json_values(body)
            call = _as_call(values[0], ("arguments", "parameters")) if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
        return (text[:start].strip() or None), calls
    if fmt in ("llama3", "mistral"):
        marker = "<|python_tag|>" if fmt == "llama3" else "[TOOL_CALLS]"
        head, sep, tail = text.partition(marker)
        body = tail if sep else text
        values = _json_values(body.strip())
        if not values:
            return text, []
        if fmt == "mistral" and len(values) == 1 and isinstance(values[0], list):
            values = values[0]
        keys = ("parameters", "arguments") if fmt == "llama3" else ("arguments", "parameters")
        calls = [_as_call(v, keys) for v in values]
        if not calls or any(c is None for c in calls):
            return text, []
        return ((head.strip() or None) if sep else None), calls
    raise ValueError(f"unknown tool-call format {fmt!r}")


def _call_schema(fmt: str, tool) -> dict:
    params = tool.function.parameters or {"type": "object"}
    key = "parameters" if fmt == "llama3" else "arguments"
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, key: params},
        "required": ["name", key],
        "additionalProperties": False,
    }


def forced(fmt: str, tools: list, name: str | None = None) -> tuple[str, dict]:
    """(text to append to the prompt, JSON schema of the rest) for a call to `name` (None: any tool)."""
    chosen = [t for t in tools if name is None or t.function.name == name]
    schemas = [_call_schema(fmt, t) for t in chosen]
    one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if fmt == "hermes":
        return "<tool_call>\n", one
    if fmt == "mistral":
        return "[TOOL_CALLS]", {"type": "array", "items": one, "minItems": 1}
    return "", one


class StreamParser:
    """Streamed text in, (content delta) out while it is ordinary text; a call's text is held back and
    parsed at the end (`finish`). A suffix that may be the start of a marker waits for the next text."""

    def __init__(self, fmt: str, prefix: str = ""):
        self.fmt = fmt
        self.markers = {"hermes": ["<tool_call>"], "llama3": ["<|python_tag|>"], "mistral": ["[TOOL_CALLS]"]}[
            fmt
        ]
        self.buf = prefix  # text not handed out yet
        self.in_call = bool(prefix)
        self.sent_any = False

    def push(self, text: str) -> str:
        self.buf += text
        if self.in_call:
            return ""
        # A call that opens the output without a marker (Llama's bare JSON, Mistral's list).
        lead = self.buf.lstrip()
        if not self.sent_any and lead[:1] in ("{", "[") and self.fmt in ("llama3", "mistral"):
            self.in_call = True
            return ""
        if not self.sent_any and not lead:
            return ""
        for mk in self.markers:
            j = self.buf.find(mk)
            if j >= 0:
                out, self.buf, self.in_call = self.buf[:j], self.buf[j:], True
                self.sent_any |= bool(out)
                return out
        hold = max(
            (n for mk in self.markers for n in range(1, len(mk)) if self.buf.endswith(mk[:n])), default=0
        )
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(out) :]
        self.sent_any |= bool(out)
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(content still held back, calls)."""
        if not self.in_call:
            out, self.buf = self.buf, ""
            return out, []
        content, calls = parse(self.fmt, self.buf)
        if not calls:
            out, self.buf = self.buf, ""
            return out, []
        self.buf = ""
        return (content or ""), calls
