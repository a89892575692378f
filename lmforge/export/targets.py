"""The formats and weight types an export writes, and where it writes them (checked before any work).

Shared by the format modules (onnx.py, gguf.py, ollama.py, llama_cpp.py, gguf_lora.py) and the
package's `export` entry point; importing it costs no optional dependency, so the CLI reads the
choices from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.utils import UserError

FORMATS = ("onnx", "gguf", "ollama")
# llama.cpp's quantization types, made by its own quantizer (lmforge.export.llama_cpp.quantize), with the
# number of its `llama_ftype`. The k-quants (_k) need rows of 256 values (else a 32-block fallback).
QUANT_TYPES = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_m": 12,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
# Types lmforge writes itself, then llama.cpp's (also gguf.DTYPES; here to check options without imports).
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", *QUANT_TYPES)


def check_out_path(out: Path, kind: str = "file") -> None:
    """Fail early (before any work) when `out` cannot be written."""
    if out.exists() and (out.is_dir() if kind == "file" else not out.is_dir()):
        raise UserError(
            f"{out}: exists and is a {'directory' if kind == 'file' else 'file'}; give a {kind} path"
        )
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{out}: cannot be created, {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: cannot be written, {parent} is not writable")


def default_out(checkpoint: str | os.PathLike, fmt: str, dtype: str | None = None) -> Path:
    """Where an export goes when --out is not given: next to the checkpoint directory."""
    p = Path(checkpoint).resolve()
    if fmt == "gguf":
        return p.with_name(f"{p.name}-{dtype or 'f16'}.gguf")
    return p.with_name(f"{p.name}-{fmt}")
