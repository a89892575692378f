"""Quantized checkpoints in the ecosystem's formats: GPTQ, AWQ and compressed-tensors, written from
lmforge's int4/int8 layers and read back into them.

    save_model(model, "out", format="gptq")          # checkpoint.save_model calls export_tensors
    load_model("hub-model-GPTQ")                     # checkpoint.load_model calls import_tensors

Every format stores w = (q - z) * s per output channel (int8) or per group of G inputs (int4) with an
integer zero z; lmforge's int4 layers store w = (q - 8) * scale + zero with bf16 scale and zero. The two
grids are the same numbers when s is a bf16 value and (8 - z) * s is one too, so export quantizes onto
the *symmetric* grid (z = 8, zero = 0: GPTQ `sym: true`, the grid vLLM's Marlin kernels take) with bf16
scales (exact in fp16 too), and import checks every layer: exact grids become lmforge's own int4/int8
layers (bit-identical dequantized weights), anything else (fp16 scales that bf16 cannot hold, act-order
g_idx, other bit widths) is dequantized to float with a note.

Layouts (per HF linear layer, N outputs, K inputs, G group size; int32 words hold 32/bits codes, the
first code in the lowest bits):
    gptq  qweight int32 (K/8, N): word [i, n] = codes of inputs 8i..8i+7 of output n
          qzeros  int32 (K/G, N/8): zeros of outputs 8j..8j+7, stored minus one (GPTQ v1,
                  checkpoint_format "gptq"; "gptq_v2" stores them as they are)
          scales  fp16 (K/G, N), g_idx int32 (K,) = the group of each input (k // G without act-order)
    awq   qweight int32 (K, N/8) and qzeros int32 (K/G, N/8): 8 outputs per word in the order
          0 2 4 6 1 3 5 7 (AWQ's GEMM kernel order); scales fp16 (K/G, N); zeros stored as they are
    compressed-tensors (pack-quantized)
          weight_packed int32 (N, K*bits/32): codes q + 2^(bits-1) of inputs along the row
          weight_scale (N, K/G) or (N, 1), weight_shape int (2,) = (N, K);
          weight_zero_point int32 packed along outputs (asymmetric only, read, never written)

Embeddings and the output projection stay in float in these formats (as GPTQ/AWQ/llm-compressor do), and
only families whose projections are nn.Linear in transformers are written (not GPT/GPT-2's Conv1D or
Mixtral's experts), so that transformers never meets a layer it would initialise at random.
"""

from __future__ import annotations

import warnings

import torch

from lmforge import hf
from lmforge.compress.qlinear import FORMAT, TARGETS, QuantLinear, target_linears, unpack_int4
from lmforge.compress.scheme import scheme
from lmforge.utils import UserError

FORMATS = ("lmforge", "gptq", "awq", "compressed-tensors")
ECOSYSTEM = FORMATS[1:]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output n of a word of 8 sits in nibble AWQ_ORDER.index(n)
_FP16_MIN = 2.0**-14  # smallest normal fp16: smaller scales would lose bits in the fp16 files
_BF16 = torch.bfloat16


def is_ecosystem(qcfg) -> bool:
    """Whether a config.json quantization_config is one of the formats read here."""
    return isinstance(qcfg, dict) and qcfg.get("quant_method") in ECOSYSTEM


# --------------------------------------------------------------------------------------------- grids
def int4_params_symmetric(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero = 0) bf16 of groups wg (..., G) on the symmetric grid w = (q - 8) * scale, q 0..15,
    covering the group (scale rounded up to bf16, at least the smallest normal fp16)."""
    from lmforge.compress.qlinear import bf16_up

    wg = wg.float()
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scale = bf16_up(torch.maximum(hi / 7, -lo / 8).clamp(min=_FP16_MIN))
    return scale, torch.zeros_like(scale)


def check_exportable(cfg, bits: int, fmt: str) -> None:
    """UserError when `fmt` cannot hold a `bits` quantization of a `cfg` model."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "lmforge":
        return
    if fmt in ("gptq", "awq") and bits != 4:
        raise UserError(f"--format {fmt} holds int4 weights; int8 goes to --format compressed-tensors")
    if cfg.family in ("gpt", "gpt2"):
        raise UserError(
            f"--format {fmt}: {cfg.family} stores its projections as Conv1D, which the {fmt} loaders do "
            "not convert; use --format lmforge (or export the float checkpoint to GGUF)"
        )
    if cfg.n_experts:
        raise UserError(
            f"--format {fmt}: Mixtral's experts are stacked tensors that lmforge keeps in float, which the "
            f"{fmt} loaders would expect quantized; use --format lmforge"
        )


