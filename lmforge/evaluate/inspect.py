"""`lmforge inspect`: what a model does with a prompt, as pictures.

    r = inspect_prompt(model, tok, "def add(a, b):\\n    return", "runs/q/inspect")

Writes to the output directory:
- token_loss.png            the loss of every prompt token (which tokens surprised the model), in bits
- attention_layer_NN.png    the attention probabilities of every head of layer NN (query rows, key columns)
- next_token.png            the most likely next tokens after the prompt, with their probabilities
- rope.png                  RoPE: the cos table over positions and frequencies, and each frequency's
                            wavelength; positions.png (similarity of the position embeddings) for
                            models with learned positions
- inspect.json              the numbers behind the pictures

Attention probabilities are not returned by scaled_dot_product_attention, so they are re-derived:
a forward pre-hook on every `blocks[i].attn` receives exactly the inputs the layer gets (hidden
states, RoPE angles, mask), recomputes q and k with the layer's own `project` (projection, q/k norms,
RoPE), and takes softmax of the layer's scaled (and, for Gemma 2, soft-capped) scores under the same
mask (causal, sliding window). The model itself is not changed.
"""

from __future__ import annotations

import inspect as _pyinspect
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.evaluate.tasks import encode
from lmforge.model import rope_inv_freq
from lmforge.utils import UserError, atomic_write_text


@torch.no_grad()  # not inference_mode: callers may mix the results with other tensors freely
def attention_probs(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward ids (B, T) through the model; returns logits (B, T, V) and, per layer, the attention
    probabilities (B, H, T, T) in float32 (rows sum to 1; zero above the diagonal)."""
    probs: list[torch.Tensor | None] = [None] * len(model.blocks)

    def make_hook(i):
        def hook(module, args, kwargs):
            sig = _pyinspect.signature(module.forward).bind(*args, **kwargs)
            a = sig.arguments
            x, rope, mask, is_causal, cache = a["x"], a["rope"], a["mask"], a["is_causal"], a.get("cache")
            if cache is not None:
                raise UserError("attention maps are computed without a KV cache")
            B, T, _ = x.shape
            H, KV = module.n_heads, module.n_kv
            q, k, _v = module.project(x, rope)  # the layer's own q/k (norms and RoPE included)
            k = k.repeat_interleave(H // KV, dim=1)  # GQA: query head h reads key head h // (H / KV)
            scores = (q.float() @ k.float().transpose(-1, -2)) * module.scale  # (B, H, T, S)
            if module.softcap is not None:  # Gemma 2
                scores = torch.tanh(scores / module.softcap) * module.softcap
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif is_causal:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            probs[i] = scores.softmax(dim=-1)

        return hook

    handles = [
        b.attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(model.blocks)
    ]
    try:
        logits = model(ids)
    finally:
        for h in handles:
            h.remove()
    return logits, probs  # type: ignore[return-value]


def token_label(tokenizer, i: int) -> str:
    """A token as a short printable label: spaces as ·, newlines as \\n, $ escaped for matplotlib."""
    if int(i) in set(tokenizer.special_tokens.values()):
        s = tokenizer.id_to_token(int(i)) or str(i)
    else:
        s = tokenizer.decode([int(i)])
    s = s.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return s.replace("$", r"\$") or f"<{i}>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_token_loss(path, labels: list[str], bits: np.ndarray) -> Path:
    plt = _plt()
    T = len(labels)
    fig = plt.figure(figsize=(min(max(8.0, 0.32 * T + 2), 40.0), 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    shown = np.nan_to_num(bits, nan=0.0)
    colors = plt.get_cmap("magma_r")(
        np.clip(shown / max(float(np.nanmax(bits)) if T > 1 else 1.0, 1e-9), 0, 1) * 0.85
    )
    ax.bar(range(T), shown, color=colors)
    ax.set_xticks(range(T))
    ax.set_xticklabels(labels, rotation=90, fontsize=8)
    ax.set_ylabel("loss (bits)")
    mean = float(np.nanmean(bits)) if T > 1 else float("nan")
    ax.set_title(f"Per-token loss: which tokens surprised the model (mean {mean:.2f} bits/token)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path), plt)


def plot_attention(path, layer: int, probs: np.ndarray, labels: list[str]) -> Path:
    """probs (H, T, T) of one layer: one panel per head."""
    plt = _plt()
    H, T, _ = probs.shape
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    fig = plt.figure(figsize=(3.2 * cols + 1.2, 3.2 * rows + 0.8), dpi=100, layout="constrained")
    for h in range(H):
        ax = fig.add_subplot(rows, cols, h + 1)
        im = ax.imshow(probs[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        if T <= 24:
            ax.set_xticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T))
            ax.set_yticklabels(labels, fontsize=6)
        else:
            ax.tick_params(labelsize=6)
    fig.suptitle(f"Attention probabilities, layer {layer} (rows: queries, columns: keys)")
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label="probability")
    return _save(fig, Path(path), plt)


def plot_next_tokens(path, labels: list[str], probs: list[float]) -> Path:
    plt = _plt()
    fig = plt.figure(figsize=(7, 0.35 * len(labels) + 1.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(labels))[::-1]
    ax.barh(y, probs, color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    for yi, p in zip(y, probs):
        ax.text(p, yi, f" {p:.3f}", va="center", fontsize=8)
    ax.set_xlim(0, min(1.0, max(probs) * 1.25 + 1e-3))
    ax.set_xlabel("probability")
    ax.set_title("Most likely next tokens")
    fig.tight_layout()
    return _save(fig, Path(path), plt)


def plot_rope(path, model, max_positions: int = 256) -> Path:
    """The cos table (positions x frequency index) and each frequency's wavelength in tokens."""
    plt = _plt()
    cfg = model.config
    inv = rope_inv_freq(cfg).double()
    P = min(max_positions, cfg.max_seq_len)
    cos = model.rope_cos[:P].float().cpu().numpy()  # (P, hd/2)
    fig = plt.figure(figsize=(12, 4.5), dpi=100)
    ax = fig.add_subplot(1, 2, 1)
    im = ax.imshow(cos.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("frequency index i (pair i, i + hd/2)")
    ax.set_title(f"RoPE cos(position x freq_i), first {P} positions")
    fig.colorbar(im, ax=ax)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.semilogy(range(len(inv)), (2 * math.pi / inv).numpy(), marker="o", ms=3)
    ax2.axhline(cfg.max_seq_len, color="gray", ls="--", lw=1, label=f"context {cfg.max_seq_len}")
    ax2.set_xlabel("frequency index i")
    ax2.set_ylabel("wavelength (tokens)")
    scaling = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) if cfg.rope_scaling else "none"
    ax2.set_title(f"theta = {cfg.rope_theta:g}, scaling: {scaling}")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path), plt)


