"""LoRA: low-rank adapters on our fused projections, saved in the PEFT format.

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)      A (r, in), B (out, r), W and b frozen

B starts at zero, so an adapted model starts exactly at its base. Targets are our fused module names:
`wqkv` (q, k and v at once: one A shared by the three, B's rows split q | k | v), `wo`, `w_in` (gate and
up for GLU MLPs) and `w_out`. Mixtral's experts are stacked parameters, not linear layers, and cannot
be targeted; their attention can.

An adapter directory is what peft writes (peft_format.py): `adapter_config.json` (peft_type LORA, r,
lora_alpha, target_modules in HF names, base_model_name_or_path) and `adapter_model.safetensors`
(base_model.model.<HF module>.lora_A.weight / lora_B.weight), plus the tokenizer files when the run
had one. So peft, vLLM and transformers load lmforge's adapters, and lmforge loads theirs (separate
q/k/v adapters are stacked exactly into the fused layout).

    model = load_lora_model("runs/sft/final")              # base + adapter, unmerged
    merged = merge_lora(model)                             # plain Transformer, W += B A * alpha / r
    merge_lora_dir("runs/sft/final", "merged/")            # what `lmforge merge-lora` does
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.compress.qlinear import QuantLinear
from lmforge.train import peft_format as P
from lmforge.utils import UserError, atomic_dir, parse_dtype

TARGETS = ("wqkv", "wo", "w_in", "w_out")
ADAPTER_WEIGHTS = P.ADAPTER_WEIGHTS
ADAPTER_CONFIG = P.ADAPTER_CONFIG


class LoRALinear(nn.Module):
    """A linear layer whose frozen weight (and bias) are the base layer's, plus a trainable low-rank update.

    It keeps the `weight`/`bias` names of the layer it replaces, so the base state dict is unchanged.
    Not an nn.Linear subclass on purpose: code that swaps nn.Linear layers for fast kernels
    (lmforge.kernels, quantization) must not take it for a plain one and drop the update.
    scale: the update's factor, alpha / rank unless given (rslora: alpha / sqrt(rank)).
    """

    def __init__(
        self,
        base: nn.Linear | QuantLinear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        scale: float | None = None,
    ):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # A quantized base (QLoRA) stays the module it is, under `.base` (its int8/int4 kernels run the
        # frozen product); a float base's weight and bias are kept as this layer's own parameters.
        self.base = base if isinstance(base, QuantLinear) else None
        self.weight = None if self.base is not None else base.weight
        self.bias = None if self.base is not None else base.bias
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank if scale is None else scale
        dev = base.qweight.device if self.base is not None else base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if dev.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = self.lora_dropout(x)
        w, A, B = self.weight, self.lora_A, self.lora_B
        if self.base is not None:  # quantized base: its kernel, then the update in x's dtype
            a = F.linear(xd, A.to(x.dtype))  # (..., r)
            return self.base(x) + F.linear(a * self.scale, B.to(x.dtype))
        if (
            torch.is_grad_enabled()
            and x.dtype == w.dtype == A.dtype == B.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and not w.requires_grad
            and (self.bias is None or not self.bias.requires_grad)
        ):  # training: one autograd node with in-place accumulation (see _LoRAMatmul)
            return _LoRAMatmul.apply(x, xd, w, self.bias, A, B, self.scale)
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)  # a base kept in bf16 (freeze_base_dtype) run outside autocast
        y = F.linear(x, w, self.bias if self.bias is None else self.bias.to(w.dtype))  # (..., out)
        a = F.linear(xd, A.to(x.dtype))  # (..., r)
        # scale folded into the small (r) side and added in place: no (..., out) temporary for B a * s
        return y.add_(F.linear(a * self.scale, B.to(x.dtype)))

    def delta(self) -> torch.Tensor:
        """B A * scale: (out, in) in fp32, what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}"


