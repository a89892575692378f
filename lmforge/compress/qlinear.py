"""Weight-only quantized layers, the kernels they run on, and their checkpoint format.

Notable features
- int8: per-output-channel symmetric, q in [-127, 127], w ~ q * scale. int4: group-wise asymmetric,
  q in [0, 15], w ~ (q - 8) * scale + zero, one (scale, zero) per group of G input weights (zero is the
  value of the middle code, as in PyTorch's int4 kernels and gpt-fast)
- scales and zeros are bfloat16 values chosen so that the grid covers every weight (scales rounded up),
  so the stored weights are within scale/2 of the originals and the kernels use the exact values stored
- the matmuls are lmforge/kernels/quant.py's (lmforge's row kernel for decode steps on CPU once
  `lmforge.kernels.install` has built it, PyTorch's int8/int4 kernels, else dequantizing on the fly;
  a layer's `kernel` attribute says which one it uses)
- the embedding table can be int8 too (per-row scales); when the output projection is tied to it, the
  output projection runs the int8 kernel on the same table

File format (safetensors, HF tensor names with the suffix replaced; quantized tensors are (out, in)
whatever the family's layout, so GPT-2's Conv1D weights are not transposed):
    <linear>.qweight  int8 (N, K)                 int4: uint8 (N, K/2), low nibble = even column
    <linear>.scales   bfloat16 (N,)               int4: bfloat16 (N, K/G)
    <linear>.zeros                                int4: bfloat16 (N, K/G)
    <embedding>.qweight int8 (V, d), <embedding>.scales bfloat16 (V,)
config.json `quantization_config` names the scheme; see lmforge/compress/quantize.py and
docs/compression.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import hf
from lmforge.kernels.quant import choose_kernel, int4_matmul, int4_pack, int8_matmul
from lmforge.model import Transformer
from lmforge.utils import UserError

FORMAT = "lmforge"
TARGETS = ("wqkv", "wo", "w_in", "w_out")  # our names of the linear layers in every block
_BF16 = torch.bfloat16


# --------------------------------------------------------------------------------------------- numbers
def bf16_up(t: torch.Tensor) -> torch.Tensor:
    """Positive fp32 values rounded up to the next bfloat16 (so a scale never shrinks)."""
    bits = t.float().contiguous().view(torch.int32)
    up = ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)  # clear the low 16 bits, rounding up
    return up.to(_BF16)


def int8_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric scales (N,) bf16 with |w| <= 127 * scale."""
    return bf16_up(w.float().abs().amax(dim=1).clamp(min=1e-10) / 127)


def int8_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """w (N, K) -> int8 codes for per-row scales (N,) (any leading column slice of a row works too)."""
    return (w.float() / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8)


