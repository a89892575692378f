"""The decoder: one config-driven model for gpt, gpt2, llama, mistral, mixtral and gemma.

Notable features
- every family is the same code with different switches (see config.FAMILIES): learned or rotary
  positions, pre- or post-norm, LayerNorm or RMSNorm (Gemma's (1 + w)), GELU MLP or gated (SwiGLU /
  GeGLU), projection biases, tied embeddings, embedding scaling, sliding windows, sparse MoE
- fused q/k/v and gate/up projections (fewer, larger matmuls); HF names are mapped in checkpoint.py
- grouped-query attention through scaled_dot_product_attention (no K/V repetition)
- a static KV cache (cache.py) with per-row positions: left padding and continuous batching give the
  same numbers as running each row alone; decode steps never concatenate tensors
- MoE experts stored as (E, ...) tensors and dispatched expert by expert over the tokens routed to
  them (a loop over experts, never over tokens); Mixtral's load-balancing loss
- can be built on the meta device and materialised later, so a 7B config costs nothing to inspect
- the training loss never holds the (B, T, V) logits: output projection and cross-entropy run in row
  chunks, with d loss / d logits used at once (linear_cross_entropy)

Shapes: B batch, T tokens in this call, S keys attended to, d model width, H query heads,
KV key/value heads, hd head size, E experts, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.cache import KVCache, make_mask, positions_from_valid
from lmforge.config import ModelConfig

ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class Norm(nn.Module):
    """LayerNorm, or RMSNorm computed in fp32 like the reference (Gemma: scale by 1 + w)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps, self.unit_offset = cfg.norm, cfg.norm_eps, cfg.norm_unit_offset
        self.weight = nn.Parameter(torch.empty(cfg.d_model))
        self.bias = nn.Parameter(torch.empty(cfg.d_model)) if cfg.norm == "layernorm" else None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        if x.dtype == self.weight.dtype == torch.float32 and not self.unit_offset:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same, in one call
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.unit_offset:  # Gemma multiplies in fp32, then casts
            return (y * (1.0 + self.weight.float())).type_as(x)
        return self.weight * y.type_as(x)  # Llama casts, then multiplies


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (hd/2,), with HF's linear or llama3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv  # "default"


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables for apply_rope from the angles' cos/sin (..., hd/2): [cos, cos], [-sin, sin]."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hd/2) of x (..., hd) by the angles whose full-width tables
    (rope_tables) broadcast against x: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], i.e.
    x * [cos, cos] + [x2, x1] * [-sin, sin]: three ops whatever the number of heads."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.attn_bias)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=cfg.attn_bias)

    # (q, k, v, mask, scale) -> (B, T, H, hd) for decode steps without autograd: lmforge's CPU kernel,
    # set on models prepared for decoding (infer/packed.py); None: PyTorch's attention
    decode_kernel = None

    def forward(self, x, rope, mask, is_causal, cache: KVCache | None):
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, self.hd)  # heads of q, then k, then v
        qk = qkv[:, :, : H + KV]
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated together: (B, T, H + KV, hd)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, hd)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, S, hd)
        # Decode steps on CPU (a few queries over the cache): lmforge's attention kernel on models set
        # up for decoding (infer/packed.py), else for bf16 two fp32 matmuls (see few_query_attention).
        # Static conditions first: a symbolic T (ONNX export) must not be compared unless needed.
        kernel = (
            self.decode_kernel if self.decode_kernel is not None and not torch.is_grad_enabled() else None
        )
        if x.device.type == "cpu" and not is_causal and (kernel or x.dtype != torch.float32) and T <= 16:
            y = (kernel or few_query_attention)(q, k, v, mask, self.hd**-0.5)  # (B, T, H, hd)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=self.cfg.dropout if self.training else 0.0,
                scale=self.hd**-0.5,
                enable_gqa=self.n_kv != self.n_heads,
            ).transpose(1, 2)  # (B, T, H, hd)
        return self.wo(y.reshape(B, T, self.cfg.q_dim))


