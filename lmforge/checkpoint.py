"""Checkpoints are Hugging Face model directories.

config.json (the family's HF schema), model.safetensors (HF tensor names), generation_config.json,
and the tokenizer files when there is a tokenizer. Loading accepts any local HF directory of the
families lmforge reads: single or sharded safetensors, or pytorch_model.bin read with weights_only=True.

Tensor names and transforms (fused projections, Conv1D weights, stacked experts) come from lmforge/hf.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.config import ModelConfig, switches
from lmforge.hf import (
    IGNORED_SUFFIXES,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    layout,
    name_aliases,
    to_hf_state_dict,
)
from lmforge.utils import UserError, atomic_dir, dir_size, human_bytes, human_count

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_IGNORED_SUFFIXES = IGNORED_SUFFIXES
_layout = layout  # the HF layout moved to lmforge/hf.py; this name stays for older callers


# ---------------------------------------------------------------------------------------------- reading
class _TensorFiles:
    """All tensors of an HF directory, read lazily by name, with errors that name the file."""

    def __init__(self, path: Path):
        self.path, self.where, self.handles, self.loaded = path, {}, {}, {}
        self.stored: dict[str, str] = {}  # canonical HF name -> the name in the file, where they differ
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if single.exists():
            self._open(single)
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
            for f in sorted(set(weight_map.values())):
                self._open(path / f)
        elif (path / "pytorch_model.bin").exists():
            f = path / "pytorch_model.bin"
            try:  # weights_only: never unpickle arbitrary objects from a file someone gave us
                self.loaded = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError(f"{f}: cannot be read as PyTorch weights ({e})") from None
            self.where = {k: f for k in self.loaded}
        else:
            raise UserError(
                f"{path}: no model weights found (expected model.safetensors, "
                "model.safetensors.index.json or pytorch_model.bin)"
            )

    def _open(self, f: Path) -> None:
        if not f.exists():
            raise UserError(f"{f}: file listed in the safetensors index is missing")
        try:
            h = safe_open(str(f), framework="pt")
            names = list(h.keys())
        except (SafetensorError, OSError) as e:
            raise UserError(
                f"{f}: corrupt or truncated safetensors file ({e}); re-save or re-download it"
            ) from None
        self.handles[f] = h
        self.where.update((k, f) for k in names)

    def names(self) -> set[str]:
        return set(self.where)

    def alias(self, cfg: ModelConfig) -> None:
        """Read tensors stored under another spelling of their HF name (hf.name_aliases: GPT-2 as the
        hub ships it) under the canonical name."""
        for _, theirs, _ in layout(cfg):
            for n in theirs:
                for alt in name_aliases(cfg, n) if n not in self.where else ():
                    if alt in self.where:
                        self.where[n] = self.where.pop(alt)
                        self.stored[n] = alt
                        if alt in self.loaded:
                            self.loaded[n] = self.loaded.pop(alt)

    def get(self, name: str):
        if name in self.loaded:
            return self.loaded[name]
        f = self.where.get(name)
        if f is None:
            return None
        try:
            return self.handles[f].get_tensor(self.stored.get(name, name))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise UserError(
                f"{f}: tensor {name} cannot be read, the file is corrupt or truncated ({e})"
            ) from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise UserError(f"{path}: a checkpoint is a directory (with config.json and model.safetensors)")
    f = path / "config.json"
    if not f.exists():
        raise UserError(f"{f}: missing; a checkpoint directory needs config.json")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    try:
        return config_from_hf(d)
    except (ValueError, KeyError) as e:
        raise UserError(f"{f}: {e}") from None


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint directory into a Transformer (weights as stored, or cast to dtype)."""
    from lmforge.model import build

    path = Path(path)
    cfg = read_config(path)
    files = _TensorFiles(path)
    files.alias(cfg)
    qcfg = cfg.extra.get("quantization_config")
    if qcfg:
        from lmforge.compress.formats import import_tensors, is_ecosystem

        if is_ecosystem(qcfg):  # GPTQ / AWQ / compressed-tensors: as lmforge's own format, or float
            cfg, files = import_tensors(path, cfg, files)
    if cfg.extra.get("quantization_config"):  # integer weights + scales (lmforge quantize)
        from lmforge.compress.qlinear import load_quantized

        return load_quantized(path, cfg, files, device, dtype)
    model = build(cfg, meta=True)
    expected = {k: tuple(v.shape) for k, v in to_hf_state_dict(model).items()}  # HF names and shapes

    def get(name):
        t = files.get(name)
        if t is not None and tuple(t.shape) != expected[name]:
            raise UserError(
                f"{files.where[name]}: tensor {name} has shape {tuple(t.shape)} but config.json "
                f"implies {expected[name]}"
            )
        return t

    sd = from_hf_state_dict(cfg, get, str(path))
    unexpected = sorted(
        n
        for n in files.names() - set(expected)
        if not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight")
    )
    if unexpected:
        raise UserError(
            f"{path}: tensors not used by a {cfg.family} model as configured: "
            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''} "
            "(config.json and weights disagree; loading would silently drop them)"
        )
    dtype = dtype or next(iter(sd.values())).dtype
    model.materialize(device, init=False)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    return model.to(dtype)


