"""LoRA adapters as llama.cpp (and Ollama) read them: a GGUF file of `.lora_a` / `.lora_b` tensors.

    lmforge export runs/sft-lora/final --format gguf --out sft.gguf       # an adapter (PEFT or lmforge)
    llama-cli -m base.gguf --lora sft.gguf                                 # llama.cpp: base + adapter
    lmforge export runs/sft-lora/final --format ollama --out sft-ollama    # base GGUF + adapter + Modelfile

The file is what llama.cpp's convert_lora_to_gguf.py writes: `general.type` adapter, `general.
architecture` the base's, `adapter.type` lora, `adapter.lora.alpha`, and for every adapted weight
`<its GGUF name>.lora_a` (r, in) and `.lora_b` (out, r) (numpy shapes; ggml's ne reversed). llama.cpp
computes W x + (alpha / r) B A x with r the rank of each lora_b, as PEFT does.

The adapter is read into our fused modules (peft_format.read_adapter) and split per HF module by the
one HF mapping; GGUF names come from gguf.py's (gguf_name), and B's rows get the same relabelling as
the base weights' (llama's Q/K rows permuted for llama.cpp's RoPE; GPT-2's fused qkv kept whole). Where
llama.cpp's alpha / r is not the adapter's scale (rslora, per-module alpha, or scales folded while
stacking separate q/k/v adapters), the difference is folded into lora_b. Columns of B that are zero
(stacked q/k/v adapters split back per projection) are dropped with their rows of A: exact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from lmforge.export.targets import check_out_path
from lmforge.utils import UserError, atomic_dir

DTYPES = ("f32", "f16", "bf16")  # the factors are small; llama.cpp's converter writes f32 by default


def _base_config(adapter, base):
    from lmforge.checkpoint import read_config
    from lmforge.train.lora import _base_of

    base = _base_of(adapter, base)
    return base, read_config(base)


def lora_tensors(adapter, cfg) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """(alpha, [(GGUF tensor name, fp32 tensor)]) for the adapter directory `adapter` on a `cfg` base."""
    from lmforge.export.gguf import _PERMUTED, GGUF_ARCH, _permute, check_supported, gguf_name
    from lmforge.train.peft_format import hf_modules, read_adapter

    check_supported(cfg)
    arch = GGUF_ARCH[cfg.family]
    ad = read_adapter(adapter, cfg)
    if ad.replace:
        names = ", ".join(sorted(ad.replace))
        raise UserError(
            f"{adapter}: the adapter replaces whole base tensors ({names}: modules_to_save or trained "
            "biases), which a llama.cpp LoRA file cannot hold; merge it (lmforge merge-lora) and export "
            "the merged model instead"
        )
    alpha = float(ad.config.get("lora_alpha", ad.config.get("alpha", 0.0)) or 0.0)
    mods = hf_modules(cfg)
    out: list[tuple[str, torch.Tensor]] = []
    for ours, (A, B, scale) in sorted(ad.modules.items()):
        for hf, start, size in mods[ours]:
            b = B if size is None else B[start : start + size]
            keep = b.abs().sum(0) > 0  # rank columns this projection uses (all, unless stacked)
            if not keep.any():
                continue  # not adapted (a fused projection PEFT only partly targeted)
            a, b = A[keep], b[:, keep]
            name = gguf_name(cfg, f"{hf}.weight")
            if arch in _PERMUTED and re.search(r"\.attn_[qk]\.weight$", name):
                b = _permute(b, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
            r = a.shape[0]
            # llama.cpp applies alpha / r (r from lora_b); fold whatever differs from our scale into B
            if alpha <= 0 or abs(alpha / r - scale) > 1e-12 * max(1.0, scale):
                b = b * (scale * r / alpha) if alpha > 0 else b * scale
            out += [(f"{name}.lora_a", a.contiguous()), (f"{name}.lora_b", b.contiguous())]
    if not out:
        raise UserError(f"{adapter}: the adapter has no LoRA factors to export")
    return alpha, out


def export_lora_gguf(
    adapter, out: str | os.PathLike, dtype: str = "f32", base: str | os.PathLike | None = None
) -> Path:
    """Write the LoRA adapter directory `adapter` (PEFT or lmforge) as a llama.cpp adapter GGUF `out`.
    base: the base checkpoint (default: the one the adapter names), for its architecture and shapes."""
    from lmforge.export.gguf import GGUF_ARCH, _atomic_path, _gguf

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: a LoRA GGUF is written as {', '.join(DTYPES)} (default f32)")
    out = Path(out)
    check_out_path(out)
    base, cfg = _base_config(adapter, base)
    alpha, tensors = lora_tensors(adapter, cfg)
    g = _gguf()
    Q = g.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_path(out) as tmp:
            w = g.GGUFWriter(str(tmp), GGUF_ARCH[cfg.family])
            w.add_type(g.GGUFType.ADAPTER)
            w.add_name(Path(adapter).resolve().name)
            w.add_string(g.Keys.Adapter.TYPE, "lora")
            w.add_float32(g.Keys.Adapter.LORA_ALPHA, alpha)
            for name, t in tensors:
                a = t.numpy().astype(np.float32)
                data = a if dtype == "f32" else g.quants.quantize(a, qtype)
                w.add_tensor(name, data, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise UserError(f"{out}: cannot write the GGUF file ({e.strerror or e})") from e
    return out


def export_ollama_lora(
    adapter, out: str | os.PathLike, dtype: str = "f16", base: str | os.PathLike | None = None
) -> Path:
    """`out/`: the base model as model.gguf (dtype), the adapter as adapter.gguf (f32) and a Modelfile
    with FROM ./model.gguf and ADAPTER ./adapter.gguf. Returns `out`."""
    from lmforge.export.gguf import export_gguf
    from lmforge.export.ollama import modelfile
    from lmforge.lm import load

    out = Path(out)
    check_out_path(out, kind="directory")
    base, cfg = _base_config(adapter, base)
    lm = load(base, device="cpu", dtype=torch.float32)
    with atomic_dir(out) as tmp:
        export_gguf(lm, tmp / "model.gguf", dtype=dtype, name=Path(base).name)
        export_lora_gguf(adapter, tmp / "adapter.gguf", base=base)
        text = modelfile("model.gguf", lm.tokenizer, cfg.max_seq_len)
        (tmp / "Modelfile").write_text(text.replace("\n", "\nADAPTER ./adapter.gguf\n", 1))
    return out


def attach_lora(llm, path: str | os.PathLike, scale: float = 1.0):
    """Load the adapter GGUF `path` onto a running `export.llama_cpp.LlamaCpp` (its model and context)
    through llama.cpp's C API, as `llama-cli --lora` does. The adapter is freed with the model."""
    from lmforge.export.llama_cpp import _log

    ffi, lib = llm.ffi, llm.lib
    del _log[:]
    ad = lib.llama_adapter_lora_init(llm.model, os.fsencode(path))
    if ad == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load the adapter {path}: {''.join(_log).strip()}")
    adapters = ffi.new("struct llama_adapter_lora *[1]", [ad])
    scales = ffi.new("float[1]", [scale])
    if lib.llama_set_adapters_lora(llm.ctx, adapters, 1, scales) != 0:
        raise RuntimeError(f"llama.cpp could not apply the adapter {path}: {''.join(_log).strip()}")
    llm._lora = (ad, adapters, scales)  # keep the cffi objects alive as long as the context
    return ad
