"""PEFT LoRA adapters: lmforge's adapters written as peft writes them, and peft's read back fused.

On disk (what peft, vLLM, TGI/LoRAX and transformers' `load_adapter` read):

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules" (HF names), ...}
    adapter_model.safetensors  base_model.model.<HF module>.lora_A.weight (r, in), .lora_B.weight (out, r)

Names come from the one HF mapping (`hf.layout`: our tensor, its HF tensors, how). Our fused projections
map exactly: the one A of `wqkv` is the A of each of q_proj, k_proj and v_proj, and its B
(q_dim + 2 kv_dim, r) splits by rows into theirs (`w_in` into gate_proj / up_proj likewise); a fused HF
module (GPT-2's c_attn, Phi-3's qkv_proj) takes A and B as they are. GPT-2's Conv1D stores its weight
(in, out), so the config says fan_in_fan_out; the LoRA factors are the same as a Linear's. The
safetensors header records which HF modules share one A (`lmforge.fused`); reading does not need it:

    q/k/v with one A (and one scale)  -> one A, B = their B rows stacked: exactly the fused adapter
    q/k/v with their own A (peft's)   -> A = their A stacked (rank r_q + r_k + r_v), B block-diagonal
    a projection not targeted         -> zero rows of B (its part of the update is 0)

Scales are PEFT's: alpha / r, or alpha / sqrt(r) with use_rslora, per module with rank_pattern /
alpha_pattern. `modules_to_save` (full copies of embeddings or head) and trained biases (bias="all")
replace base tensors. Adapters in lmforge's earlier format (tensors named like our parameters, format
"lmforge-lora") are converted on read.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.utils import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OLD_FORMAT = "lmforge-lora"
PREFIX = "base_model.model."


def _layout(cfg):
    from lmforge.hf import layout  # the one HF mapping

    return layout(cfg)


@dataclass
class HFParam:
    """Where one HF tensor lives in ours: rows [start, start + size) of `ours`, transposed if `T`."""

    ours: str
    how: str
    start: int
    size: int | None


def hf_params(cfg) -> dict[str, HFParam]:
    """HF tensor name -> its place in our parameters, for every weight and bias that maps row-wise."""
    out: dict[str, HFParam] = {}
    for ours, theirs, how in _layout(cfg):
        if how in ("same", "T"):
            out[theirs[0]] = HFParam(ours, how, 0, None)
        elif how == "cat":
            from lmforge.hf import cat_sizes  # rows [q; k; v] of wqkv, [gate; up] of w_in

            start = 0
            for name, n in zip(theirs, cat_sizes(cfg, theirs)):
                out[name] = HFParam(ours, how, start, n)
                start += n
    return out


def hf_modules(cfg) -> dict[str, list[tuple[str, int, int | None]]]:
    """Our linear module (blocks.0.attn.wqkv) -> [(HF module, first row, rows)], 2-D weights only."""
    out: dict[str, list] = {}
    for name, p in hf_params(cfg).items():
        if name.endswith(".weight") and p.ours.endswith(".weight") and not p.ours.startswith("tok_emb"):
            if "norm" in p.ours or p.ours.startswith("pos_emb"):
                continue
            out.setdefault(p.ours[: -len(".weight")], []).append((name[: -len(".weight")], p.start, p.size))
    return out


# ---------------------------------------------------------------------------------------------- writing
def _scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _alpha(scale: float, rank: int, rslora: bool) -> float:
    a = scale * (math.sqrt(rank) if rslora else rank)
    return int(round(a)) if abs(a - round(a)) < 1e-9 else a


def write_peft(directory: Path, tensors: dict, lora_config: dict, base: str | None, model_config) -> None:
    """adapter_model.safetensors + adapter_config.json for our adapter tensors (blocks.0.attn.wqkv.lora_A,
    ...) in `directory`. lora_config: rank, alpha, dropout, targets [, use_rslora, scales {module: s}]."""
    if model_config is None:
        raise ValueError("write_peft needs the base model's config (for the HF module names)")
    rslora = bool(lora_config.get("use_rslora", False))
    scales = lora_config.get("scales") or {}
    mods = hf_modules(model_config)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fused: dict[str, list[str]] = {}
    transposed = False
    for name in sorted({k.rsplit(".lora_", 1)[0] for k in tensors}):
        A, B = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        if name not in mods:
            raise UserError(
                f"LoRA on {name}: the module has no Hugging Face name; it cannot be written for peft"
            )
        r = A.shape[0]
        s = scales.get(name, _scale(lora_config["alpha"], r, rslora))
        pieces = mods[name]
        if len(pieces) > 1:
            fused[name] = [m for m, _, _ in pieces]
        for m, start, size in pieces:
            b = B if size is None else B[start : start + size]
            out[f"{PREFIX}{m}.lora_A.weight"] = A.clone()  # each its own copy: peft expects one per module
            out[f"{PREFIX}{m}.lora_B.weight"] = b.contiguous()
            ranks[m], alphas[m] = r, _alpha(s, r, rslora)
        transposed |= _how(model_config, name) == "T"
    r0 = Counter(ranks.values()).most_common(1)[0][0] if ranks else int(lora_config.get("rank", 8))
    a0 = Counter(alphas.values()).most_common(1)[0][0] if alphas else lora_config.get("alpha", 8)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base).resolve()) if base else None,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": float(lora_config.get("dropout", 0.0)),
        "target_modules": _target_modules(model_config, set(ranks)),
        "bias": "none",
        "fan_in_fan_out": transposed,
        "use_rslora": rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        # peft matches these keys as regexes against module names: escape ours to match exactly one
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != a0},
    }
    meta = {"format": "pt", "lmforge.fused": json.dumps(fused)}
    save_file(out, str(directory / ADAPTER_WEIGHTS), metadata=meta)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


def _how(model_config, module: str) -> str:
    for ours, _theirs, how in _layout(model_config):
        if ours == f"{module}.weight":
            return how
    return "same"


def _target_modules(model_config, adapted: set[str]) -> list[str]:
    """Leaf names (q_proj) where every module of that leaf name is adapted, else the full names:
    GPT-2 has c_proj in attention and MLP, and targeting one must not target the other."""
    every: dict[str, list[str]] = {}
    for pieces in hf_modules(model_config).values():
        for m, _, _ in pieces:
            every.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    names: list[str] = []
    for leaf, ms in sorted(every.items()):
        hit = [m for m in ms if m in adapted]
        if hit and len(hit) == len(ms):
            names.append(leaf)
        else:
            names += hit
    return names


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Adapter:
    """An adapter in our terms: per linear module (A (r, in), B (out, r), scale), and base tensors to
    replace (our parameter -> [(first row or None for all, tensor)])."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    replace: dict[str, list[tuple[int | None, torch.Tensor]]] = field(default_factory=dict)
    dropout: float = 0.0
    config: dict = field(default_factory=dict)