class _LoRAMatmul(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T with W, b frozen, as one autograd node.

    Autograd over the plain expression runs about twice the kernels (a separate scale, the add, the
    sum of x's two gradients) and keeps an (N, out) temporary; here both sums accumulate in place
    (addmm_). x (N, in) (xd: x after LoRA dropout, or x itself), A (r, in), B (out, r):
        forward   y = x W^T + b;  a = xd A^T (N, r);  y += s a B^T
        backward  ga = s g B (N, r);  dB = s g^T a;  dA = ga^T xd;  dx = g W (+ ga A when xd is x)
    Every extra op also costs a thread synchronisation, which on a shared CPU is often a wait.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, A, B, scale):
        shape = x.shape
        x2, xd2 = x.reshape(-1, shape[-1]), xd.reshape(-1, shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        a = torch.mm(xd2, A.t())  # (N, r)
        y.addmm_(a, B.t(), alpha=scale)
        ctx.same = xd is x
        ctx.scale = scale
        ctx.save_for_backward(xd2, a, weight, A, B)
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        xd2, a, weight, A, B = ctx.saved_tensors
        s = ctx.scale
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        ga = torch.mm(g, B).mul_(s)  # (N, r)
        dB = torch.mm(g.t(), a).mul_(s) if ctx.needs_input_grad[5] else None  # (out, r)
        dA = torch.mm(ga.t(), xd2) if ctx.needs_input_grad[4] else None  # (r, in)
        dx = dxd = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight)  # (N, in)
            if ctx.same:
                dx.addmm_(ga, A)
        if not ctx.same and ctx.needs_input_grad[1]:
            dxd = torch.mm(ga, A)
        shape = (*gy.shape[:-1], weight.shape[1])
        return (
            dx.view(shape) if dx is not None else None,
            dxd.view(shape) if dxd is not None else None,
            None,
            None,
            dA,
            dB,
            None,
        )


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
            if name in targets and type(child) in (nn.Linear, QuantLinear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise UserError(
            f"lora.targets={','.join(targets)} matched no linear layer of this model "
            "(Mixtral experts are stacked tensors: target wqkv and wo)"
        )
    model.lora_config = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": targets}
    return model


def freeze_base_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen base weights of the LoRA layers in `dtype`, for a run under `dtype` autocast.

    Autocast casts a frozen fp32 weight anew at every use (it caches casts of trainable leaves only), so
    casting once runs the same bf16 matmuls, bit for bit, without casting the adapted layers' weights at
    every step, and halves their memory. Other layers (embeddings, norms, layers without an adapter)
    keep fp32, so code that runs the model outside autocast (sample generation) still works: a LoRA
    layer casts its base back to the input's dtype there. The adapter stays fp32. A quantized base
    (QLoRA) has its own kernels and is left as it is. Returns the number of tensors cast."""
    n = 0
    for m in model.modules():
        if not isinstance(m, LoRALinear) or m.base is not None:
            continue
        for name in ("weight", "bias"):
            p = getattr(m, name)
            if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                setattr(m, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
                n += 1
    return n


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, named like the model's parameters (blocks.0.attn.wqkv.lora_A)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def lora_config_of(model: nn.Module) -> dict:
    """What save_adapter needs about a model's LoRA layers: rank, alpha, dropout, targets and, when
    they differ from alpha / rank (adapters read from peft), each module's scale."""
    cfg = dict(getattr(model, "lora_config", None) or {})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        raise UserError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    cfg.setdefault("rank", first.rank)
    cfg.setdefault("alpha", first.alpha)
    cfg.setdefault("dropout", 0.0)
    cfg.setdefault("targets", sorted({n.rsplit(".", 1)[-1] for n in layers}))
    scales = {_strip(n): m.scale for n, m in layers.items() if m.scale != cfg["alpha"] / m.rank}
    if scales:
        cfg["scales"] = scales
    return cfg


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
    """Write a PEFT adapter directory atomically: adapter_model.safetensors + adapter_config.json
    (+ tokenizer). tensors are ours (lora_state_dict); model_config is the base's (for HF names)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_into(tmp, tensors, lora_config, base, model_config, tokenizer)
    return path


def save_into(directory: Path, tensors, lora_config, base, model_config=None, tokenizer=None) -> None:
    """Write the adapter files into an existing directory (a checkpoint being assembled)."""
    t = {_strip(k): v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    P.write_peft(Path(directory), t, lora_config, base, model_config)
    if tokenizer is not None:
        tokenizer.save(directory)


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: str | os.PathLike) -> dict:
    """adapter_config.json (PEFT's, or lmforge's earlier format), checked for what lmforge supports."""
    return P.read_config(path)


def _attach(model: nn.Module, adapter: P.Adapter, path) -> None:
    """Wrap each adapted module of `model` in a LoRALinear holding the adapter's factors (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (A, B, scale) in adapter.modules.items():
        try:
            child = model.get_submodule(name)
        except AttributeError:
            child = None
        if type(child) not in (nn.Linear, QuantLinear):
            raise UserError(f"{path}: the adapter adapts {name}, which is not a linear layer of this model")
        if A.shape[1] != child.in_features or B.shape[0] != child.out_features:
            raise UserError(
                f"{path}: {name}: LoRA factors {tuple(B.shape)} x {tuple(A.shape)} do not fit the base's "
                f"({child.out_features}, {child.in_features}) layer (a different base model?)"
            )
        r = A.shape[0]
        lora = LoRALinear(child, r, scale * r, adapter.dropout, scale=scale)
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lora)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, parts in adapter.replace.items():  # modules_to_save, trained biases
            if ours not in params:
                raise UserError(f"{path}: the adapter replaces {ours}, which this model does not have")
            for start, t in parts:
                dst = params[ours] if start is None else params[ours][start : start + t.shape[0]]
                if dst.shape != t.shape:
                    raise UserError(
                        f"{path}: the adapter's copy of {ours} has shape {tuple(t.shape)}, the base "
                        f"{tuple(dst.shape)} (tokens added to the vocabulary are not supported)"
                    )
                dst.copy_(t)
    ranks = {m[0].shape[0] for m in adapter.modules.values()}
    first = next(iter(adapter.modules.values()), None)
    model.lora_config = {
        "rank": max(ranks) if ranks else 0,
        "alpha": first[2] * first[0].shape[0] if first else 0.0,
        "dropout": adapter.dropout,
        "targets": sorted({n.rsplit(".", 1)[-1] for n in adapter.modules}),
    }


def load_adapter_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy the adapter tensors of `path` into a model that already has LoRA layers of the same shape."""
    adapter = P.read_adapter(path, model.config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if set(adapter.modules) != set(layers):
        missing, extra = (
            sorted(set(layers) - set(adapter.modules)),
            sorted(set(adapter.modules) - set(layers)),
        )
        raise UserError(
            f"{path}: adapter tensors do not match the model's LoRA layers "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); check rank and targets"
        )
    with torch.no_grad():
        for n, (A, B, _) in adapter.modules.items():
            m = layers[n]
            if A.shape != m.lora_A.shape or B.shape != m.lora_B.shape:
                raise UserError(
                    f"{path}: {n} has LoRA factors {tuple(B.shape)} x {tuple(A.shape)}, the model expects "
                    f"{tuple(m.lora_B.shape)} x {tuple(m.lora_A.shape)} (different rank or base model)"
                )
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the adapter at `path` (PEFT, or lmforge's earlier format) to a base model (in place)."""
    _attach(model, P.read_adapter(path, model.config), path)
    return model


def _base_of(path, base) -> str:
    cfg = read_adapter_config(path)
    base = base or P.base_of(cfg)
    if not base:
        raise UserError(f"{path}: the adapter does not name its base checkpoint; pass it with --base")
    if not Path(base).is_dir():
        raise UserError(
            f"{path}: base checkpoint {base} is not a local directory; pass the base model's "
            "directory with --base"
        )
    return str(base)


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
                if child.base is not None:
                    raise UserError(
                        "the adapter's base is quantized: merge it into the float model that was "
                        "quantized (merge-lora --base FLOAT_DIR), then quantize the merged model"
                    )
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


def merge_lora_command(
    adapter: str, *, out: str, base: str | None = None, dtype: str | None = None, force: bool = False
) -> Path:
    """`lmforge merge-lora`: merge_lora_dir with the dtype by name, saying where the model went.

    Args:
        adapter: a LoRA adapter directory: a LoRA run's final/ or checkpoints/step_NNNNNN/, or any PEFT
            LoRA adapter (adapter_config.json + adapter_model.safetensors)
        out: where to write the merged model directory
        base: the base checkpoint (default: base_model_name_or_path of the adapter's adapter_config.json,
            when that is a local directory)
        dtype: fp32, bf16 or fp16 for the merged weights (default: the base's)
        force: replace what --out holds (never the adapter or its base: merging into the base would
            apply the update twice on the next merge)
    """
    from lmforge.outputs import check_output

    check_output(out, "model", force=force, inputs=(adapter, _base_of(adapter, base)))
    merged = merge_lora_dir(adapter, out, base=base, dtype=parse_dtype(dtype) if dtype is not None else None)
    print(f"merged {adapter} into {merged}")
    return merged
