"""AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"): per-input-channel scales searched on
calibration activations, folded into the float weights before the ordinary group-wise rounding.

    for i, block, inputs in blocks_in_order(model, batches):
        report = awq_block(block, model.config, inputs, bits=4, group_for=lambda K: 64)
        ...round block i's linears to nearest (QuantLinear.from_float)...

A linear layer y = W x is rewritten y = (W diag(s)) (x / s): the same function before rounding, but the
input channels that carry large activations get larger weights, hence a finer share of their group's
int4 grid. s = mean|x|^alpha (normalised so that max(s) * min(s) = 1), alpha in [0, 1] searched on a
grid per group of linears sharing one input, minimising the squared error of what that group feeds
(the attention output for q/k/v, the MLP output for gate/up, the layer's own output for o and down)
with the group's weights rounded. alpha = 0 is s = 1, plain rounding, so on the calibration data the
search never does worse than round to nearest. Then, as in the reference, each layer's weights are
clipped per (row, group) to the shrink of [-max|w|, max|w|] that minimises its output error (q and k
rows excluded: their error passes through the softmax).

Where 1 / s goes, per family (the model stays exactly the same function, see tests/test_compress_awq.py):
- q/k/v (one fused wqkv) and gate/up (one fused w_in): into the norm in front of them (weight, and bias
  for LayerNorm; Gemma's (1 + w) as (1 + w) / s - 1). No norm in front (OLMo 2, whose norms sit on the
  sub-layer outputs; original GPT, normalised after the residual add): not scaled, only clipped.
- o: into the v rows of wqkv (attention is linear in v). With grouped-query attention the query heads
  that read one kv head share its scales (the reference skips GQA layers; sharing keeps the fold exact).
- down: into the up rows of w_in (act(gate) * up is linear in up), or for a plain MLP with ReLU into
  all of w_in (ReLU(z / s) = ReLU(z) / s for s > 0). A plain MLP with GELU / SiLU: not scaled (the
  reference divides the activation's output at run time, which our int4 format has no place for).
- Mixtral's experts stay in float (see quantize.py); only the attention is scaled there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.compress.qlinear import int4_codes, int4_params, int8_codes, int8_scales
from lmforge.model import MLP, Norm

GRID = 20  # alpha in 0, 1/20, ..., 1
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512  # max|w| * (1 - k/20) for k < 10, on 512 tokens
# The scale search's loss is measured on the first calibration batches up to this many tokens (the mean
# |x| it scales by uses them all): a CPU budget, ~10 s per layer of the SmolLM-135M shape on one core
SEARCH_TOKENS = 2048


@torch.no_grad()
def fake_quant(w: torch.Tensor, bits: int, group_size: int | None, params=int4_params) -> torch.Tensor:
    """w (N, K) rounded to the grid QuantLinear.from_float stores, and dequantized (float32). params:
    the int4 grid of a group (int4_params; formats.int4_params_symmetric for the GPTQ/AWQ formats)."""
    w = w.float()
    if bits == 8:
        s = int8_scales(w)
        return int8_codes(w, s).float() * s.float()[:, None]
    N, K = w.shape
    wg = w.view(N, K // group_size, group_size)
    s, z = params(wg)
    q = int4_codes(wg, s, z).float()
    return ((q - 8) * s.float()[..., None] + z.float()[..., None]).view(N, K)


# --------------------------------------------------------------------------------------------- groups
@dataclass
class Group:
    """A linear layer whose input channels get scales s, and where 1 / s is folded (exactly)."""

    name: str  # "attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out"
    linear: nn.Linear
    fold: Callable[[torch.Tensor], None]  # divides the producer of the layer's input by s (K,)
    inspect: str  # "attn", "mlp" or "linear": whose output error the search minimises
    # the scales are searched in a space of `tied` channels, expanded to the layer's K inputs
    # (GQA: one scale per kv channel for the query heads reading it); None = one per input
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None
    pool: Callable[[torch.Tensor], torch.Tensor] | None = None


def _fold_norm(norm: Norm) -> Callable[[torch.Tensor], None]:
    def fold(s):
        if norm.unit_offset:  # Gemma: y = rms(x) * (1 + w)
            norm.weight.copy_((1 + norm.weight.float()) / s - 1)
        else:
            norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)

    return fold


def _fold_rows(lin: nn.Linear, start: int) -> Callable[[torch.Tensor], None]:
    """Divide output rows start.. of `lin` (and its bias) by s."""

    def fold(s):
        lin.weight[start : start + len(s)].div_(s[:, None])
        if lin.bias is not None:
            lin.bias[start : start + len(s)].div_(s)

    return fold


@dataclass
class Plan:
    groups: list[Group] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be scaled exactly, and why


def plan(block, cfg) -> Plan:
    """The scalable groups of one block (in search order) and notes on the ones left unscaled."""
    p = Plan()
    attn, mlp = block.attn, block.mlp
    pre = not cfg.post_norm  # post-norm: the norms act after the residual add, nothing to fold into
    if pre and isinstance(block.attn_norm, Norm):
        p.groups.append(Group("attn.wqkv", attn.wqkv, _fold_norm(block.attn_norm), "attn"))
    else:
        p.notes.append("q/k/v not scaled: no norm right before them (post-norm, or OLMo 2's sub-layer norms)")
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // KV

    def expand(s):  # (KV hd,) -> (H hd,): query head h reads kv head h // G
        return s.view(KV, 1, hd).expand(KV, G, hd).reshape(H * hd)

    def pool(x):  # (H hd,) -> (KV hd,)
        return x.view(KV, G, hd).mean(1).reshape(KV * hd)

    p.groups.append(
        Group(
            "attn.wo",
            attn.wo,
            _fold_rows(attn.wqkv, cfg.q_dim + cfg.kv_dim),
            "linear",
            expand if G > 1 else None,
            pool if G > 1 else None,
        )
    )
    if not isinstance(mlp, MLP):
        p.notes.append("MoE experts stay in float: only the attention is scaled")
        return p
    if pre and isinstance(block.mlp_norm, Norm):
        p.groups.append(Group("mlp.w_in", mlp.w_in, _fold_norm(block.mlp_norm), "mlp"))
    else:
        p.notes.append(
            "gate/up not scaled: no norm right before them (post-norm, or OLMo 2's sub-layer norms)"
        )
    if mlp.glu:
        p.groups.append(Group("mlp.w_out", mlp.w_out, _fold_rows(mlp.w_in, cfg.d_ff), "linear"))
    elif cfg.act == "relu":
        p.groups.append(Group("mlp.w_out", mlp.w_out, _fold_rows(mlp.w_in, 0), "linear"))
    else:
        p.notes.append(f"down projection not scaled: {cfg.act} is not linear in the scale (plain MLP)")
    return p


@torch.no_grad()
def apply_scales(group: Group, s: torch.Tensor) -> None:
    """W -> W diag(s) and the producer of the input divided by s: the same function before rounding.
    s: the group's searched (tied) scales."""
    full = group.expand(s) if group.expand else s
    group.linear.weight.mul_(full[None, :])
    group.fold(s)