def read_config(path) -> dict:
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise UserError(f"{path}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f}: expected a JSON object")
    if cfg.get("format") == OLD_FORMAT:
        return cfg
    if "format" in cfg and "peft_type" not in cfg:
        raise UserError(f"{f}: format {cfg.get('format')!r} is neither a PEFT adapter nor {OLD_FORMAT!r}")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise UserError(
            f"{f}: PEFT type {cfg.get('peft_type')!r} is not supported; lmforge reads LoRA adapters "
            "(peft_type LORA)"
        )
    unsupported = [
        ("use_dora", "DoRA (use_dora)"),
        ("lora_bias", "LoRA with a bias on B (lora_bias)"),
        ("target_parameters", "LoRA on parameters (target_parameters)"),
        ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
        ("trainable_token_indices", "trainable tokens (trainable_token_indices)"),
        ("layer_replication", "layer replication"),
        ("use_qalora", "QA-LoRA (use_qalora)"),
    ]
    for key, what in unsupported:
        if cfg.get(key):
            raise UserError(f"{f}: {what} is not supported; lmforge reads plain LoRA adapters")
    return cfg


def base_of(cfg: dict) -> str | None:
    """The base checkpoint an adapter names (PEFT's base_model_name_or_path, or the old base_model)."""
    return cfg.get("base_model_name_or_path") if cfg.get("format") != OLD_FORMAT else cfg.get("base_model")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    f = path / ADAPTER_WEIGHTS
    try:
        if f.is_file():
            with safe_open(str(f), framework="pt") as h:
                return {k: h.get_tensor(k) for k in h.keys()}
        b = path / "adapter_model.bin"  # older peft; weights_only: never unpickle objects
        if b.is_file():
            return torch.load(b, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"{f}: cannot be read, the file is corrupt or truncated ({e})") from None
    raise UserError(f"{path}: missing {ADAPTER_WEIGHTS}")


_LORA = re.compile(r"^(?:base_model\.model\.)?(.+?)\.lora_([AB])(?:\.default)?\.weight$")


