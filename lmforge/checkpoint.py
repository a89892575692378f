"""Checkpoints are Hugging Face model directories.

config.json (the family's HF schema), model.safetensors (HF tensor names), generation_config.json,
and the tokenizer files when there is a tokenizer. Loading accepts any local HF directory of the six
families: single or sharded safetensors, or pytorch_model.bin read with weights_only=True.

Our parameters differ from HF's in three ways, all handled by `_layout`:
  fused projections (wqkv = [q; k; v], w_in = [gate; up]), GPT-style Conv1D weights stored (in, out),
  and Mixtral experts stacked as (E, ...) tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.config import ModelConfig
from lmforge.utils import UserError, atomic_dir, dir_size, human_bytes, human_count

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Buffers some HF checkpoints carry that are not weights (GPT-2's causal mask, RoPE caches).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _layout(cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, HF names, how) for every tensor. how: same | T (transpose) | cat (stack rows) |
    experts_in / experts_out (per-expert HF tensors stacked into one (E, ...) parameter)."""
    rows: list[tuple[str, list[str], str]] = []
    L = cfg.n_layers
    if cfg.family in ("gpt", "gpt2"):
        p = "transformer."
        emb, pos = ("tokens_embed", "positions_embed") if cfg.family == "gpt" else ("wte", "wpe")
        rows += [
            ("tok_emb.weight", [p + emb + ".weight"], "same"),
            ("pos_emb.weight", [p + pos + ".weight"], "same"),
        ]
        for i in range(L):
            h, b = f"{p}h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                rows += [(f"{b}{ours}.{w}", [f"{h}{theirs}.{w}"], "same") for w in ("weight", "bias")]
            for ours, theirs in (
                ("attn.wqkv", "attn.c_attn"),
                ("attn.wo", "attn.c_proj"),
                ("mlp.w_in", "mlp.c_fc"),
                ("mlp.w_out", "mlp.c_proj"),
            ):
                rows += [
                    (f"{b}{ours}.weight", [f"{h}{theirs}.weight"], "T"),
                    (f"{b}{ours}.bias", [f"{h}{theirs}.bias"], "same"),
                ]
        if cfg.final_norm:
            rows += [(f"norm.{w}", [f"{p}ln_f.{w}"], "same") for w in ("weight", "bias")]
    else:
        for i in range(L):
            h, b = f"model.layers.{i}.", f"blocks.{i}."
            rows += [
                (f"{b}attn_norm.weight", [f"{h}input_layernorm.weight"], "same"),
                (f"{b}mlp_norm.weight", [f"{h}post_attention_layernorm.weight"], "same"),
            ]
            a = f"{h}self_attn."
            for w in ("weight", "bias") if cfg.attn_bias else ("weight",):
                rows += [
                    (f"{b}attn.wqkv.{w}", [f"{a}q_proj.{w}", f"{a}k_proj.{w}", f"{a}v_proj.{w}"], "cat"),
                    (f"{b}attn.wo.{w}", [f"{a}o_proj.{w}"], "same"),
                ]
            if cfg.n_experts:
                m = f"{h}block_sparse_moe."
                rows += [
                    (f"{b}mlp.router.weight", [f"{m}gate.weight"], "same"),
                    (
                        f"{b}mlp.w_in",
                        [f"{m}experts.{e}.{w}.weight" for e in range(cfg.n_experts) for w in ("w1", "w3")],
                        "experts_in",
                    ),
                    (
                        f"{b}mlp.w_out",
                        [f"{m}experts.{e}.w2.weight" for e in range(cfg.n_experts)],
                        "experts_out",
                    ),
                ]
            else:
                m = f"{h}mlp."
                for w in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                    rows += [
                        (f"{b}mlp.w_in.{w}", [f"{m}gate_proj.{w}", f"{m}up_proj.{w}"], "cat"),
                        (f"{b}mlp.w_out.{w}", [f"{m}down_proj.{w}"], "same"),
                    ]
        rows += [
            ("tok_emb.weight", ["model.embed_tokens.weight"], "same"),
            ("norm.weight", ["model.norm.weight"], "same"),
        ]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], "same"))
    return rows


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameters under HF names and layouts (contiguous, ready for safetensors)."""
    cfg, sd = model.config, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in _layout(cfg):
        t = sd[ours].detach()
        if how == "same":
            out[theirs[0]] = t
        elif how == "T":
            out[theirs[0]] = t.t()
        elif how == "cat":
            sizes = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim] if len(theirs) == 3 else [cfg.d_ff, cfg.d_ff]
            out.update(zip(theirs, t.split(sizes, dim=0)))
        elif how == "experts_in":  # (E, 2 ff, d) -> w1 (gate), w3 (up) per expert
            for e in range(cfg.n_experts):
                out[theirs[2 * e]], out[theirs[2 * e + 1]] = t[e].split([cfg.d_ff, cfg.d_ff], dim=0)
        elif how == "experts_out":
            out.update((theirs[e], t[e]) for e in range(cfg.n_experts))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, get, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors; get(name) returns a tensor or None when absent."""
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, theirs, how in _layout(cfg):
        ts = [get(n) for n in theirs]
        gone = [n for n, t in zip(theirs, ts) if t is None]
        if gone:
            missing += gone
            continue
        if how == "same":
            out[ours] = ts[0]
        elif how == "T":
            out[ours] = ts[0].t()
        elif how == "cat":
            out[ours] = torch.cat(ts, dim=0)
        elif how == "experts_in":
            out[ours] = torch.stack([torch.cat(ts[2 * e : 2 * e + 2], 0) for e in range(cfg.n_experts)])
        elif how == "experts_out":
            out[ours] = torch.stack(ts)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}; "
            "the weights do not match config.json"
        )
    return out


