"""`lmforge quantize`: weight-only int8 / int4 quantization of a checkpoint.

    lm = lmforge.load("runs/tiny/final")
    quantize_model(lm.model, "int4", group_size=64)                  # in place, round to nearest
    quantize("runs/tiny/final", "runs/tiny-int4", method="int4", calibration_data="python-docs")  # GPTQ

Notable features
- int8 per output channel (symmetric), int4 per group of 32/64/128/256 inputs (asymmetric: a scale and
  a zero per group), packed two per byte on disk; the formats and kernels are in qlinear.py
- the four linear layers of every block, and the output projection when it is not tied; the embedding
  table as int8 rows (a tied output projection then runs on the same int8 table). Norms, biases and
  learned positions stay in float, as do Mixtral's experts (stacked (E, ...) tensors, not linear layers)
- round to nearest by default; with calibration data, GPTQ (Frantar et al. 2022): each block is
  quantized column by column, the rounding error of each column pushed onto the columns not yet
  quantized through the inverse Hessian of the layer's inputs, block after block on the outputs of the
  already quantized blocks
- the result is an ordinary lmforge checkpoint directory: config.json carries `quantization_config`,
  and `lmforge.load` (so generate, chat, evaluate, bench, report and serve) runs it directly
"""

from __future__ import annotations

import time
from typing import Literal

import torch
import torch.nn as nn

from lmforge.checkpoint import save_model
from lmforge.compress.awq import awq_block
from lmforge.compress.formats import check_exportable, int4_params_symmetric
from lmforge.compress.qlinear import (
    QuantEmbedding,
    QuantizedTransformer,
    QuantLinear,
    TiedQuantHead,
    int4_codes,
    int4_params,
    int8_codes,
    int8_scales,
    target_linears,
)
from lmforge.compress.scheme import METHODS, PARTS, scheme
from lmforge.kernels.quant import GROUP_SIZES
from lmforge.outputs import check_output
from lmforge.utils import UserError

ALGORITHMS = ("rtn", "gptq", "awq")


def _group_for(K: int, G: int | None) -> int | None:
    """The int4 group size for a layer with K inputs: G, else the largest smaller one that divides K."""
    if G is None:
        return None
    for g in sorted((g for g in GROUP_SIZES if g <= G), reverse=True):
        if K % g == 0:
            return g
    return None


