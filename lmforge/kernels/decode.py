"""Faster CPU decoding as module swaps: `install(model)` replaces layers of a model the caller owns by
kernel-backed ones with the same parameters; `uninstall(model)` puts plain ones back.

A decode step multiplies a handful of rows (the batch) by every weight matrix, so its speed is how
fast the weights stream from memory. PyTorch's default CPU path for `F.linear(x, w)` with so few rows
stays well below the machine's bandwidth (bench/decode.py measures both). `install(model)`:
- puts the weights in huge pages (hugepages.py), then
- with lmforge's own kernel (rows.py, built on first use) swaps each CPU fp32/bf16 nn.Linear for a
  DecodeLinear, whose calls with few rows and no autograd go to `linear_rows`, which streams the
  row-major weight as it is (no copy; every other use, prefill, training and saving, unchanged), and
  each Attention for a DecodeAttention, whose decode steps (a few queries, no autograd) go to
  `decode_attention`, which reads only the visible cache slots; and each pre-norm RMSNorm Block with a
  dense MLP for a DecodeBlock, whose decode steps are one `decode_layer` call for the whole layer
  (the ~50 small PyTorch calls of an eager block cost more than its products at this size);
- without it, DecodeLinear uses PyTorch's faster layouts:
  - fp32: the same weight stored transposed in memory, i.e. (in, out) contiguous, turns the product
    into `x @ w_t` with a row-major right-hand side, which MKL streams much faster. `install` swaps
    the storage in place: the same Parameter objects with the same values (tied weights stay tied),
    no extra memory, and every other use works unchanged;
  - bf16: the weight reordered once into oneDNN's blocked layout (what torch.compile's CPU
    "freezing" does, without its minutes of compilation) is much faster than the plain bf16 path.
    Each layer keeps such a copy (one extra copy of the Linear weights), used by calls with at most
    MAX_PACKED_ROWS input rows and no autograd; rebuilt when the weight changes.

The swapped-in modules are subclasses holding the very Parameter objects of the ones they replace, so
parameter names, state dicts, ties and `isinstance(m, nn.Linear)` are unchanged. Soft-capped attention
(Gemma 2) stays plain: the kernel cannot express soft-capping. Quantized layers (compress/qlinear.py)
pick their own kernels; `install` builds the row kernel they use for decode steps.
`uninstall(model)` undoes the swaps and layouts (the weights stay in huge pages). Off CPU `install`
does nothing.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.cache import KVCache
from lmforge.kernels import hugepages, rows
from lmforge.model import MLP, Attention, Block, Norm

# Rows up to which the oneDNN-packed bf16 copy is used (the reorder is made for this many rows).
MAX_PACKED_ROWS = 64


def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DecodeLinear(nn.Linear):
    """nn.Linear whose decode-step calls (few rows, no autograd) run on lmforge's row kernel, or on
    oneDNN's packed bf16 weights without it; every other call is F.linear."""

    _lmf_version = None  # (weight version, data_ptr) the packed copy was made from
    _lmf_packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        n = x.numel() // x.shape[-1]  # rows of x
        if torch.is_grad_enabled() or x.dtype != w.dtype:
            return F.linear(x, w, self.bias)
        if rows.LOADED and n <= rows.MAX_ROWS[w.dtype]:
            y = rows.linear_rows(x.reshape(n, x.shape[-1]), w, None, self.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        if (
            w.dtype == torch.bfloat16
            and n <= MAX_PACKED_ROWS
            and not torch.compiler.is_compiling()  # inductor's freezing packs weights itself
            and _mkldnn_bf16()
        ):
            if self._lmf_version != (w._version, w.data_ptr()):  # first call, or the weight was updated
                w_ = w.detach().contiguous()  # a model cast after install may hold it transposed
                self._lmf_packed = torch.ops.mkldnn._reorder_linear_weight(w_, MAX_PACKED_ROWS)
                self._lmf_version = (w._version, w.data_ptr())
            return torch.ops.mkldnn._linear_pointwise(x, self._lmf_packed, self.bias, "none", [], "")
        return F.linear(x, w, self.bias)


class DecodeAttention(Attention):
    """Attention whose decode steps on CPU (at most 16 queries over the cache, no autograd, not
    soft-capped) run on lmforge's `decode_attention` kernel."""

    def attend(self, q, k, v, mask, is_causal):
        if (
            rows.LOADED
            and self.softcap is None
            and not torch.is_grad_enabled()
            and q.device.type == "cpu"
            and not is_causal
            and q.shape[2] <= 16
        ):
            return rows.decode_attention(q, k, v, mask, self.scale)  # (B, T, H, hd)
        return super().attend(q, k, v, mask, is_causal)


# MLP activations the fused layer computes (rows.cpp's Act codes)
_ACT = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
# Rows (batch x new tokens) up to which a decode step takes the fused layer, per weight dtype: more
# than rows.MAX_ROWS pays here, as the eager block's small calls cost more than PyTorch's faster
# products save. Measured at 2 threads (bench/decode.py's batch sweep and docs/benchmarks.md): bf16
# fused at batch 4 169 against 124 tok/s eager, at 8 255 against 217, but at 16 and 32 oneDNN's
# products win (352 and 478 against 308 and 275); fp32 fused at 8 124 against 67, at 16 147 against
# 110, at 32 202 against 168 (the kernel's passes of 8 rows each read the weights once).
FUSED_ROWS = {torch.float32: 32, torch.bfloat16: 8, torch.int8: 8}


def _weights(m: nn.Module):
    """(weight, scale, bias) of a Linear the row kernel reads as it is, else None (LoRA, int4, ...)."""
    if type(m) is DecodeLinear:
        return m.weight, None, m.bias
    if (
        type(m).__name__ == "QuantLinear" and m.bits == 8 and m.kernel == "int8pack_cpu"
    ):  # compress/qlinear.py
        return m.qweight, m.scales, m.bias
    return None


class DecodeBlock(Block):
    """Block whose decode steps (few rows, no autograd, a KVCache written at a slot) run as one
    `decode_layer` call: the norms, projections, RoPE, cache write, attention, residual adds and MLP
    of the layer in C++ (rows.cpp), instead of ~50 PyTorch ops. Swapped in only for pre-norm RMSNorm
    blocks with a dense MLP and no q/k norms (Llama, Qwen2, Mistral, SmolLM, Gemma 1, Phi-3 ...); any
    other call, or a layer that changed (LoRA applied), runs the eager Block."""

    def forward(self, x, rope, mask, is_causal, cache):
        B, T, _ = x.shape
        a, mlp = self.attn, self.mlp
        if (
            not rows.LOADED
            or torch.is_grad_enabled()
            or (self.training and self.drop.p > 0)
            or is_causal
            or type(cache) is not KVCache
            or cache._chunk[0] not in ("slice", "ring1")
            or x.device.type != "cpu"
        ):
            return super().forward(x, rope, mask, is_causal, cache)
        ws = [_weights(m) for m in (a.wqkv, a.wo, mlp.w_in, mlp.w_out)]
        if any(w is None for w in ws) or B * T > FUSED_ROWS.get(ws[0][0].dtype, 0):
            return super().forward(x, rope, mask, is_causal, cache)
        kind, slot, _ = cache._chunk
        kc, vc = cache.k[a.layer], cache.v[a.layer]
        S = slot + T if kind == "slice" else kc.shape[2]  # the slots attended: the written ones, or the ring
        cos, sin = rope if rope is not None else (None, None)
        return torch.ops.lmforge.decode_layer(
            x, [w for w, _, _ in ws], [s for _, s, _ in ws], [b for _, _, b in ws],
            [self.attn_norm.weight, self.mlp_norm.weight], self.attn_norm.eps, self.attn_norm.unit_offset,
            cos, sin, kc, vc, slot, S, mask, a.n_heads, a.n_kv, a.scale, _ACT[a.cfg.act], mlp.glu,
        )  # fmt: skip


def _fusable(b: nn.Module) -> bool:
    """A block decode_layer computes: pre-norm RMSNorm, dense MLP, no q/k norms, no soft-capping."""
    return (
        type(b) is Block
        and not b.post_norm
        and all(type(n) is Norm and n.kind == "rmsnorm" for n in (b.attn_norm, b.mlp_norm))
        and all(type(n) is nn.Identity for n in (b.attn_post_norm, b.mlp_post_norm))
        and type(b.mlp) is MLP
        and b.attn.cfg.act in _ACT
        and not b.attn.qk_norm
        and b.attn.softcap is None
        and b.attn.cfg.q_dim == b.attn.n_heads * b.attn.hd
    )


def _swapped(m: nn.Module, cls: type) -> nn.Module:
    """A module of class cls with m's state: the same Parameter, buffer and submodule objects."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in m.__dict__.items()})
    for a in ("_lmf_version", "_lmf_packed"):
        new.__dict__.pop(a, None)  # a packed copy belongs to the DecodeLinear that made it
    return new


def _swap(model: nn.Module, pick) -> int:
    """Replace every submodule m for which pick(m) gives a class by _swapped(m, that class)."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = pick(child)
            if cls is not None:
                setattr(parent, name, _swapped(child, cls))
                n += 1
    return n


def _cpu_linear(m: nn.Module) -> bool:
    return (
        type(m) in (nn.Linear, DecodeLinear)
        and m.weight.device.type == "cpu"
        and m.weight.dtype in (torch.float32, torch.bfloat16)
    )


def install(model: nn.Module) -> nn.Module:
    """Swap the model's CPU layers for the fastest decode kernels available (in place; idempotent;
    a no-op off CPU). Returns the model."""
    if not any(p.device.type == "cpu" for p in model.parameters()):
        return model
    kernel = rows.available()  # builds it: the layers (and qlinear's int8 ones) check rows.LOADED
    _swap(model, lambda m: DecodeLinear if type(m) is nn.Linear and _cpu_linear(m) else None)
    for m in model.modules():
        if _cpu_linear(m):
            w = m.weight
            if kernel and not w.is_contiguous():  # stored transposed by an install without the kernel
                w.data = w.data.contiguous()
            elif not kernel and w.dtype == torch.float32 and w.is_contiguous() and w.dim() == 2:
                w.data = w.data.t().contiguous().t()  # same (out, in) tensor, stored (in, out)
    if kernel:
        _swap(model, lambda m: DecodeAttention if type(m) is Attention and m.softcap is None else None)
        _swap(model, lambda m: DecodeBlock if _fusable(m) else None)
    hugepages.place(model)
    return model


def uninstall(model: nn.Module) -> nn.Module:
    """Undo `install`: plain nn.Linear and Attention modules (same parameters), row-major weights,
    packed copies freed. Returns the model."""
    _swap(model, lambda m: nn.Linear if type(m) is DecodeLinear else None)
    _swap(model, lambda m: Attention if type(m) is DecodeAttention else None)
    _swap(model, lambda m: Block if type(m) is DecodeBlock else None)
    for m in model.modules():
        if type(m) is nn.Linear and not m.weight.is_contiguous():
            m.weight.data = m.weight.data.contiguous()
    return model


def installed(model: nn.Module) -> list[str]:
    """What `install` set up on the model, in words ([] if nothing)."""
    done = []
    linears = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    if linears:
        done.append("Linear layers on lmforge's decode kernel" if rows.LOADED else "PyTorch's decode layouts")
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    if any(isinstance(m, DecodeAttention) for m in attention):
        done.append("attention on lmforge's decode kernel")
    if linears and rows.LOADED and any(m.softcap is not None for m in attention):
        done.append("soft-capped attention on PyTorch (the kernel cannot express soft-capping)")
    if any(isinstance(m, DecodeBlock) for m in model.modules()):
        done.append("decode steps fused per layer")
    if any(getattr(t, "_lmf_huge", None) == t.data_ptr() for t in model.parameters()):
        done.append("weights in huge pages")
    return done
