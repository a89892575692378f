"""Ollama export: a directory with the GGUF file and a Modelfile that points at it.

    lmforge export runs/quickstart/final --format ollama --out my-model
    ollama create my-model -f my-model/Modelfile && ollama run my-model

Ollama templates are Go templates over `.Messages` (each with `.Role` and `.Content`; a system prompt
is a message with role "system"), not Jinja. The chat formats below are rows of data: how one turn is
written and how the assistant's turn opens. A row is chosen only if it renders probe conversations
exactly as the model's own Jinja chat template does (BOS aside: the GGUF's add_bos_token makes
llama.cpp add it), so the Go template it becomes is the same format, not a guess from a marker.
Formats: lmforge's own `<|role|>...<|end|>`, ChatML (Qwen2/Qwen3/SmolLM), Llama 3 headers, Gemma turns,
Phi-3 and OLMo 2 `<|role|>` lines; and three that are not one turn per message (SPECIAL_FORMATS):
Llama 3.1/3.2 (a dated system header), Mistral v0.3 `[INST]` (the system prompt goes into the last user
turn) and Gemma 3 (the system prompt opens the first user turn). Any other template: the Modelfile
passes prompts through unchanged and says so. Stop parameters are every token lmforge stops at (EOS, end-of-turn ids of config.json
and generation_config.json, the template's end-of-turn token).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from lmforge.export.gguf import DTYPES, _load, export_gguf, stop_ids
from lmforge.export.targets import check_out_path
from lmforge.lm import LM
from lmforge.utils import UserError, atomic_dir

# name -> (one turn, with {role} and {content}; the opening of the assistant's turn; role renames). A
# rename may instead give a whole turn for that role ("assistant:" prefix: OLMo 2 ends them with EOS).
CHAT_FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
    "lmforge": ("<|{role}|>{content}<|end|>", "<|assistant|>", {}),
    "chatml": ("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", {}),
    "llama3": (
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        {},
    ),
    "gemma": (
        "<start_of_turn>{role}\n{content}<end_of_turn>\n",
        "<start_of_turn>model\n",
        {"assistant": "model"},
    ),
    "phi3": ("<|{role}|>\n{content}<|end|>\n", "<|assistant|>\n", {}),
    "olmo2": (
        "<|{role}|>\n{content}\n",
        "<|assistant|>\n",
        {"assistant": "turn:<|assistant|>\n{content}<|endoftext|>\n"},
    ),
}
# Conversations a format must render exactly as the Jinja template does (those the template accepts).
PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]


def render(fmt: str, messages: list[dict], default_system: str | None = None) -> str:
    """The prompt format `fmt` writes for `messages`, with the assistant's turn opened (and a system
    turn of `default_system` first when the conversation has none, as Qwen2.5's template does)."""
    turn, prompt, roles = CHAT_FORMATS[fmt]
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": default_system}, *messages]
    text = ""
    for m in messages:
        r = roles.get(m["role"], m["role"])
        text += (
            r[5:].format(content=m["content"])
            if r.startswith("turn:")
            else turn.format(role=r, content=m["content"])
        )
    return text + prompt


def go_template_for(fmt: str, default_system=None) -> str:
    """The Ollama (Go) template of the format `fmt` (over .Messages; Ollama puts the system prompt there).
    For a SPECIAL_FORMATS row the second argument is its parameters (a dict), not a system prompt."""
    if fmt in SPECIAL_FORMATS:
        return SPECIAL_FORMATS[fmt][1](default_system)
    turn, prompt, roles = CHAT_FORMATS[fmt]
    role = "{{ .Role }}"
    whole = {k: v[5:] for k, v in roles.items() if v.startswith("turn:")}
    for ours, theirs in roles.items():  # e.g. Gemma names the assistant "model"
        if ours not in whole:
            role = f'{{{{ if eq .Role "{ours}" }}}}{theirs}{{{{ else }}}}{role}{{{{ end }}}}'
    head = ""
    if default_system is not None:  # the template's own system prompt when the conversation has none
        sys_turn = turn.format(role=roles.get("system", "system"), content=default_system)
        head = '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + sys_turn + "{{ end }}"
    body = turn.replace("{role}", role).replace("{content}", "{{ .Content }}")
    for r, t in whole.items():  # a role with a turn of its own
        body = (
            f'{{{{ if eq .Role "{r}" }}}}'
            + t.replace("{content}", "{{ .Content }}")
            + "{{ else }}"
            + body
            + "{{ end }}"
        )
    return head + "{{- range .Messages }}" + body + "{{ end }}" + prompt