# --------------------------------------------------------------------------------------------- search
def _capture(block, inputs, tokens: int = SEARCH_TOKENS) -> dict:
    """What the block's sub-modules receive: "mean_abs" {linear: mean |x| per input channel (K,)} over
    every calibration batch, and for the first batches up to `tokens` tokens (the search's sample) the
    attention's positional arguments ("attn"), the MLP's input ("mlp") and each linear's input (B, T, K)."""
    lins = {"attn.wqkv": block.attn.wqkv, "attn.wo": block.attn.wo}
    if isinstance(block.mlp, MLP):
        lins |= {"mlp.w_in": block.mlp.w_in, "mlp.w_out": block.mlp.w_out}
    got: dict = {"attn": [], "mlp": [], **{n: [] for n in lins}}
    sums: dict[str, list] = {n: [0.0, 0] for n in lins}  # sum of |x| (K,), tokens
    keep = [True]

    def grab(name):
        def hook(module, args):
            x = args[0]
            if name in sums:
                acc = sums[name]
                acc[0] = acc[0] + x.detach().abs().reshape(-1, x.shape[-1]).float().sum(0)
                acc[1] += x.numel() // x.shape[-1]
            if keep[0]:
                got[name].append(args if name == "attn" else x)

        return hook

    mods = {"attn": block.attn, "mlp": block.mlp, **lins}
    hooks = [m.register_forward_pre_hook(grab(n)) for n, m in mods.items()]
    seen = 0
    try:
        for args in inputs:
            keep[0] = seen < tokens
            seen += args[0].shape[0] * args[0].shape[1]
            block(*args)
    finally:
        for h in hooks:
            h.remove()
    got["mean_abs"] = {n: acc[0] / max(acc[1], 1) for n, acc in sums.items()}
    return got


def _runner(block, group: Group, got) -> tuple[Callable[[int], torch.Tensor], int]:
    """(batch index -> the output the search compares, number of batches)."""
    if group.inspect == "attn":
        return (lambda b: block.attn(*got["attn"][b])), len(got["attn"])
    if group.inspect == "mlp":
        return (lambda b: block.mlp(got["mlp"][b])), len(got["mlp"])
    lin = group.linear
    xs = got[group.name]
    return (lambda b: F.linear(xs[b], lin.weight, lin.bias)), len(xs)