def _pattern(patterns: dict, module: str):
    for key, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return v
    return None


def read_adapter(path, model_config) -> Adapter:
    """The adapter at `path` (PEFT or lmforge's old format) in our module names, for a base of
    `model_config`."""
    path = Path(path)
    cfg = read_config(path)
    tensors = _tensors(path)
    if cfg.get("format") == OLD_FORMAT:
        return _read_old(path, cfg, tensors)
    params, mods = hf_params(model_config), hf_modules(model_config)
    where = {m: (ours, start, size) for ours, ps in mods.items() for m, start, size in ps}
    rslora, alpha = bool(cfg.get("use_rslora")), cfg.get("lora_alpha", 8)
    pieces: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # HF module -> {"A": .., "B": ..}
    replace: dict[str, list] = {}
    for key, t in tensors.items():
        m = _LORA.match(key)
        if m:
            pieces.setdefault(m.group(1), {})[m.group(2)] = t.float()
            continue
        if "lora_embedding_" in key or "lora_magnitude" in key:
            kind = "LoRA on an embedding" if "embedding" in key else "DoRA"
            raise UserError(f"{path}: {key}: {kind} is not supported (target linear layers instead)")
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        name = name.replace(".modules_to_save.default", "")
        p = params.get(name)
        if p is None:
            raise UserError(
                f"{path}: tensor {key} replaces {name}, which a {model_config.family} model does not have"
            )
        t = t.t() if p.how == "T" else t
        replace.setdefault(p.ours, []).append((p.start if p.size is not None else None, t))
    grouped: dict[str, dict[str, tuple]] = {}
    for hf, ab in pieces.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{path}: {hf} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        if hf not in where:
            raise UserError(
                f"{path}: the adapter targets {hf}, which is not a linear layer lmforge can adapt in a "
                f"{model_config.family} model (it adapts {', '.join(sorted(where)[:4])}, ...)"
            )
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{path}: {hf}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not pair")
        r = A.shape[0]
        a = _pattern(cfg.get("alpha_pattern"), hf)
        s = _scale(a if a is not None else alpha, r, rslora)
        ours = where[hf][0]
        grouped.setdefault(ours, {})[hf] = (A, B, s)
    modules = {ours: _fuse(path, mods[ours], got) for ours, got in grouped.items()}
    return Adapter(modules, replace, float(cfg.get("lora_dropout", 0.0) or 0.0), cfg)


def _fuse(path, layout: list, got: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One (A, B, scale) for our fused module from the HF modules' LoRA factors (some may be absent)."""
    if len(layout) == 1:
        return got[layout[0][0]]
    present = [got[m] for m, _, _ in layout if m in got]
    A0, _, s0 = present[0]
    for m, _start, size in layout:
        if m in got and got[m][1].shape[0] != size:
            raise UserError(f"{path}: {m}.lora_B has {got[m][1].shape[0]} rows, the base model {size}")
    rows = sum(size for _, _, size in layout)
    if all(torch.equal(A, A0) and s == s0 for A, _, s in present):  # one shared A: rank r, exactly ours
        B = torch.zeros(rows, A0.shape[0])
        for m, start, size in layout:
            if m in got:
                B[start : start + size] = got[m][1]
        return A0, B, s0
    # their own A each: stack the As (rank grows to the sum), B block-diagonal; a common scale stays,
    # different scales are folded into B
    same = all(s == s0 for _, _, s in present)
    R = sum(A.shape[0] for A, _, _ in present)
    A = torch.cat([a for a, _, _ in present])
    B = torch.zeros(rows, R)
    col = 0
    for m, start, size in layout:
        if m in got:
            a, b, s = got[m]
            B[start : start + size, col : col + a.shape[0]] = b if same else b * s
            col += a.shape[0]
    return A, B, s0 if same else 1.0


def _read_old(path: Path, cfg: dict, tensors: dict) -> Adapter:
    """lmforge's earlier format: tensors named like our parameters, one rank and alpha."""
    rank, alpha = cfg.get("rank"), cfg.get("alpha")
    if not isinstance(rank, int) or rank <= 0 or alpha is None:
        raise UserError(f"{path / ADAPTER_CONFIG}: needs a positive integer rank and an alpha")
    modules = {}
    for name in sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}):
        A, B = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if A is None or B is None:
            raise UserError(f"{path}: {name} lacks lora_A or lora_B")
        modules[name] = (A.float(), B.float(), alpha / rank)
    return Adapter(modules, {}, float(cfg.get("dropout", 0.0)), cfg)
