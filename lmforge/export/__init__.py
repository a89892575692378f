"""Export a checkpoint for other runtimes: ONNX (onnxruntime), GGUF (llama.cpp) and Ollama.

    from lmforge.export import export
    export("runs/quickstart/final", "onnx", with_cache=True)     # -> runs/quickstart/final-onnx/
    export("runs/quickstart/final", "gguf", dtype="q8_0")        # -> runs/quickstart/final-q8_0.gguf
    export("runs/quickstart/final", "gguf", dtype="q4_k_m")      # llama.cpp's own quantizer
    export("runs/quickstart/final", "ollama")                    # -> runs/quickstart/final-ollama/

Each format lives in its own module (onnx.py, gguf.py, ollama.py), imported when it is asked for (so
that `lmforge --help` does not import torch); targets.py holds the formats, weight types and output
checks they share. onnx_runner.py generates greedily from an ONNX export with onnxruntime alone.
See docs/export.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.export.targets import FORMATS, GGUF_DTYPES, QUANT_TYPES, check_out_path, default_out
from lmforge.outputs import check_output
from lmforge.utils import UserError


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
    force: bool = False,
) -> Path:
    """Export `checkpoint` (an HF model directory) to `fmt` (onnx, gguf or ollama); returns the path.

    dtype: GGUF/Ollama weight type (f32, f16, bf16, q8_0, or llama.cpp's q4_0 ... q6_k, q4_k_m: see
    QUANT_TYPES; default f16); ONNX is fp32 only.
    calibration: GGUF/Ollama with a llama.cpp type: a text file whose importance matrix guides it.
    with_cache: ONNX: also write the decoder-step model with past/present key-value tensors.
    opset: ONNX opset (>= 17, default 18). check: ONNX: compare onnxruntime with PyTorch first.
    force: write over an `out` that holds something other than this format's export (an earlier
    export of the same format is replaced without it).
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
    # Imported here, like the format modules below: importing the package (and so lmforge.export.targets,
    # where the CLI reads its choices) must not import torch.
    from lmforge.checkpoint import read_config

    if read_config(checkpoint).extra.get(
        "quantization_config"
    ):  # a missing or broken checkpoint fails here too
        raise UserError(
            f"{checkpoint} is an lmforge-quantized checkpoint; export the float checkpoint it came "
            "from (GGUF has its own quantization: --dtype q8_0 or q4_k_m)"
        )
    out = Path(out) if out is not None else default_out(checkpoint, fmt, dtype)
    check_output(out, fmt, force=force, inputs=(checkpoint, calibration), same_kind_ok=True)
    if fmt == "onnx":
        from lmforge.export.onnx import DEFAULT_OPSET, export_onnx

        return export_onnx(checkpoint, out, with_cache=with_cache, opset=opset or DEFAULT_OPSET, check=check)
    if fmt == "gguf":
        from lmforge.export.gguf import export_gguf

        return export_gguf(checkpoint, out, dtype=dtype, calibration=calibration)
    from lmforge.export.ollama import export_ollama

    return export_ollama(checkpoint, out, dtype=dtype, calibration=calibration)


__all__ = ["FORMATS", "GGUF_DTYPES", "QUANT_TYPES", "check_out_path", "default_out", "export"]