@torch.no_grad()
def search_scale(block, group: Group, got, bits: int, G: int | None, grid: int = GRID, params=int4_params):
    """(alpha, scales, loss at alpha, loss at alpha = 0) minimising the inspected output's squared error."""
    x_mean = got["mean_abs"][group.name]  # (K,)
    stat = group.pool(x_mean) if group.pool else x_mean
    run, n = _runner(block, group, got)
    target = [run(b) for b in range(n)]
    w0 = group.linear.weight.detach().clone()
    best, rtn = (float("inf"), 0.0, torch.ones_like(stat)), None
    try:
        for j in range(grid + 1):
            alpha = j / grid
            s = stat.clamp(min=1e-4).pow(alpha)  # alpha = 0: all ones, plain rounding
            s = s / (s.max() * s.min()).sqrt()
            full = group.expand(s) if group.expand else s
            group.linear.weight.copy_(fake_quant(w0 * full[None, :], bits, G, params) / full[None, :])
            loss = sum(float((run(b) - target[b]).float().pow(2).sum()) for b in range(n))
            if j == 0:
                rtn = loss
            if loss < best[0]:
                best = (loss, alpha, s)
    finally:
        group.linear.weight.copy_(w0)
    return best[1], best[2], best[0], rtn


@torch.no_grad()
def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, G: int | None, rows: slice = slice(None), params=int4_params
):
    """Per (row, group) clip bound for w (N, K) on inputs x (n, K), minimising each group's partial
    output error; rows outside `rows` keep their full range. Returns the clipped weights."""
    N, K = w.shape
    g = G or K  # int8: one group per row
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS].float().view(-1, K // g, g)  # (n, ng, g)
    out = w.detach().clone()
    ws = w[rows].float().view(-1, K // g, g)  # (r, ng, g)
    for r0 in range(0, ws.shape[0], 256):  # rows in chunks: (r, n, ng) partial outputs at a time
        wr = ws[r0 : r0 + 256]
        org = torch.einsum("rgk,ngk->rng", wr, x)
        amax = wr.abs().amax(-1, keepdim=True)  # (r, ng, 1)
        best_err = torch.full(amax.shape, float("inf"), device=w.device)
        best = amax.clone()
        for k in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            m = amax * (1 - k / CLIP_GRID)
            cw = torch.maximum(torch.minimum(wr, m), -m)
            q = fake_quant(cw.reshape(len(wr), K), bits, G, params).view_as(wr)
            err = (torch.einsum("rgk,ngk->rng", q, x) - org).pow(2).mean(1)[..., None]  # (r, ng, 1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        clipped = torch.maximum(torch.minimum(wr, best), -best).reshape(len(wr), K)
        idx = torch.arange(N, device=w.device)[rows][r0 : r0 + 256]
        out[idx] = clipped.to(out.dtype)
    return out


@torch.no_grad()
def awq_block(
    block,
    cfg,
    inputs,
    bits: int,
    group_for: Callable[[int], int | None],
    *,
    clip: bool = True,
    grid: int = GRID,
    params=int4_params,
) -> dict:
    """Search AWQ scales (and clip ranges) for one block and fold them into its float weights, in place;
    rounding the block's linears to nearest afterwards gives AWQ. `inputs`: the block's positional
    arguments per calibration batch (calibrate.blocks_in_order); group_for(K): the int4 group size of a
    layer with K inputs (None: the layer stays float); params: the int4 grid (see fake_quant). Returns {"alpha": {name: a}, "gain": {name: loss
    at alpha / loss at 0}, "notes": [...]}."""
    p = plan(block, cfg)
    got = _capture(block, inputs)
    rep: dict = {"alpha": {}, "gain": {}, "notes": p.notes}
    scaled: dict[str, torch.Tensor] = {}
    for group in p.groups:
        K = group.linear.in_features
        G = group_for(K) if bits == 4 else None
        if bits == 4 and G is None:
            continue  # stays float: nothing to protect
        alpha, s, loss, rtn = search_scale(block, group, got, bits, G, grid, params)
        apply_scales(group, s)
        scaled[group.name] = group.expand(s) if group.expand else s
        rep["alpha"][group.name] = alpha
        rep["gain"][group.name] = loss / rtn if rtn else 1.0
    if clip:
        mlp = block.mlp
        layers = {"attn.wqkv": block.attn.wqkv, "attn.wo": block.attn.wo}
        if isinstance(mlp, MLP):
            layers |= {"mlp.w_in": mlp.w_in, "mlp.w_out": mlp.w_out}
        for name, lin in layers.items():
            K = lin.in_features
            G = group_for(K) if bits == 4 else None
            if bits == 4 and G is None:
                continue
            x = torch.cat([x.reshape(-1, K) for x in got[name]])  # (n, K) as captured, before scaling
            if name in scaled:
                x = x / scaled[name]
            rows = slice(cfg.q_dim + cfg.kv_dim, None) if name == "attn.wqkv" else slice(None)  # v only
            lin.weight.copy_(search_clip(lin.weight, x, bits, G, rows, params))
    return rep
