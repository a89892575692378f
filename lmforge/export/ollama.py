"""Ollama export: a directory with the GGUF file and a Modelfile that points at it.

    lmforge export runs/quickstart/final --format ollama --out my-model
    ollama create my-model -f my-model/Modelfile && ollama run my-model

Ollama templates are Go templates, not Jinja, so the chat template is translated for the formats
we know (lmforge's own `<|role|>...<|end|>` turns, and ChatML); for any other template the Modelfile
falls back to the raw prompt and says so in a comment. Stop tokens come from the tokenizer.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from lmforge.export import check_out_path
from lmforge.export.gguf import DTYPES, _load, export_gguf
from lmforge.lm import LM
from lmforge.utils import UserError, atomic_dir

# Go templates for Ollama. BOS is not written here: the GGUF sets add_bos_token, so llama.cpp adds it.
_LMFORGE_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"
_CHATML_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def go_template(chat_template: str | None) -> str | None:
    """The Ollama (Go) template equivalent to a Jinja chat template we recognise, else None."""
    if not chat_template:
        return None
    from lmforge.tokenizer import CHAT_TEMPLATE

    if chat_template == CHAT_TEMPLATE:
        return _LMFORGE_TEMPLATE
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        return _CHATML_TEMPLATE
    return None


def modelfile(gguf_name: str, tokenizer, context: int) -> str:
    """The text of a Modelfile for `gguf_name` (relative to the Modelfile)."""
    lines = [f"FROM ./{gguf_name}", ""]
    tpl = go_template(tokenizer.chat_template if tokenizer is not None else None)
    if tpl is not None:
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
    stops = []
    if tokenizer is not None:
        stops = [tokenizer.id_to_token(i) for i in tokenizer.stop_ids]
    for s in stops:
        lines.append(f'PARAMETER stop "{s}"')
    lines.append(f"PARAMETER num_ctx {context}")
    return "\n".join(lines) + "\n"


def export_ollama(checkpoint, out: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write `out/model.gguf` and `out/Modelfile` (atomically, as one directory). Returns `out`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: Ollama export writes {', '.join(DTYPES)}")
    out = Path(out)
    check_out_path(out, kind="directory")
    model, tokenizer, src = _load(checkpoint)
    lm = LM(model, tokenizer, src)  # loaded once, handed to export_gguf
    with atomic_dir(out) as tmp:
        export_gguf(lm, tmp / "model.gguf", dtype=dtype, name=src.name if src else None)
        (tmp / "Modelfile").write_text(modelfile("model.gguf", tokenizer, model.config.max_seq_len))
    return out