def plot_positions(path, model, max_positions: int = 256) -> Path:
    """Learned positions: cosine similarity between the embeddings of positions."""
    plt = _plt()
    P = min(max_positions, model.config.max_seq_len)
    e = model.pos_emb.weight[:P].float().detach().cpu()
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    fig = plt.figure(figsize=(6.5, 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow((e @ e.T).numpy(), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    ax.set_title(f"Learned position embeddings: cosine similarity (first {P})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, Path(path), plt)


def inspect_prompt(
    model,
    tokenizer,
    prompt: str,
    out,
    *,
    top_k: int = 10,
    layers: list[int] | None = None,
) -> dict:
    """Write the pictures of the module docstring for `prompt` under `out`; return their numbers."""
    tok = tokenizer
    if tok is None:
        raise UserError("this checkpoint has no tokenizer (tokenizer.json); inspect needs one to show tokens")
    ids = encode(tok, prompt)
    if not ids:
        raise UserError("the prompt is empty")
    if len(ids) > model.config.max_seq_len:
        raise UserError(
            f"the prompt is {len(ids)} tokens, longer than the model's context of {model.config.max_seq_len}; "
            "shorten it"
        )
    n_layers = len(model.blocks)
    layers = list(range(n_layers)) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"--layers {bad}: the model has layers 0..{n_layers - 1}")
    out = Path(os.path.expanduser(str(out)))
    out.mkdir(parents=True, exist_ok=True)
    x = torch.tensor([ids], dtype=torch.long, device=model.tok_emb.weight.device)
    logits, probs = attention_probs(model, x)
    logp = logits[0].float().log_softmax(-1)  # (T, V)
    nats = np.full(len(ids), np.nan)
    nats[1:] = (-logp[:-1].gather(-1, x[0, 1:, None])[:, 0]).cpu().numpy()
    bits = nats / math.log(2)
    labels = [token_label(tok, i) for i in ids]
    p_next = logp[-1].exp()
    top = p_next.topk(min(top_k, p_next.numel()))
    top_ids, top_p = top.indices.tolist(), top.values.tolist()
    with warnings.catch_warnings():  # glyphs DejaVu Sans lacks (CJK, emoji) draw as boxes; no need to warn
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        files = [plot_token_loss(out / "token_loss.png", labels, bits)]
        for i in layers:
            probs_i = probs[i][0].cpu().numpy()
            files.append(plot_attention(out / f"attention_layer_{i:02d}.png", i, probs_i, labels))
        files.append(plot_next_tokens(out / "next_token.png", [token_label(tok, i) for i in top_ids], top_p))
        if model.config.pos_emb == "rope":
            files.append(plot_rope(out / "rope.png", model))
        else:
            files.append(plot_positions(out / "positions.png", model))
    result = {
        "prompt": prompt,
        "tokens": [tok.decode([i]) for i in ids],
        "ids": ids,
        "loss_bits": [None if math.isnan(b) else float(b) for b in bits],
        "mean_loss_bits": float(np.nanmean(bits)) if len(ids) > 1 else None,
        "next_tokens": [{"id": i, "token": tok.decode([i]), "prob": p} for i, p in zip(top_ids, top_p)],
        "files": [f.name for f in files],
    }
    atomic_write_text(out / "inspect.json", json.dumps(result, indent=2, ensure_ascii=False))
    return result