# --------------------------------------------------------------------------------------------- packing
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32 bits -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_words(codes: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Codes 0..2^bits-1 packed 32/bits to an int32 word along `dim` (first code lowest); `order`: which
    code of each run goes into word slot i (AWQ)."""
    per = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    if order is not None:
        c = c[..., list(order)]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (c << shifts).sum(-1)
    return _to_int32(words).movedim(-1, dim).contiguous()


def unpack_words(words: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """The inverse of pack_words: int32 words -> codes (int64)."""
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    c = (w[..., None] >> shifts) & ((1 << bits) - 1)  # (..., words, per): slot i
    if order is not None:
        c = c[..., [order.index(j) for j in range(per)]]  # back to output order
    return c.reshape(*c.shape[:-2], -1).movedim(-1, dim)


# --------------------------------------------------------------------------------------------- export
def _layer_grid(m: QuantLinear, name: str):
    """(codes (N, K) int64 0..2^b-1, integer zeros (N, K/G) or None, scales (N, K/G) or (N, 1) fp32)."""
    if m.bits == 8:
        return m.qweight.to(torch.int64) + 128, None, m.scales.float()[:, None]
    if bool((m.zeros != 0).any()):
        raise UserError(
            f"{name}: its int4 weights are on lmforge's asymmetric grid, which GPTQ/AWQ/compressed-tensors "
            "cannot hold exactly; quantize with format=... so the symmetric grid is used"
        )
    return (
        unpack_int4(m.qweight).to(torch.int64),
        torch.full_like(m.scales, 8, dtype=torch.int64),
        m.scales.float(),
    )


def _per_hf_module(cfg, model):
    """[(HF module name, codes, zeros, scales, bits, G, bias)] for every quantized layer of `model`,
    fused projections split into the family's HF modules by rows."""
    rows = {ours.rsplit(".", 1)[0]: (theirs, how) for ours, theirs, how in hf.layout(cfg)}
    out = []
    for name, parent, attr in target_linears(model, cfg.extra["quantization_config"]):
        m = getattr(parent, attr)
        if not isinstance(m, QuantLinear):
            raise UserError(f"{name} stayed in float; the ecosystem formats need every block layer quantized")
        theirs, how = rows[name]
        mods = [n.rsplit(".", 1)[0] for n in theirs]
        q, z, s = _layer_grid(m, name)
        parts = [hf.to_hf_tensors(cfg, t, mods, how, rows_only=True) for t in (q, s)]
        zs = (
            hf.to_hf_tensors(cfg, z, mods, how, rows_only=True)
            if z is not None
            else [(n, None) for n in mods]
        )
        bs = hf.to_hf_tensors(cfg, m.bias, mods, how, rows_only=True) if m.bias is not None else None
        for i, (mod, qi) in enumerate(parts[0]):
            out.append((mod, qi, zs[i][1], parts[1][i][1], m.bits, m.group_size, bs[i][1] if bs else None))
    return out


def export_tensors(model, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(HF-named tensors, config.json quantization_config) of a quantized lmforge model in `fmt`."""
    cfg = model.config
    qcfg = cfg.extra["quantization_config"]
    bits = int(qcfg["bits"])
    check_exportable(cfg, bits, fmt)
    if qcfg.get("embedding") or "lm_head" in qcfg.get("modules", ()) and not cfg.tie_embeddings:
        raise UserError(f"--format {fmt}: the embeddings and the output projection stay in float there")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    float_dtype = model.tok_emb.weight.dtype
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in hf.layout(cfg):  # everything not quantized, as in a float checkpoint
        if ours in sd:
            out.update(hf.to_hf_tensors(cfg, sd[ours], theirs, how))
    sizes = set()
    for mod, q, z, s, b, G, bias in _per_hf_module(cfg, model):
        N, K = q.shape
        sizes.add(G)
        if fmt == "compressed-tensors":
            out[f"{mod}.weight_packed"] = pack_words(q, b, dim=1)
            out[f"{mod}.weight_scale"] = s.to(float_dtype)  # bf16 values: exact in the model's dtype
            out[f"{mod}.weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
        else:
            if N % 8:
                raise UserError(f"--format {fmt}: {mod} has {N} outputs, not a multiple of 8")
            st = s.t().to(torch.float16).contiguous()  # (K/G, N); bf16 values >= 2^-14: exact
            zt = z.t()
            if fmt == "gptq":
                out[f"{mod}.qweight"] = pack_words(q.t(), 4, dim=0)  # (K/8, N)
                out[f"{mod}.qzeros"] = pack_words(zt - 1, 4, dim=1)  # v1: stored minus one
                out[f"{mod}.g_idx"] = (torch.arange(K) // G).to(torch.int32)
            else:
                out[f"{mod}.qweight"] = pack_words(q.t(), 4, dim=1, order=AWQ_ORDER)  # (K, N/8)
                out[f"{mod}.qzeros"] = pack_words(zt, 4, dim=1, order=AWQ_ORDER)
            out[f"{mod}.scales"] = st
        if bias is not None:
            out[f"{mod}.bias"] = bias.to(float_dtype)
    if len(sizes) > 1:
        raise UserError(f"--format {fmt}: every layer must use the same group size (got {sorted(sizes)})")
    G = sizes.pop() if sizes else qcfg.get("group_size")
    return {k: v.contiguous().cpu() for k, v in out.items()}, _format_config(fmt, bits, G, qcfg)


def _format_config(fmt: str, bits: int, G: int | None, qcfg: dict) -> dict:
    made_by = {"made_by": "lmforge", "algorithm": qcfg.get("algorithm", "rtn")}
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": G,
            "desc_act": False,
            "sym": True,
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "checkpoint_format": "gptq",
            "lm_head": False,
            "meta": made_by,
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": bits,
            "group_size": G,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
            "meta": made_by,
        }
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if bits == 4 else "channel",
        "group_size": G if bits == 4 else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
        "meta": made_by,
    }


# --------------------------------------------------------------------------------------------- import
class ConvertedTensors:
    """The tensors of an ecosystem directory as lmforge's own format (what load_quantized reads) or as
    float weights (what a plain load reads): the interface of checkpoint._TensorFiles."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.where = dict.fromkeys(tensors, "(converted)")

    def get(self, name):
        return self.tensors.get(name)

    def names(self) -> set[str]:
        return set(self.tensors)


def _ct_scheme(qcfg: dict, path) -> dict:
    """The weights scheme of a compressed-tensors config (one group of Linear targets)."""
    groups = qcfg.get("config_groups") or {}
    if qcfg.get("format") not in ("pack-quantized", "int-quantized", "naive-quantized") or len(groups) != 1:
        raise UserError(
            f"{path}: compressed-tensors format {qcfg.get('format')!r} with {len(groups)} config groups is "
            "not read by lmforge (it reads one group of int weights, pack-quantized or int-quantized)"
        )
    g = next(iter(groups.values()))
    w = g.get("weights") or {}
    if w.get("type") != "int" or g.get("input_activations") or w.get("actorder") not in (None, "static"):
        raise UserError(
            f"{path}: compressed-tensors scheme {g} is not a weight-only int scheme lmforge reads"
        )
    return w


def _decode(qcfg: dict, files, mod: str, path):
    """(codes (N, K) int64, zeros (N, K/G) int64, scales (N, K/G) fp32, bits, note) of one HF linear
    layer stored in an ecosystem format, or None when the file holds it in float."""
    method = qcfg["quant_method"]
    if method == "compressed-tensors":
        w = _ct_scheme(qcfg, path)
        bits = int(w["num_bits"])
        s = files.get(f"{mod}.weight_scale")
        if s is None:
            return None
        packed = files.get(f"{mod}.weight_packed")
        if packed is not None:
            shape = files.get(f"{mod}.weight_shape")
            N, K = (
                (int(v) for v in shape)
                if shape is not None
                else (packed.shape[0], packed.shape[1] * 32 // bits)
            )
            q = unpack_words(packed, bits, dim=1)[:, :K]
        else:  # int-quantized: the int8 codes as they are
            q = files.get(f"{mod}.weight").to(torch.int64) + (1 << (bits - 1))
        s = s.float().reshape(q.shape[0], -1)
        zp = files.get(f"{mod}.weight_zero_point")
        if zp is not None and not w.get("symmetric", True):
            z = (
                unpack_words(zp, bits, dim=0)[: q.shape[0]]
                if zp.dtype == torch.int32
                else zp.to(torch.int64) + (1 << (bits - 1))
            )
            z = z.reshape(s.shape)
        else:
            z = torch.full(s.shape, 1 << (bits - 1), dtype=torch.int64)
        return q, z, s, bits, None
    bits = int(qcfg.get("bits", 4))
    qweight = files.get(f"{mod}.qweight")
    if qweight is None:
        return None
    if bits != 4:
        raise UserError(f"{path}: {method} with {bits} bits is not read by lmforge (it reads 4-bit {method})")
    scales = files.get(f"{mod}.scales").float()  # (K/G, N)
    qzeros = files.get(f"{mod}.qzeros")
    note = None
    if method == "gptq":
        q = unpack_words(qweight, 4, dim=0).t()  # (N, K)
        z = unpack_words(qzeros, 4, dim=1)  # (K/G, N)
        if qcfg.get("checkpoint_format", "gptq") == "gptq":
            z = (z + 1) & 0xF  # GPTQ v1 stores zeros minus one (a zero of 0 wraps to 15, as its kernels read)
        z = z.t()  # (N, K/G)
        K = q.shape[1]
        g_idx = files.get(f"{mod}.g_idx")
        G = int(qcfg.get("group_size") or K)
        G = K if G < 0 else G
        if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(K) // G):
            # act-order: input k uses group g_idx[k]; expand to one (scale, zero) per input
            gi = g_idx.to(torch.int64)
            return q, z[:, gi], scales.t()[:, gi], 4, "act-order groups (g_idx)"
    else:
        q = unpack_words(qweight, 4, dim=1, order=AWQ_ORDER).t()
        z = unpack_words(qzeros, 4, dim=1, order=AWQ_ORDER).t()
        if not qcfg.get("zero_point", True):
            z = torch.full_like(z, 8)
    return q, z, scales.t().contiguous(), 4, note


def dequantize(q, z, s) -> torch.Tensor:
    """w = (q - z) * s in fp32, (N, K), for per-channel or per-group z and s (N, K/G)."""
    N, K = q.shape
    G = K // s.shape[1]
    w = (q.view(N, K // G, G) - z[..., None]).float() * s[..., None]
    return w.view(N, K)


def _as_lmforge(q, z, s, bits):
    """lmforge's tensors (qweight, scales[, zeros]) when the grid is exactly theirs, else None."""
    sb = s.to(_BF16)
    if not torch.equal(sb.float(), s):
        return None
    if bits == 8:
        if s.shape[1] != 1 or not bool((z == 128).all()):
            return None
        return {"qweight": (q - 128).to(torch.int8), "scales": sb[:, 0]}
    if s.shape[1] == q.shape[1] or q.shape[1] // s.shape[1] not in (32, 64, 128, 256):
        return None
    zero = (8 - z).float() * s  # exact in fp32: a 4-bit integer times an fp16/bf16 value
    zb = zero.to(_BF16)
    if not torch.equal(zb.float(), zero):
        return None
    qc = q.to(torch.uint8)
    return {"qweight": qc[:, 0::2] | (qc[:, 1::2] << 4), "scales": sb, "zeros": zb}


def import_tensors(path, cfg, files):
    """(cfg, tensors) for checkpoint.load_model from an ecosystem directory: lmforge's own int4/int8
    format when every quantized layer's grid is exactly one lmforge stores, else float weights (a
    warning says which and why)."""
    qcfg = cfg.extra["quantization_config"]
    method = qcfg["quant_method"]
    if cfg.family in ("gpt", "gpt2") or cfg.n_experts:
        raise UserError(f"{path}: {method} checkpoints of {cfg.family} are not read by lmforge")
    rows = {ours.rsplit(".", 1)[0]: (theirs, how) for ours, theirs, how in hf.layout(cfg)}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    layers = {}  # our layer name -> (how, [(HF module, decoded)])
    for ours, (theirs, how) in rows.items():
        mods = [n.rsplit(".", 1)[0] for n in theirs]
        if not theirs[0].endswith(".weight") or files.get(theirs[0]) is not None:
            continue
        dec = [_decode(qcfg, files, mod, path) for mod in mods]
        if all(d is None for d in dec):
            continue
        if any(d is None for d in dec):
            raise UserError(f"{path}: {ours}: some of {', '.join(mods)} are quantized and some are not")
        layers[ours] = (theirs, how, mods, dec)
        for mod in mods:
            used.update(n for n in files.names() if n.startswith(mod + ".") and not n.endswith(".bias"))
    if not layers:
        raise UserError(f"{path}: config.json says {method} but no quantized tensors were found")
    native: dict | None = {}
    why = None
    for ours, (_, _, _, dec) in layers.items():
        notes = [d[4] for d in dec if d[4]]
        parts = [None if d[4] else _as_lmforge(*d[:4]) for d in dec]
        if any(p is None for p in parts):
            why = (
                notes[0]
                if notes
                else (
                    f"{ours}: scales bfloat16 cannot hold exactly, or a group size lmforge's kernels do not take"
                )
            )
            native = None
            break
        native[ours] = parts
    kinds = {ours.rsplit(".", 1)[-1] for ours in layers}
    bits = {d[3] for _, _, _, dec in layers.values() for d in dec}
    G = {d[0].shape[1] // d[2].shape[1] for _, _, _, dec in layers.values() for d in dec}
    n_block = sum(1 for _ in layers if _.startswith("blocks."))
    uniform = n_block == len(kinds & set(TARGETS)) * cfg.n_layers and len(bits) == 1
    for name in files.names():  # float tensors (embeddings, norms, biases, unquantized layers)
        if name not in used and not name.endswith(("weight_shape", "g_idx")):
            out[name] = files.get(name)
    if native is not None and uniform:
        b = bits.pop()
        for ours, parts in native.items():
            theirs, how, mods, _ = layers[ours]
            for mod, p in zip(mods, parts):
                out.update({f"{mod}.{k}": v for k, v in p.items()})
        method_name = "int8" if b == 8 else "int4"
        keep = ("embeddings",) + (() if "lm_head" in kinds else ("lm_head",))
        new = scheme(
            method_name, max(G) if b == 4 else None, keep, qcfg.get("meta", {}).get("algorithm", "rtn")
        )
        new["modules"] = sorted(kinds, key=lambda k: (TARGETS + ("lm_head",)).index(k))
        new["imported_from"] = method
        return cfg.replace(extra={**cfg.extra, "quantization_config": new}), ConvertedTensors(out)
    why = why or "not every block quantized the same way"
    for theirs, how, _, dec in layers.values():
        for n, d in zip(theirs, dec):
            w = dequantize(*d[:3])
            out[n] = w.t().contiguous() if how == "T" else w
    warnings.warn(
        f"{path}: {method} weights dequantized to float ({why}); lmforge's int4/int8 layers hold only grids "
        "they store exactly",
        stacklevel=3,
    )
    extra = {k: v for k, v in cfg.extra.items() if k != "quantization_config"}
    return cfg.replace(extra=extra), ConvertedTensors(out)


__all__ = [
    "FORMAT",
    "FORMATS",
    "ECOSYSTEM",
    "is_ecosystem",
    "check_exportable",
    "export_tensors",
    "import_tensors",
    "int4_params_symmetric",
    "dequantize",
]
