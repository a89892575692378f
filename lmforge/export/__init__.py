"""Export a checkpoint for other runtimes: ONNX (onnxruntime), GGUF (llama.cpp) and Ollama.

    from lmforge.export import export
    export("runs/quickstart/final", "onnx", with_cache=True)     # -> runs/quickstart/final-onnx/
    export("runs/quickstart/final", "gguf", dtype="q8_0")        # -> runs/quickstart/final-q8_0.gguf
    export("runs/quickstart/final", "gguf", dtype="q4_k_m")      # llama.cpp's own quantizer
    export("runs/quickstart/final", "ollama")                    # -> runs/quickstart/final-ollama/

Each format lives in its own module (onnx.py, gguf.py, ollama.py) and imports its runtime lazily;
onnx_runner.py generates greedily from an ONNX export with onnxruntime alone. See docs/export.md.
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


def export(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    with_cache: bool = False,
    opset: int | None = None,
    check: bool = True,
    calibration: str | os.PathLike | None = None,
) -> Path:
    """Export `checkpoint` (an HF model directory) to `fmt` (onnx, gguf or ollama); returns the path.

    dtype: GGUF/Ollama weight type (f32, f16, bf16, q8_0, or llama.cpp's q4_0 ... q6_k, q4_k_m: see
    QUANT_TYPES; default f16); ONNX is fp32 only.
    calibration: GGUF/Ollama with a llama.cpp type: a text file whose importance matrix guides it.
    with_cache: ONNX: also write the decoder-step model with past/present key-value tensors.
    opset: ONNX opset (>= 17, default 18). check: ONNX: compare onnxruntime with PyTorch first.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    # Options first, then the checkpoint: both fail before any work is done.
    if fmt == "onnx":
        if dtype not in (None, "f32", "fp32", "float32"):
            raise UserError(f"--dtype {dtype}: ONNX export is fp32 only (quantize with onnxruntime tools)")
    else:
        if with_cache:
            raise UserError(f"--with-cache is an ONNX option; it does not apply to --format {fmt}")
        if opset is not None:
            raise UserError(f"--opset is an ONNX option; it does not apply to --format {fmt}")
        if calibration is not None and (dtype or "f16") not in QUANT_TYPES:
            raise UserError(
                f"calibration text guides llama.cpp's quantizer: give a --dtype of {', '.join(QUANT_TYPES)}"
            )
        dtype = dtype or "f16"
        if dtype not in GGUF_DTYPES:
            raise UserError(f"--dtype {dtype!r}: {fmt} export writes {', '.join(GGUF_DTYPES)}")
    from lmforge.checkpoint import read_config

    if read_config(checkpoint).extra.get(
        "quantization_config"
    ):  # a missing or broken checkpoint fails here too
        raise UserError(
            f"{checkpoint} is an lmforge-quantized checkpoint; export the float checkpoint it came "
            "from (GGUF has its own quantization: --dtype q8_0 or q4_k_m)"
        )
    out = Path(out) if out is not None else default_out(checkpoint, fmt, dtype)
    if fmt == "onnx":
        from lmforge.export.onnx import DEFAULT_OPSET, export_onnx

        return export_onnx(checkpoint, out, with_cache=with_cache, opset=opset or DEFAULT_OPSET, check=check)
    if fmt == "gguf":
        from lmforge.export.gguf import export_gguf

        return export_gguf(checkpoint, out, dtype=dtype, calibration=calibration)
    from lmforge.export.ollama import export_ollama

    return export_ollama(checkpoint, out, dtype=dtype, calibration=calibration)


__all__ = ["FORMATS", "GGUF_DTYPES", "QUANT_TYPES", "default_out", "export"]