# --------------------------------------------------------------------------------------------- GPTQ
@torch.no_grad()
def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None,
    percdamp: float = 0.01,
    blocksize: int = 128,
    params=int4_params,
):
    """GPTQ codes for weight w (N, K) given the input second moment H = E[x x^T] (K, K).

    Returns (q, scales) for int8 or (q, scales, zeros) for int4, in the layouts QuantLinear.from_float
    takes. Column order is the natural one (no act-order), so groups stay contiguous. params: the int4
    grid of a group, int4_params (asymmetric) or formats.int4_params_symmetric.
    """
    W = w.detach().float().clone()
    N, K = W.shape
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(K, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # (K, K) upper
    except RuntimeError:  # not positive definite even with damping: plain rounding is the safe answer
        return None
    Q = torch.zeros(N, K, dtype=torch.uint8 if bits == 4 else torch.int8, device=W.device)
    if bits == 8:
        scales = int8_scales(W)
        sc, zeros = scales, None
    else:
        G = group_size
        scales = torch.empty(N, K // G, dtype=torch.bfloat16, device=W.device)
        zeros = torch.empty_like(scales)
        blocksize = max(blocksize // G, 1) * G  # whole groups per block
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if bits == 4 and col % G == 0:  # a new group: its grid from the weights as updated so far
                s, z = params(W1[:, i : i + G])
                scales[:, col // G], zeros[:, col // G] = s, z
            wc = W1[:, i]
            if bits == 8:
                q = int8_codes(wc[:, None], sc)[:, 0]
                deq = q.float() * sc.float()
            else:
                g = col // G
                q = int4_codes(wc[:, None], scales[:, g], zeros[:, g])[:, 0]
                deq = (q.float() - 8) * scales[:, g].float() + zeros[:, g].float()
            Q[:, col] = q
            err = (wc - deq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return (Q, scales) if bits == 8 else (Q, scales, zeros)


# --------------------------------------------------------------------------------------------- models
@torch.no_grad()
def quantize_model(
    model,
    method: str = "int8",
    group_size: int | None = 64,
    *,
    keep_float=(),
    calibration: list[torch.Tensor] | None = None,
    algorithm: str | None = None,
    format: str = "lmforge",
    log=print,
):
    """Quantize `model` in place (round to nearest; GPTQ or AWQ on `calibration` batches of token ids;
    algorithm None = GPTQ when calibration is given, else round to nearest) and record the scheme in
    model.config.extra["quantization_config"]. Returns the model.
    format: the checkpoint format it will be saved in; gptq / awq / compressed-tensors put int4 on the
    symmetric grid those formats hold exactly and keep the embeddings and output projection in float."""
    cfg = model.config
    if cfg.extra.get("quantization_config"):
        raise UserError("this model is already quantized; quantize the original checkpoint instead")
    algorithm = algorithm or ("gptq" if calibration is not None else "rtn")
    if algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if algorithm != "rtn" and calibration is None:
        raise UserError(f"--algorithm {algorithm} needs --calibration-data")
    if algorithm == "rtn":
        calibration = None
    ecosystem = format != "lmforge"
    check_exportable(cfg, METHODS.get(method, 0), format)
    if ecosystem and set(PARTS) - set(keep_float):
        log(f"note: --format {format}: the embeddings and the output projection stay in float")
        keep_float = PARTS
    qcfg = scheme(method, group_size, tuple(keep_float), algorithm, symmetric=ecosystem)
    bits = qcfg["bits"]
    params = int4_params_symmetric if ecosystem else int4_params
    if cfg.n_experts:
        log(
            f"note: the {cfg.n_experts} experts of each MoE layer stay in float (stacked (E, ...) tensors, "
            "not linear layers); attention and the output projection are quantized"
        )
    model.eval()
    targets = target_linears(model, qcfg)

    def convert(name, parent, attr, codes_fn=None):
        lin = getattr(parent, attr)
        K = lin.in_features
        G = _group_for(K, group_size) if bits == 4 else None
        kernel_ok = bits == 8 or G is not None
        if ecosystem and bits == 4 and G != group_size:
            raise UserError(
                f"--format {format}: {name} has {K} inputs, not a multiple of --group-size {group_size} "
                "(the format has one group size); choose a group size that divides every layer's inputs"
            )
        if not kernel_ok:
            qcfg["not_quantized"].append(name)
            log(f"note: {name} stays in float: its {K} inputs are not a multiple of any int4 group size")
            return
        if bits == 4 and G != group_size:
            log(f"note: {name} uses int4 groups of {G} ({K} inputs are not a multiple of {group_size})")
        codes = codes_fn(lin, G) if codes_fn else None
        if codes is None and bits == 4 and ecosystem:  # round to nearest on the symmetric grid
            wg = lin.weight.float().view(lin.out_features, K // G, G)
            s, z = int4_params_symmetric(wg)
            codes = (int4_codes(wg, s, z).view(lin.out_features, K), s, z)
        setattr(parent, attr, QuantLinear.from_float(lin.weight, lin.bias, bits, G, codes=codes))

    if calibration is None:
        for name, parent, attr in targets:
            convert(name, parent, attr)
    else:
        from lmforge.compress.calibrate import blocks_in_order, input_stats

        t0 = time.perf_counter()
        alphas, notes = [], set()  # AWQ: the searched scale exponents, and what it could not scale
        by_block: dict[int, list] = {}
        for name, parent, attr in targets:
            if name.startswith("blocks."):
                by_block.setdefault(int(name.split(".")[1]), []).append((name, parent, attr))
        for i, block, inputs in blocks_in_order(model, calibration):
            layers = by_block.get(i, [])
            if algorithm == "awq":  # scales folded into the float weights, then round to nearest
                rep = awq_block(block, cfg, inputs, bits, lambda K: _group_for(K, group_size), params=params)
                alphas += list(rep["alpha"].values())
                notes.update(rep["notes"])
                for name, parent, attr in layers:
                    convert(name, parent, attr)
                continue
            mods = {name: getattr(parent, attr) for name, parent, attr in layers}
            stats = input_stats(mods, lambda block=block, inputs=inputs: [block(*a) for a in inputs])
            for name, parent, attr in layers:
                H = stats[name][0]

                def codes_fn(lin, G, H=H):
                    return gptq(lin.weight, H, bits, G, params=params)

                convert(name, parent, attr, codes_fn)
        for name, parent, attr in targets:  # the output projection: round to nearest
            if not name.startswith("blocks."):
                convert(name, parent, attr)
        n_tok = sum(b.numel() for b in calibration)
        what = f"{algorithm.upper()} on {len(calibration)} batches ({n_tok:,} tokens)"
        if algorithm == "awq":
            what += f", scale exponents {min(alphas):.2f}-{max(alphas):.2f}" if alphas else ""
            for note in sorted(notes):
                log(f"note: AWQ: {note}")
        log(f"{what} in {time.perf_counter() - t0:.1f}s")
    if qcfg["embedding"] == "int8":
        emb = QuantEmbedding.from_float(model.tok_emb.weight)
        model.tok_emb = emb
        if cfg.tie_embeddings:
            model.lm_head = TiedQuantHead(emb)
    model.config.extra = {**cfg.extra, "quantization_config": qcfg}
    model.__class__ = QuantizedTransformer
    return model


def quantization_error(model_q, reference) -> dict[str, float]:
    """Largest |w - ŵ| / scale of every quantized layer of model_q against the float `reference` model
    (round to nearest: at most 0.5)."""
    ref = dict(reference.named_modules())
    out = {}
    for name, m in model_q.named_modules():
        if isinstance(m, QuantLinear) and isinstance(ref.get(name), nn.Linear):
            w = ref[name].weight.float()
            err = (w - m.dequantize()).abs()
            if m.bits == 8:
                s = m.scales.float()[:, None].expand_as(w)
            else:
                s = m.scales.float().repeat_interleave(m.group_size, dim=1)
            out[name] = float((err / s).max())
    return out


# --------------------------------------------------------------------------------------------- command
def quantize(
    checkpoint,
    out,
    method: Literal["int8", "int4"] = "int8",
    group_size: Literal[32, 64, 128, 256] = 64,
    *,
    keep_float: tuple[str, ...] = (),
    calibration_data: str | None = None,
    calibration_samples: int = 128,
    calibration_seq_len: int = 256,
    algorithm: Literal["rtn", "gptq", "awq"] | None = None,
    format: Literal["lmforge", "gptq", "awq", "compressed-tensors"] = "lmforge",
    seed: int = 0,
    eval_data: str | None = "python-docs",
    eval_tokens: int = 20_000,
    device: str = "auto",
    force: bool = False,
    log=print,
) -> dict:
    """What `lmforge quantize` does: load, quantize, save to `out`, then compare before and after
    (size, bits per byte on eval_data's validation split, decode speed). Returns the summary.

    Args:
        checkpoint: an lmforge or Hugging Face model directory (float weights)
        out: directory for the quantized checkpoint
        method: int8 or int4 weights
        group_size: int4: inputs per (scale, zero) group; smaller is more accurate and larger
        keep_float: comma-separated parts to leave in float: embeddings (the token table, and a tied
            output projection), lm_head (an untied output projection) (default: none)
        calibration_data: a source (e.g. python-docs) or `data prepare` directory: refine the rounding
            with GPTQ (or AWQ, see --algorithm) on its training split (default: none, round to nearest)
        calibration_samples: GPTQ/AWQ: sequences to calibrate on
        calibration_seq_len: GPTQ/AWQ: tokens per sequence
        algorithm: rtn (round to nearest), gptq or awq (default: gptq with --calibration-data, else rtn)
        format: how the checkpoint stores its weights: lmforge (lmforge only), or gptq / awq (int4) and
            compressed-tensors (int8 or int4), which transformers and vLLM load
        seed: seed for picking calibration sequences
        eval_data: source (or `data prepare` directory) whose validation split gives bits per byte before
            and after
        eval_tokens: tokens scored for bits per byte
        device: cuda, cpu or auto (where quantizing and the checks run)
        force: replace what --out holds (a model directory, or anything else that is not an input)
    """
    import lmforge
    from lmforge.compress.summary import compare_models, format_summary

    out = check_output(out, "model", force=force, inputs=(checkpoint, calibration_data, eval_data))
    lm = lmforge.load(checkpoint, device=device, dtype=torch.float32)
    calibration = None
    if calibration_data and algorithm != "rtn":
        from lmforge.compress.calibrate import calibration_batches

        seq_len = min(calibration_seq_len, lm.config.max_seq_len)
        calibration = calibration_batches(
            calibration_data, lm.tokenizer, samples=calibration_samples, seq_len=seq_len, seed=seed
        )
    t0 = time.perf_counter()
    quantize_model(
        lm.model,
        method,
        group_size,
        keep_float=keep_float,
        calibration=calibration,
        algorithm=algorithm,
        format=format,
        log=log,
    )
    save_model(lm.model, out, tokenizer=lm.tokenizer, format=format)
    q = lm.config.extra["quantization_config"]
    what = f"int{q['bits']}" + (f" (groups of {q['group_size']})" if q["bits"] == 4 else " (per channel)")
    where = f"{format} format, " if format != "lmforge" else ""
    log(
        f"quantized {checkpoint} to {what}, {q['algorithm']}, {where}in {time.perf_counter() - t0:.1f}s -> {out}"
    )
    del lm
    summary = compare_models(checkpoint, out, eval_data=eval_data, eval_tokens=eval_tokens, device=device)
    log(format_summary(summary))
    return summary