def few_query_attention(q, k, v, mask, scale):
    """Attention of a few queries (decode steps, speculative verification) as two fp32 batched matmuls.

    For bf16 on CPU, PyTorch's fused attention kernel is several times slower than this when T is
    small (2.3 ms vs 0.5 ms per layer at 2048 keys, 0.15 vs 0.06 ms at 128), which dominates decoding
    at long contexts; computing in fp32 is also more accurate. q (B, H, T, hd); k, v (B, KV, S, hd),
    query head h reading key/value head h // (H / KV); mask (B, 1, T, S) bool (True = visible) or None.
    Returns (B, T, H, hd)."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    qg = q.reshape(B * KV, G * T, hd).float()  # the G query heads of each KV head, (B KV, G T, hd)
    s = torch.bmm(qg, k.reshape(B * KV, S, hd).float().transpose(1, 2)) * scale  # (B KV, G T, S)
    if mask is not None:
        s = s.view(B, KV, G, T, S).masked_fill(~mask[:, :, None], float("-inf")).view(B * KV, G * T, S)
    y = torch.bmm(s.softmax(dim=-1), v.reshape(B * KV, S, hd).float())  # (B KV, G T, hd)
    return y.view(B, H, T, hd).transpose(1, 2).to(q.dtype)


class MLP(nn.Module):
    """up -> act -> down, or gated: act(gate) * up -> down (gate and up fused in one matmul)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act, self.glu = ACT[cfg.act], cfg.mlp == "glu"
        self.w_in = nn.Linear(cfg.d_model, (2 if self.glu else 1) * cfg.d_ff, bias=cfg.mlp_bias)
        self.w_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.w_in(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(self.act(gate) * up)
        return self.w_out(self.act(h))


class MoE(nn.Module):
    """Sparse mixture of gated experts with top-k routing (softmax over all experts, renormalised over
    the k chosen, as in Mixtral). Tokens are grouped by expert and each expert runs one matmul."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.act = cfg.n_experts, cfg.n_experts_per_tok, ACT[cfg.act]
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_ff, cfg.d_model))  # gate ; up
        self.w_out = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_ff))
        self.router_logits: torch.Tensor | None = None  # (N, E) of the last call, for the aux loss

    def forward(self, x):
        B, T, d = x.shape
        xf = x.reshape(-1, d)  # (N, d)
        logits = self.router(xf)  # (N, E)
        self.router_logits = logits
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        flat = experts.flatten()  # (N k,) expert of each (token, slot) assignment
        order = flat.argsort(stable=True)
        token = order // self.top_k  # token index of each assignment, grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        out = torch.empty(order.numel(), d, dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = xf[token[start : start + n]]  # (n, d)
                gate, up = F.linear(xe, self.w_in[e]).chunk(2, dim=-1)
                out[start : start + n] = F.linear(self.act(gate) * up, self.w_out[e])
            start += n
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(xf).index_add_(0, token, out).view(B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.attn_norm, self.mlp_norm = Norm(cfg), Norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, is_causal, cache):
        if self.post_norm:  # original GPT: x = LN(x + f(x))
            x = self.attn_norm(x + self.drop(self.attn(x, rope, mask, is_causal, cache)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, is_causal, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = Norm(cfg) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables (max_seq_len, hd/2) in fp32; not saved (derived from the config).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    def _init_rope(self) -> None:
        if self.config.pos_emb != "rope":
            return
        dev = self.tok_emb.weight.device
        t = torch.arange(self.config.max_seq_len, dtype=torch.int64).float()
        freqs = torch.outer(t, rope_inv_freq(self.config))  # (max_seq_len, hd/2)
        self.rope_cos, self.rope_sin = freqs.cos().to(dev), freqs.sin().to(dev)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, std) weights; residual projections scaled by 1/sqrt(2 n_layers) (GPT-2); zero biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[0]
            if "norm" in leaf:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
                continue
            residual = name.endswith(
                ("wo.weight", "w_out.weight", "mlp.w_out")
            )  # projections into the stream
            s = std / math.sqrt(2 * self.config.n_layers) if residual else std
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device="cpu").mul_(s))
        for m in self.modules():
            if isinstance(m, Norm):
                m.reset_parameters()
        self._init_rope()

    def materialize(self, device="cpu", dtype: torch.dtype | None = None, init: bool = True) -> Transformer:
        """Allocate a model built on the meta device (optionally initialising weights)."""
        self.to_empty(device=device)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if init:
            self.init_weights()
        else:
            self._init_rope()
        return self.to(dtype) if dtype is not None else self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
    ):
        """idx (B, T) token ids -> logits (B, T, V), or the mean loss when targets (B, T) are given
        (ignore_index -100; Mixtral adds its load-balancing loss).

        attention_mask (B, T): 1 for real tokens, 0 for padding (left padding for generation).
        cache: a KVCache to read from and append to (positions continue from it).
        logits_to_keep: if > 0, only the last k positions get logits (prefill needs one).
        """
        cfg = self.config
        B, T = idx.shape
        valid = attention_mask.bool() if attention_mask is not None else None
        if cache is not None:
            pos, mask, is_causal = cache.prepare(T, valid)
        else:
            if T > cfg.max_seq_len:
                raise ValueError(
                    f"input of {T} tokens is longer than the model's context of {cfg.max_seq_len}"
                )
            pos = positions_from_valid(valid, 0, T, idx.device)
            if valid is None and (cfg.sliding_window is None or T <= cfg.sliding_window):
                mask, is_causal = None, True
            else:
                k_pos = pos if valid is None else pos.masked_fill(~valid, -1)
                mask, is_causal = make_mask(pos, k_pos, cfg.sliding_window, 0), False
        x = self.tok_emb(idx)  # (B, T, d)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.d_model**0.5, dtype=x.dtype)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos.expand(B, T))
        else:
            cos, sin = rope_tables(self.rope_cos[pos], self.rope_sin[pos])  # (B or 1, T, hd)
            rope = (cos[:, :, None].to(x.dtype), sin[:, :, None].to(x.dtype))  # broadcast over heads
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask, is_causal, cache)
        if self.norm is not None:
            x = self.norm(x)
        if return_hidden:
            return x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        if cfg.n_experts and self.training:
            self.aux_loss = load_balancing_loss(
                [b.mlp.router_logits for b in self.blocks],
                cfg.n_experts_per_tok,
                valid.reshape(-1) if valid is not None else None,
            )
            loss = loss + cfg.router_aux_loss_coef * self.aux_loss
        return loss

    # ------------------------------------------------------------------ helpers
    def num_params(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                n += p.numel()
        return n

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        w = self.tok_emb.weight
        return KVCache(
            self.config, batch_size, max_len or self.config.max_seq_len, w.device, dtype or w.dtype
        )


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked output projection + mean cross-entropy; gradients are formed in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, dtype, grad):
        # x (N, d), weight (V, d), targets (N,) with -100 = ignore
        N, V = x.shape[0], weight.shape[0]
        need_x, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            gx = torch.empty_like(x) if need_x else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
            rows = max(1, (1 << (26 if x.is_cuda else 23)) // V)  # fp32 logits per chunk: 256 MB / 32 MB
            for s in range(0, N, rows):
                xs, t = x[s : s + rows].to(dtype), targets[s : s + rows]
                ok, tt = t != -100, t.clamp(min=0)[:, None]
                logits = (xs @ w.t()).float()  # (rows, V)
                lse = torch.logsumexp(logits, dim=-1)
                loss += ((lse - logits.gather(1, tt).squeeze(1)) * ok).sum()
                if need_x or need_w:
                    # softmax in place (ignored rows: exp(-inf) = 0), minus one-hot = d loss_row / d logits
                    p = logits.sub_(lse.masked_fill(~ok, float("inf"))[:, None]).exp_()
                    p.scatter_add_(1, tt, -ok[:, None].float())
                    p = p.to(dtype)
                    if need_x:
                        gx[s : s + rows] = p @ w
                    if need_w:
                        gw += p.t() @ xs
            n = (targets != -100).sum()
        ctx.save_for_backward(gx, gw, n)
        ctx.weight_dtype = weight.dtype
        return loss / n  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, g):
        gx, gw, n = ctx.saved_tensors
        s = g / n
        return (
            gx * s if gx is not None else None,
            (gw * s).to(ctx.weight_dtype) if gw is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-100) without the (N, V)
    logits or their gradient ever existing whole: rows go through in chunks, and softmax - one-hot is
    turned into the gradients of x (N, d) and weight (V, d) at once, which backward only scales.
    Fewer passes over N x V memory: about 1.3x faster bf16 training steps on CPU, and on GPU the
    logits of a 32K vocabulary no longer cost gigabytes. The matmuls run in the autocast dtype."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(x, weight, targets, dtype, grad)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, valid: torch.Tensor | None = None):
    """Switch-Transformer auxiliary loss as in HF Mixtral: E * sum_e f_e * P_e over all layers' tokens,
    f_e = fraction of (token, slot) assignments routed to e, P_e = mean router probability of e."""
    logits = torch.cat(router_logits, dim=0)  # (layers N, E)
    E = logits.shape[-1]
    probs = logits.float().softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices
    assigned = F.one_hot(chosen, E).float()  # (layers N, k, E)
    if valid is None:
        f = assigned.mean(dim=0)  # (k, E)
        p = probs.mean(dim=0)  # (E,)
    else:
        w = valid.float().repeat(len(router_logits))  # (layers N,)
        f = (assigned * w[:, None, None]).sum(0) / w.sum()
        p = (probs * w[:, None]).sum(0) / w.sum()
    return (f * p[None]).sum() * E


def build(
    cfg: ModelConfig, device="cpu", dtype: torch.dtype | None = None, meta: bool = False
) -> Transformer:
    """Build a model; with meta=True no memory is allocated (inspect shapes, count parameters)."""
    if meta:
        with torch.device("meta"):
            return Transformer(cfg)
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype) if dtype is not None else model
