"""LoRA: low-rank adapters on our fused projections, saved as a small adapter directory.

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)      A (r, in), B (out, r), W and b frozen

B starts at zero, so an adapted model starts exactly at its base. Targets are our fused module names:
`wqkv` (q, k and v at once: one A shared by the three, B's rows split q | k | v), `wo`, `w_in` (gate and
up for GLU MLPs) and `w_out`. Mixtral's experts are stacked parameters, not linear layers, and cannot
be targeted; their attention can.

An adapter directory holds `adapter_model.safetensors` (tensors named like our parameters:
`blocks.0.attn.wqkv.lora_A`), `adapter_config.json` (rank, alpha, targets, and the base checkpoint it
was trained on) and the tokenizer files when the run had a tokenizer.

    model = load_lora_model("runs/sft/final")              # base + adapter, unmerged
    merged = merge_lora(model)                             # plain Transformer, W += B A * alpha / r
    merge_lora_dir("runs/sft/final", "merged/")            # what `lmforge merge-lora` does
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.utils import UserError, atomic_dir

TARGETS = ("wqkv", "wo", "w_in", "w_out")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "lmforge-lora"


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen weight (and bias) are the base layer's, plus a trainable low-rank update.

    It keeps the `weight`/`bias` names of the layer it replaces, so the base state dict is unchanged.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        a = F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        return y + F.linear(a, self.lora_B.to(x.dtype)) * self.scale

    def delta(self) -> torch.Tensor:
        """B A * alpha / r: (out, in) in fp32, what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _resolve_targets(targets) -> list[str]:
    ts = list(targets)
    if "all" in ts:
        return list(TARGETS)
    bad = [t for t in ts if t not in TARGETS]
    if bad or not ts:
        raise UserError(f"lora.targets={','.join(ts)}: choose among {', '.join(TARGETS)} (or all)")
    return ts


def apply_lora(
    model: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0, targets=("wqkv", "wo")
) -> nn.Module:
    """Freeze every parameter of `model` and wrap the target linear layers with LoRALinear (in place)."""
    if rank <= 0:
        raise UserError(f"lora.rank={rank}: must be a positive integer")
    targets = _resolve_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise UserError(
            f"lora.targets={','.join(targets)} matched no linear layer of this model "
            "(Mixtral experts are stacked tensors: target wqkv and wo)"
        )
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, named like the model's parameters."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def _strip(name: str) -> str:
    # DDP / torch.compile wrappers add prefixes; adapter names are those of the bare model.
    for pre in ("module.", "_orig_mod."):
        name = name.replace(pre, "")
    return name


def save_adapter(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    lora_config: dict,
    base: str | None,
    model_config=None,
    tokenizer=None,
) -> Path:
    """Write an adapter directory atomically: adapter_model.safetensors + adapter_config.json (+ tokenizer)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_into(tmp, tensors, lora_config, base, model_config, tokenizer)
    return path


def save_into(directory: Path, tensors, lora_config, base, model_config=None, tokenizer=None) -> None:
    """Write the adapter files into an existing directory (a checkpoint being assembled)."""
    t = {_strip(k): v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    save_file(t, str(directory / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
    cfg = {
        "format": FORMAT,
        **lora_config,
        "base_model": str(Path(base).resolve()) if base else None,
        "base_config": model_config.to_hf() if model_config is not None else None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | os.PathLike) -> dict:
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise UserError(f"{path}: not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if cfg.get("format") != FORMAT:
        raise UserError(f"{f}: format {cfg.get('format')!r} is not {FORMAT!r}")
    return cfg


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the adapter tensors of `path` into a model that already has LoRA layers of the same shape."""
    f = Path(path) / ADAPTER_WEIGHTS
    if not f.is_file():
        raise UserError(f"{path}: missing {ADAPTER_WEIGHTS}")
    params = dict(model.named_parameters())
    expected = {n for n in params if ".lora_" in n}
    with safe_open(str(f), framework="pt") as h:
        names = set(h.keys())
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise UserError(
                f"{f}: adapter tensors do not match the model's LoRA layers "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); check rank and targets"
            )
        with torch.no_grad():
            for n in names:
                t = h.get_tensor(n)
                if t.shape != params[n].shape:
                    raise UserError(
                        f"{f}: {n} has shape {tuple(t.shape)}, the model expects "
                        f"{tuple(params[n].shape)} (different rank or base model)"
                    )
                params[n].copy_(t)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the adapter at `path` to a base model (in place) and return it."""
    cfg = read_adapter_config(path)
    apply_lora(model, cfg["rank"], cfg["alpha"], cfg.get("dropout", 0.0), cfg["targets"])
    load_adapter_weights(model, path)
    return model


def _base_of(path, base) -> str:
    cfg = read_adapter_config(path)
    base = base or cfg.get("base_model")
    if not base:
        raise UserError(f"{path}: the adapter does not name its base checkpoint; pass it with --base")
    if not Path(base).is_dir():
        raise UserError(f"{path}: base checkpoint {base} not found; pass the base directory with --base")
    return base


def load_lora_model(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    device="cpu",
    dtype: torch.dtype | None = None,
    merge: bool = False,
):
    """Base checkpoint (named in adapter_config.json, or `base`) + the adapter at `path`.

    Returns a Transformer with LoRA layers (eval mode), or a plain merged one with merge=True.
    """
    from lmforge.checkpoint import load_model

    model = load_model(_base_of(path, base), device=device, dtype=dtype)
    load_adapter(model, path)
    model.eval()
    return merge_lora(model) if merge else model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight (in place) and turn LoRA layers back into nn.Linear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None, device="meta"
                )
                w = child.weight
                lin.weight = nn.Parameter(
                    (w.float() + child.delta().to(w.device)).to(w.dtype), requires_grad=False
                )
                lin.bias = child.bias
                setattr(parent, name, lin)
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merge_lora_dir(
    path: str | os.PathLike,
    out: str | os.PathLike,
    base: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """`lmforge merge-lora`: base + adapter -> a plain HF model directory at `out` (with the tokenizer)."""
    from lmforge.checkpoint import save_model

    base = _base_of(path, base)
    model = load_lora_model(path, base=base, dtype=dtype, merge=True)
    tokenizer = None
    for d in (Path(path), Path(base)):
        if (d / "tokenizer.json").is_file():
            from lmforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(d)
            break
    return save_model(model, out, tokenizer=tokenizer)