def int4_params(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) bf16 of groups wg (..., G): codes 0..15 stand for zero + (q - 8) * scale, and that
    grid spans [min, max] of the group even after the bf16 rounding (scale rounded up)."""
    wg = wg.float()
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    zero = (lo + 8 * (hi - lo) / 15).to(_BF16)
    z = zero.float()
    scale = bf16_up(torch.maximum((z - lo) / 8, (hi - z) / 7).clamp(min=1e-10))
    return scale, zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w (..., G) -> codes 0..15 (uint8) for per-group scale and zero (...)."""
    q = (w.float() - zero.float()[..., None]) / scale.float()[..., None] + 8
    return q.round().clamp(0, 15).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, column 2j in the low nibble of byte j, 2j+1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def dequantize_int8(q, scales, dtype=torch.float32):
    return (q.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(p, scales, zeros, dtype=torch.float32):
    q = unpack_int4(p).float()
    N, K = q.shape
    G = K // scales.shape[1]
    w = (q.view(N, K // G, G) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(N, K).to(dtype)


class QuantLinear(nn.Module):
    """y = x Ŵ^T + b with Ŵ stored as int8 (per output channel) or int4 (per group of G inputs)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        bias: bool = False,
        device=None,
        dtype=torch.float32,
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits}: lmforge quantizes to 8 or 4 bits")
        N, K = out_features, in_features
        self.in_features, self.out_features, self.bits = K, N, bits
        self.group_size = group_size if bits == 4 else None
        if bits == 8:
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, dtype=_BF16, device=device))
            self.zeros = None
        else:
            if not group_size or K % group_size:
                raise UserError(f"int4 group size {group_size} does not divide the layer's {K} inputs")
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(N, K // group_size, dtype=_BF16, device=device))
            self.register_buffer("zeros", torch.empty(N, K // group_size, dtype=_BF16, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(N, dtype=dtype, device=device))
        else:
            self.bias = None
        self._packed = None  # the int4 kernels' own copy of the weights (see _prepare)
        self.kernel = choose_kernel(bits, self.qweight.device, N, K, self.group_size)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        bits: int = 8,
        group_size: int | None = 64,
        codes=None,
    ) -> QuantLinear:
        """Round-to-nearest quantization of weight (N, K); `codes` = (q, scales[, zeros]) already
        computed (GPTQ) are stored as they are."""
        N, K = weight.shape
        m = cls(
            K,
            N,
            bits,
            group_size,
            bias is not None,
            device=weight.device,
            dtype=bias.dtype if bias is not None else torch.float32,
        )
        with torch.no_grad():
            if codes is None:
                if bits == 8:
                    s = int8_scales(weight)
                    codes = (int8_codes(weight, s), s)
                else:
                    wg = weight.float().view(N, K // group_size, group_size)
                    s, z = int4_params(wg)
                    codes = (int4_codes(wg, s, z).view(N, K), s, z)
            if bits == 8:
                m.qweight.copy_(codes[0])
                m.scales.copy_(codes[1])
            else:
                m.qweight.copy_(pack_int4(codes[0]))
                m.scales.copy_(codes[1])
                m.zeros.copy_(codes[2])
            if bias is not None:
                m.bias.copy_(bias)
        m._prepare()
        return m

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weights the layer computes with, (N, K)."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.zeros, dtype)

    # ------------------------------------------------------------------ bookkeeping
    def _apply(self, fn, recurse=True):
        # .to(dtype) must not cast scales/zeros (they are the stored bf16 values), and a device move
        # or new weights need the kernel's copy rebuilt.
        keep = {k: self._buffers[k].dtype for k in ("scales", "zeros") if self._buffers.get(k) is not None}
        before = self.qweight.data_ptr(), self.qweight.device
        super()._apply(fn, recurse)
        for k, dt in keep.items():
            if self._buffers[k].dtype != dt:
                self._buffers[k] = self._buffers[k].to(dt)
        if (self.qweight.data_ptr(), self.qweight.device) != before or self._packed is None:
            self.kernel = choose_kernel(
                self.bits, self.qweight.device, self.out_features, self.in_features, self.group_size
            )
            self._prepare()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    def _prepare(self) -> None:
        """Build the kernel's copy of the weights now (not inside a compiled decode step)."""
        self._packed = None
        if self.kernel in ("int4pack_cpu", "int4pack_cuda") and self.qweight.device.type != "meta":
            self._pack()

    def _pack(self):
        """The int4 weights in the kernel's own layout (not saved; rebuilt after a move or a load)."""
        self._packed = int4_pack(unpack_int4(self.qweight), self.scales, self.zeros, self.kernel)
        return self._packed

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # LoRA on a quantized base (QLoRA): dL/dx only
            return _QuantMatmul.apply(x, self)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        k = self.kernel
        if self.bits == 8:
            y = int8_matmul(x2, self.qweight, self.scales, k)
        elif k in ("int4pack_cpu", "int4pack_cuda"):
            y = int4_matmul(x2, self._packed or self._pack(), self.group_size, k)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{g}, kernel={self.kernel}"


class _QuantMatmul(torch.autograd.Function):
    """y = QuantLinear(x) with a gradient for x: dx = g Ŵ (N, K), Ŵ dequantized for the backward only.

    PyTorch's int8/int4 kernels have no derivative; the stored codes are frozen (nothing to learn
    there), so the only gradient a quantized layer passes on is its input's: what a LoRA adapter
    upstream of it needs. Ŵ costs one (N, K) temporary per layer per backward, as in QLoRA.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        with torch.no_grad():
            return layer._forward(x)

    @staticmethod
    def backward(ctx, gy):
        w = ctx.layer.dequantize(gy.dtype)  # (N, K)
        return gy @ w, None


class QuantEmbedding(nn.Module):
    """An int8 embedding table with one scale per row. `weight` is an empty tensor that carries the
    compute dtype and device (the rest of lmforge reads them from `tok_emb.weight`)."""

    def __init__(self, num_embeddings: int, dim: int, device=None, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.register_buffer("qweight", torch.empty(num_embeddings, dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=_BF16, device=device))
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.kernel = choose_kernel(8, self.qweight.device, num_embeddings, dim, None)

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> QuantEmbedding:
        m = cls(*weight.shape, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            s = int8_scales(weight)
            m.qweight.copy_(int8_codes(weight, s))
            m.scales.copy_(s)
        return m

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._buffers["scales"].dtype != _BF16:
            self._buffers["scales"] = self._buffers["scales"].to(_BF16)
        self.kernel = choose_kernel(8, self.qweight.device, self.num_embeddings, self.embedding_dim, None)
        return self

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[idx].float() * self.scales[idx].float()[..., None]  # (..., d)
        return rows.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class TiedQuantHead(nn.Module):
    """The output projection of a tied model whose embedding table is int8: the int8 kernel on the
    embedding's own tensors (held by reference, so they are stored and moved once)."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its tensors belong to tok_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        y = int8_matmul(x.reshape(-1, e.embedding_dim), e.qweight, e.scales, e.kernel)
        return y.view(*x.shape[:-1], e.num_embeddings)


class QuantizedTransformer(Transformer):
    """A Transformer some of whose layers are quantized. Only num_params differs: it counts the
    weights the quantized layers stand for, so reports compare like with like."""

    def num_params(self, trainable_only: bool = False) -> int:
        n = super().num_params(trainable_only)
        if trainable_only:
            return n
        for m in self.modules():
            if isinstance(m, QuantLinear):
                n += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
            elif isinstance(m, QuantEmbedding):
                n += m.num_embeddings * m.embedding_dim
        return n


# --------------------------------------------------------------------------------------------- structure
def target_linears(model, qcfg: dict) -> list[tuple[str, nn.Module, str]]:
    """(our module name, parent, attribute) of every linear layer the scheme quantizes."""
    names = set(qcfg.get("modules", TARGETS))
    out = []
    for i, block in enumerate(model.blocks):
        for parent, attr in (
            (block.attn, "wqkv"),
            (block.attn, "wo"),
            (block.mlp, "w_in"),
            (block.mlp, "w_out"),
        ):
            if attr in names and isinstance(getattr(parent, attr, None), (nn.Linear, QuantLinear)):
                sub = "attn" if parent is block.attn else "mlp"
                out.append((f"blocks.{i}.{sub}.{attr}", parent, attr))
    if "lm_head" in names and not model.config.tie_embeddings:
        out.append(("lm_head", model, "lm_head"))
    return out


def install_quantized(model, qcfg: dict, group_sizes: dict[str, int] | None = None):
    """Replace the scheme's layers of `model` (on any device, meta included) by empty quantized ones.
    group_sizes: per-layer int4 group size, when the file says it differs from qcfg's."""
    bits = int(qcfg["bits"])
    dev = model.tok_emb.weight.device
    dtype = model.tok_emb.weight.dtype
    for name, parent, attr in target_linears(model, qcfg):
        lin = getattr(parent, attr)
        G = (group_sizes or {}).get(name, qcfg.get("group_size"))
        setattr(
            parent,
            attr,
            QuantLinear(
                lin.in_features, lin.out_features, bits, G, lin.bias is not None, device=dev, dtype=dtype
            ),
        )
    if qcfg.get("embedding") == "int8":
        V, d = model.tok_emb.weight.shape
        model.tok_emb = QuantEmbedding(V, d, device=dev, dtype=dtype)
        if model.config.tie_embeddings:
            model.lm_head = TiedQuantHead(model.tok_emb)
    model.__class__ = QuantizedTransformer
    return model


# --------------------------------------------------------------------------------------------- files
_QSUFFIXES = ("qweight", "scales", "zeros")


def quantized_state_dict(model) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """(HF-named tensors of a quantized model, its float dtype) for checkpoint.save_model."""
    cfg, sd = model.config, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in hf.layout(cfg):
        if ours in sd:
            out.update(hf.to_hf_tensors(cfg, sd[ours].detach(), theirs, how))
            continue
        base = ours.rsplit(".", 1)[0]
        for suffix in _QSUFFIXES:
            t = sd.get(f"{base}.{suffix}")
            if t is not None:  # quantized tensors are (out, in) whatever the family: rows split, never T
                names = [n.rsplit(".", 1)[0] + "." + suffix for n in theirs]
                out.update(hf.to_hf_tensors(cfg, t, names, how, rows_only=True))
    float_dtype = model.tok_emb.weight.dtype
    return {k: v.contiguous().cpu() for k, v in out.items()}, float_dtype


def check_scheme(qcfg, where) -> dict:
    if not isinstance(qcfg, dict) or qcfg.get("format") != FORMAT or int(qcfg.get("bits", 0)) not in (4, 8):
        method = qcfg.get("quant_method") if isinstance(qcfg, dict) else qcfg
        raise UserError(
            f"{where}: config.json quantization_config ({method!r}) is not a scheme lmforge reads; lmforge "
            "loads its own int8/int4 checkpoints (lmforge quantize) and GPTQ, AWQ and compressed-tensors ones. "
            "Load this model with the library that made it."
        )
    return qcfg


def load_quantized(path, cfg, files, device="cpu", dtype: torch.dtype | None = None):
    """checkpoint.load_model for a directory whose config.json has an lmforge quantization_config."""
    from lmforge.model import build

    qcfg = check_scheme(cfg.extra.get("quantization_config"), path)
    model = build(cfg, meta=True)
    # int4 group sizes come from the stored scales (a layer whose width G does not divide may differ)
    group_sizes = {}
    if int(qcfg["bits"]) == 4:
        hf_names = {ours.rsplit(".", 1)[0]: theirs for ours, theirs, _ in hf.layout(cfg)}
        for name, parent, attr in target_linears(model, qcfg):
            scales = hf_names[name][0].rsplit(".", 1)[0] + ".scales"
            s = files.get(scales)
            if s is None:
                raise UserError(
                    f"{path}: missing tensor {scales}; the weights do not match quantization_config"
                )
            group_sizes[name] = getattr(parent, attr).in_features // s.shape[1]
    install_quantized(model, qcfg, group_sizes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()

    def get(name, want=None):
        t = files.get(name)
        if t is None:
            missing.append(name)
        used.add(name)
        return t

    for ours, theirs, how in hf.layout(cfg):
        if ours in expected:
            ts = [get(n) for n in theirs]
            if all(t is not None for t in ts):
                sd[ours] = hf.from_hf_tensors(cfg, ts, how)
            continue
        base = ours.rsplit(".", 1)[0]
        for suffix in _QSUFFIXES:
            if f"{base}.{suffix}" not in expected:
                continue
            ts = [get(n.rsplit(".", 1)[0] + "." + suffix) for n in theirs]
            if all(t is not None for t in ts):
                sd[f"{base}.{suffix}"] = hf.from_hf_tensors(cfg, ts, how, rows_only=True)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(
            f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}; "
            "the weights do not match config.json's quantization_config"
        )
    bad = [(k, tuple(v.shape), expected[k]) for k, v in sd.items() if tuple(v.shape) != expected[k]]
    if bad:
        k, got, want = bad[0]
        raise UserError(f"{path}: tensor for {k} has shape {got} but config.json implies {want}")
    unexpected = sorted(n for n in files.names() - used if not n.endswith(hf.IGNORED_SUFFIXES))
    if unexpected:
        raise UserError(
            f"{path}: tensors not used by this quantized {cfg.family} model: "
            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    floats = [v.dtype for k, v in sd.items() if v.is_floating_point() and not k.endswith(("scales", "zeros"))]
    dtype = dtype or (floats[0] if floats else torch.float32)
    model.to_empty(device=device)
    if cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.tok_emb.weight
    model._init_rope()
    model.load_state_dict(
        {
            k: v.to(dtype) if v.is_floating_point() and not k.endswith(("scales", "zeros")) else v
            for k, v in sd.items()
        },
        strict=False,
    )
    if isinstance(model.tok_emb, QuantEmbedding) and cfg.tie_embeddings:
        model.lm_head.__dict__["embedding"] = model.tok_emb
    return model.to(dtype)