def save_model(
    model,
    path: str | os.PathLike,
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
    format: str = "lmforge",
) -> Path:
    """Write an HF model directory atomically (the directory appears complete or not at all).
    format: how a quantized model's layers are stored: lmforge's own, or gptq / awq / compressed-tensors
    (lmforge/compress/formats.py)."""
    path = Path(path)
    cfg = model.config
    hf = config_to_hf(cfg)
    if cfg.extra.get("quantization_config") and format != "lmforge":
        from lmforge.compress.formats import export_tensors

        state, hf["quantization_config"] = export_tensors(model, format)
        dtype = model.tok_emb.weight.dtype
    elif cfg.extra.get("quantization_config"):  # quantized layers write their integer weights + scales
        from lmforge.compress.qlinear import quantized_state_dict

        state, dtype = quantized_state_dict(model)
    else:
        state = to_hf_state_dict(model)
        dtype = next(iter(state.values())).dtype
    hf |= {"torch_dtype": DTYPE_NAMES.get(dtype, "float32"), "transformers_version": "4.46.0"}
    gen = {
        k: v
        for k, v in (
            ("bos_token_id", cfg.bos_token_id),
            ("eos_token_id", cfg.extra.get("eos_token_id", cfg.eos_token_id)),  # a list stays a list
            ("pad_token_id", cfg.pad_token_id),
        )
        if v is not None
    }
    with atomic_dir(path) as tmp:
        save_file(
            {k: v.cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def save_state_dict(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | os.PathLike, tokenizer=None
) -> Path:
    """save_model for callers that hold tensors (our names), not a model: a gathered training state.
    The tensors are assigned to a model built on the meta device (no copy, no initialisation)."""
    from lmforge.model import build

    model = build(config, meta=True)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return save_model(model, path, tokenizer=tokenizer)


def describe(path: str | os.PathLike) -> dict:
    """What `lmforge info` prints: family, parameters, size, dtype, context, config."""
    path = Path(path)
    cfg = read_config(path)
    files = _TensorFiles(path)
    dtypes = sorted({str(files.get(n).dtype).replace("torch.", "") for n in list(files.names())[:50]})
    return {
        "path": str(path),
        "family": f"{cfg.family} (HF model_type {config_to_hf(cfg)['model_type']})",
        "architecture": switches(cfg),
        "parameters": f"{human_count(cfg.n_params())} ({cfg.n_params():,})",
        "size_on_disk": human_bytes(dir_size(path)),
        "dtype": ", ".join(dtypes),
        "context_length": cfg.max_seq_len,
        "kv_cache_per_token": human_bytes(cfg.kv_cache_bytes_per_token(2)) + " (bf16)",
        "tokenizer": "yes" if (path / "tokenizer.json").exists() else "no",
        "config": {k: v for k, v in cfg.to_dict().items() if v not in (None, {}, [])},
    }
