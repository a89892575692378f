"""What `lmforge export` does and prints: a model export, or a LoRA adapter's (GGUF / Ollama)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lmforge.export import FORMATS, GGUF_DTYPES, default_out, export
from lmforge.train.lora import is_adapter
from lmforge.utils import UserError, dir_size, human_bytes


def export_and_print(
    checkpoint: str,
    *,
    format: Literal[FORMATS],
    out: str | None = None,
    dtype: Literal[GGUF_DTYPES] | None = None,
    with_cache: bool = False,
    opset: int | None = None,
    base: str | None = None,
    check: bool = True,
    force: bool = False,
) -> Path:
    """Export a checkpoint (or a LoRA adapter directory) and print what was written.

    Args:
        checkpoint: an lmforge or Hugging Face model directory, or a LoRA adapter directory
        format: what to write
        out: output path (default: next to the checkpoint: <ckpt>-onnx/, <ckpt>-<dtype>.gguf, <ckpt>-ollama/)
        dtype: GGUF/Ollama weight type (default f16; norms and biases stay f32): f32, f16, bf16, q8_0, or
            llama.cpp's own quantizer types q4_0 ... q6_k (q4_k_m is Ollama's default; k-quants want
            widths that are multiples of 256, else llama.cpp falls back to 32-blocks); ONNX is always f32
        with_cache: ONNX: also export model_with_past.onnx, a decoder step with past_key_values.N.key/value
            inputs and present.N.key/value outputs
        opset: ONNX opset version (>= 17, default 18)
        base: LoRA adapter exports (CHECKPOINT is an adapter directory, PEFT or lmforge): the base model
            directory (default: the one the adapter names); gguf writes a llama.cpp LoRA adapter (f32
            unless --dtype f16/bf16), ollama the base GGUF + adapter GGUF + a Modelfile with ADAPTER
        check: compare onnxruntime's logits with PyTorch's (ONNX)
        force: write over an --out that holds something else (a model, a data preparation, ...); an
            earlier export of the same format is replaced without it
    """
    if is_adapter(checkpoint):  # a LoRA adapter: llama.cpp's adapter GGUF (gguf_lora.py)
        return _export_lora(checkpoint, format, out, dtype, base, force)
    if base is not None:
        raise UserError(f"--base is for LoRA adapter exports; {checkpoint} is not an adapter directory")
    path = export(
        checkpoint, format, out, dtype=dtype, with_cache=with_cache, opset=opset, check=check, force=force
    )
    print(f"wrote {path} ({human_bytes(dir_size(path))})")
    if format == "onnx" and check:
        from lmforge.export.onnx import MANIFEST

        errors = json.loads((path / MANIFEST).read_text())["check"]["max_relative_logit_error"]
        print(
            "checked in onnxruntime: " + ", ".join(f"{k} max logit error {v:.1e}" for k, v in errors.items())
        )
    elif format == "ollama":
        print(f"next: ollama create {path.name} -f {path / 'Modelfile'}")
    return path


def _export_lora(
    adapter: str, format: str, out: str | None, dtype: str | None, base: str | None, force: bool = False
) -> Path:
    from lmforge.export.gguf_lora import export_lora_gguf, export_ollama_lora
    from lmforge.outputs import check_output

    if format == "onnx":
        raise UserError(
            f"{adapter} is a LoRA adapter; merge it first (lmforge merge-lora {adapter} --out merged) and "
            "export the merged model to ONNX"
        )
    if format == "gguf":
        dtype = dtype or "f32"
        out = out or default_out(adapter, "gguf", dtype)
        check_output(out, "gguf", force=force, inputs=(adapter, base), same_kind_ok=True)
        path = export_lora_gguf(adapter, out, dtype, base)
        print(f"wrote {path} ({human_bytes(dir_size(path))}); use: llama-cli -m BASE.gguf --lora {path}")
        return path
    out = out or default_out(adapter, "ollama")
    check_output(out, "ollama", force=force, inputs=(adapter, base), same_kind_ok=True)
    path = export_ollama_lora(adapter, out, dtype or "f16", base)
    print(f"wrote {path} ({human_bytes(dir_size(path))})")
    print(f"next: ollama create {path.name} -f {path / 'Modelfile'}")
    return path