# ---------------------------------------------------------------------------------------------- reading
class _TensorFiles:
    """All tensors of an HF directory, read lazily by name, with errors that name the file."""

    def __init__(self, path: Path):
        self.path, self.where, self.handles, self.loaded = path, {}, {}, {}
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

    def get(self, name: str):
        if name in self.loaded:
            return self.loaded[name]
        f = self.where.get(name)
        if f is None:
            return None
        try:
            return self.handles[f].get_tensor(name)
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
        return ModelConfig.from_hf(d)
    except (ValueError, KeyError) as e:
        raise UserError(f"{f}: {e}") from None


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint directory into a Transformer (weights as stored, or cast to dtype)."""
    from lmforge.model import build

    path = Path(path)
    cfg = read_config(path)
    files = _TensorFiles(path)
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
    model, path: str | os.PathLike, tokenizer=None, extra_files: dict[str, str] | None = None
) -> Path:
    """Write an HF model directory atomically (the directory appears complete or not at all)."""
    path = Path(path)
    cfg = model.config
    if cfg.extra.get("quantization_config"):  # quantized layers write their integer weights + scales
        from lmforge.compress.qlinear import quantized_state_dict

        state, dtype = quantized_state_dict(model)
    else:
        state = to_hf_state_dict(model)
        dtype = next(iter(state.values())).dtype
    hf = cfg.to_hf() | {"torch_dtype": DTYPE_NAMES.get(dtype, "float32"), "transformers_version": "4.46.0"}
    gen = {
        k: v
        for k, v in (
            ("bos_token_id", cfg.bos_token_id),
            ("eos_token_id", cfg.eos_token_id),
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


def describe(path: str | os.PathLike) -> dict:
    """What `lmforge info` prints: family, parameters, size, dtype, context, config."""
    path = Path(path)
    cfg = read_config(path)
    files = _TensorFiles(path)
    dtypes = sorted({str(files.get(n).dtype).replace("torch.", "") for n in list(files.names())[:50]})
    return {
        "path": str(path),
        "family": f"{cfg.family} (HF model_type {cfg.to_hf()['model_type']})",
        "parameters": f"{human_count(cfg.n_params())} ({cfg.n_params():,})",
        "size_on_disk": human_bytes(dir_size(path)),
        "dtype": ", ".join(dtypes),
        "context_length": cfg.max_seq_len,
        "kv_cache_per_token": human_bytes(cfg.kv_cache_bytes_per_token(2)) + " (bf16)",
        "tokenizer": "yes" if (path / "tokenizer.json").exists() else "no",
        "config": {k: v for k, v in cfg.to_dict().items() if v not in (None, {}, [])},
    }