# ------------------------------------------------------------------ formats that are not one turn a message
# Each row: (render(messages, params) -> text, go(params) -> Go template, params(tokenizer, probes) ->
# dict or None). The Go templates use only text/template builtins (range with $i, if/else, and, eq,
# index, len, slice); inside range, `$` is the root, so `(index $.Messages 0)` is the first message.
# The Jinja templates strip (|trim) contents; these do not (ordinary contents have no edge whitespace).
_SYS0 = '(eq (index $.Messages 0).Role "system")'  # the conversation opens with a system prompt
_LLAMA3_HEAD = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"


def _split_system(messages):
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _llama3_dated(messages, p):
    system, rest = _split_system(messages)
    text = _LLAMA3_HEAD + f"Today Date: {p['date']}\n\n{system or ''}<|eot_id|>"
    for m in rest:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _llama3_dated_go(p):
    return (
        _LLAMA3_HEAD
        + f"Today Date: {p['date']}\n\n"
        + '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}{{ end }}{{ end }}<|eot_id|>'
        + '{{ range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>'
        + "\n\n{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _llama3_dated_params(tokenizer, probes):
    m = re.search(r"Today Date: ([^\n]*)\n\n", probes[0][1])
    if m is None:
        return None
    # Llama 3.2 writes strftime_now("%d %b %Y"); Ollama's currentDate only writes YYYY-MM-DD, so the
    # date is the one at export time (the Modelfile says so). Llama 3.1 writes a fixed date.
    dynamic = "strftime_now" in tokenizer.chat_template and m.group(1) == _today()
    return {"date": m.group(1), "dynamic": dynamic}


def _today() -> str:
    from datetime import datetime

    return datetime.now().strftime("%d %b %Y")


def _mistral(messages, p):
    system, rest = _split_system(messages)
    text = ""
    for i, m in enumerate(rest):
        if m["role"] == "user":
            pre = f"{system}\n\n" if system is not None and i == len(rest) - 1 else ""
            text += f"[INST] {pre}{m['content']}[/INST]"
        else:
            text += f" {m['content']}{p['eos']}"
    return text  # no generation prompt: the model answers right after [/INST]


def _mistral_go(p):
    last = "(eq (len (slice $.Messages $i)) 1)"
    return (
        '{{- range $i, $m := .Messages }}{{ if eq .Role "user" }}[INST] '
        + f"{{{{ if and {last} {_SYS0} }}}}{{{{ (index $.Messages 0).Content }}}}\n\n{{{{ end }}}}"
        + "{{ .Content }}[/INST]"
        + f'{{{{ else }}}}{{{{ if eq .Role "assistant" }}}} {{{{ .Content }}}}{p["eos"]}{{{{ end }}}}'
        + "{{ end }}{{ end }}"
    )


def _eos(tokenizer, probes):
    eos = tokenizer.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    return {"eos": eos} if eos else None


def _gemma3(messages, p):
    system, rest = _split_system(messages)
    text = ""
    for i, m in enumerate(rest):
        role = "model" if m["role"] == "assistant" else m["role"]
        pre = f"{system}\n\n" if system is not None and i == 0 else ""
        text += f"<start_of_turn>{role}\n{pre}{m['content']}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _gemma3_go(p):
    role = '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}'
    return (  # a system message opens the user turn; the first user message then continues it
        '{{- range $i, $m := .Messages }}{{ if eq .Role "system" }}<start_of_turn>user\n{{ .Content }}\n\n'
        + f"{{{{ else }}}}{{{{ if not (and (eq $i 1) {_SYS0}) }}}}<start_of_turn>{role}\n{{{{ end }}}}"
        + "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    )


SPECIAL_FORMATS = {
    "llama3-dated": (_llama3_dated, _llama3_dated_go, _llama3_dated_params),
    "mistral-inst": (_mistral, _mistral_go, _eos),
    "gemma3": (_gemma3, _gemma3_go, lambda tokenizer, probes: {}),
}


def _jinja_probes(tokenizer) -> list[tuple[list[dict], str]]:
    bos = tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    if "bos_token" not in tokenizer.chat_template:
        bos = None  # only a template that writes bos_token starts with it (SmolLM's BOS is <|im_start|>)
    out = []
    for messages in PROBES:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception:  # a template may refuse a probe (Gemma: no system role); skip that one
            continue
        if bos and text.startswith(bos):
            text = text[len(bos) :]  # llama.cpp / Ollama add BOS when they tokenize (add_bos_token)
        out.append((messages, text))
    return out


def _default_system(fmt: str, probes) -> str | None:
    """The system prompt a template writes for a conversation without one (read off the probe with a
    single user message), or None."""
    turn, _, roles = CHAT_FORMATS[fmt]
    before, _, after = turn.format(role=roles.get("system", "system"), content="\0").partition("\0")
    for messages, text in probes:
        if messages[0]["role"] != "system" and text.startswith(before) and after in text[len(before) :]:
            return text[len(before) : text.index(after, len(before))]
    return None


def chat_format(tokenizer) -> tuple[str, str | dict | None] | None:
    """(row of CHAT_FORMATS, default system prompt or None) or (row of SPECIAL_FORMATS, its parameters)
    rendering like `tokenizer`'s Jinja chat template on every probe it accepts, else None."""
    if tokenizer is None or not tokenizer.chat_template:
        return None
    probes = _jinja_probes(tokenizer)
    if not probes:
        return None
    for fmt in CHAT_FORMATS:
        for default in (None, _default_system(fmt, probes)):
            if all(render(fmt, m, default) == text for m, text in probes):
                return fmt, default
    for fmt, (write, _, params) in SPECIAL_FORMATS.items():  # second: (row's parameters)
        p = params(tokenizer, probes)
        if p is not None and all(write(m, p) == text for m, text in probes):
            return fmt, p
    return None


def go_template(tokenizer) -> str | None:
    """The Ollama (Go) template equivalent to a tokenizer's chat template, else None."""
    found = chat_format(tokenizer) if hasattr(tokenizer, "apply_chat_template") else None
    return go_template_for(*found) if found else None


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(gguf_name: str, tokenizer, context: int, cfg=None) -> str:
    """The text of a Modelfile for `gguf_name` (relative to the Modelfile)."""
    lines = [f"FROM ./{gguf_name}", ""]
    tpl = go_template(tokenizer) if tokenizer is not None else None
    if tpl is not None:
        fmt, p = chat_format(tokenizer)
        lines += [f"# chat format: {fmt} (the model's chat template, as a Go template)"]
        if isinstance(p, dict) and p.get("dynamic"):
            lines += [
                f"# The chat template writes today's date; the TEMPLATE has the export date ({p['date']}):",
                "# Ollama's currentDate writes only YYYY-MM-DD, not the template's %d %b %Y. Re-export to update.",
            ]
        lines += [f'TEMPLATE """{tpl}"""', ""]
    elif tokenizer is not None and tokenizer.chat_template:
        warnings.warn(
            "Ollama: the chat template is not one lmforge can translate to a Go template; the "
            "Modelfile passes prompts through unchanged (edit its TEMPLATE to chat)",
            stacklevel=3,
        )
        lines += [
            "# The tokenizer's Jinja chat template has no known Go equivalent; prompts pass through as is.",
            'TEMPLATE """{{ .Prompt }}"""',
            "",
        ]
    else:
        lines += ['TEMPLATE """{{ .Prompt }}"""', ""]
    if tokenizer is not None:
        ids = stop_ids(tokenizer, cfg) if cfg is not None else list(_stops(tokenizer))
        for i in ids:
            name = tokenizer.id_to_token(i)
            if name is not None:
                lines.append(f"PARAMETER stop {_quote(name)}")
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


def _stops(tokenizer):
    s = tokenizer.stop_ids
    return s() if callable(s) else s


def export_ollama(checkpoint, out: str | os.PathLike, dtype: str = "f16", calibration=None) -> Path:
    """Write `out/model.gguf` and `out/Modelfile` (atomically, as one directory). Returns `out`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: Ollama export writes {', '.join(DTYPES)}")
    out = Path(out)
    check_out_path(out, kind="directory")
    model, tokenizer, src = _load(checkpoint)
    lm = LM(model, tokenizer, src)  # loaded once, handed to export_gguf
    with atomic_dir(out) as tmp:
        export_gguf(
            lm, tmp / "model.gguf", dtype=dtype, name=src.name if src else None, calibration=calibration
        )
        text = modelfile("model.gguf", tokenizer, model.config.max_seq_len, model.config)
        (tmp / "Modelfile").write_text(text)
    return out
