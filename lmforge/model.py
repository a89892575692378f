"""The decoder: one config-driven model for gpt, gpt2, llama, mistral, mixtral, gemma, qwen2, qwen3,
gemma2, gemma3, phi3 and olmo2.

Notable features
- every family is the same code with different switches (see config.FAMILIES): learned or rotary
  positions, pre- or post-norm, LayerNorm or RMSNorm (Gemma's (1 + w)), norms on sub-layer outputs
  (Gemma 2/3 sandwich, OLMo 2), GELU MLP or gated (SwiGLU / GeGLU), projection biases (q/k/v/o or
  Qwen2's q/k/v), q/k RMSNorm per head or over all channels, tied embeddings, embedding scaling,
  attention and logit soft-capping, sparse MoE
- sliding windows on every layer (Mistral) or per layer (layer_types: Gemma 2/3, Qwen2), sliding layers
  with their own RoPE base (Gemma 3); each kind of layer gets its own mask and RoPE tables per call
- RoPE with linear, llama3, YaRN and LongRoPE scaling (Phi-3: short or long factors chosen from the
  longest position in the call, as transformers does) and partial rotary embeddings (Phi-4-mini)
- fused q/k/v and gate/up projections (fewer, larger matmuls); HF names are mapped in hf.py
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
import torch.utils.checkpoint

from lmforge.cache import KVCache, make_mask, positions_from_valid
from lmforge.config import ModelConfig

ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class Norm(nn.Module):
    """LayerNorm, or RMSNorm computed in fp32 like the reference (Gemma: scale by 1 + w), over the
    last `dim` channels (default d_model; q/k norms use head_dim or q_dim / kv_dim)."""

    def __init__(self, cfg: ModelConfig, dim: int | None = None):
        super().__init__()
        self.kind, self.eps, self.unit_offset = cfg.norm, cfg.norm_eps, cfg.norm_unit_offset
        dim = dim or cfg.d_model
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if cfg.norm == "layernorm" else None

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


def rope_parameters(cfg: ModelConfig, local: bool = False, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (rotary_dim/2,), attention factor) as HF computes them: the sliding layers'
    base for local=True (Gemma 3: unscaled), LongRoPE's long factors for long=True."""
    rot = cfg.rotary_dim
    theta = (cfg.rope_local_theta or cfg.rope_theta) if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
    sc = None if local and cfg.rope_local_theta is not None else cfg.rope_scaling
    if sc is None:
        return inv, 1.0
    kind = sc.get("rope_type", sc.get("type"))
    old = sc.get("original_max_position_embeddings", cfg.max_seq_len)
    if kind == "linear":
        return inv / sc["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "longrope":  # Phi-3: per-frequency factors; the long ones past the pretraining length
        factor = sc.get("factor") or cfg.max_seq_len / old
        attn = sc.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        ext = torch.tensor(sc["long_factor" if long else "short_factor"], dtype=torch.float32)
        return inv / ext, float(attn)
    if kind == "yarn":  # interpolate the slow frequencies, keep the fast ones, blend in between
        factor = sc["factor"]

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = sc.get("attention_factor")
        if attn is None:
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        fast, slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def dim_of(rotations):  # the channel whose wavelength fits `rotations` times in `old` positions
            return rot * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_of(fast), dim_of(slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, rot - 1)
        hi = hi + 0.001 if lo == hi else hi
        ramp = ((torch.arange(rot // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
        return inv / factor * (1 - keep) + inv * keep, float(attn)
    return inv, 1.0  # "default"


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (rotary_dim/2,) of the full-attention layers (short factors for LongRoPE)."""
    return rope_parameters(cfg)[0]


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables for apply_rope from the angles' cos/sin (..., hd/2): [cos, cos], [-sin, sin]."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + rot/2) of x (..., hd) by the angles whose full-width tables
    (rope_tables, (..., rot)) broadcast against x: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin], i.e.
    x * [cos, cos] + [x2, x1] * [-sin, sin]: three ops whatever the number of heads. With partial
    rotary embeddings (rot < hd) the channels after the first rot pass through unchanged."""
    rot = cos.shape[-1]
    if rot != x.shape[-1]:
        xr = x[..., :rot]
        return torch.cat((torch.addcmul(xr * cos, xr.roll(rot // 2, dims=-1), sin), x[..., rot:]), dim=-1)
    return torch.addcmul(x * cos, x.roll(rot // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = (cfg.query_scale or cfg.head_dim) ** -0.5
        self.softcap = cfg.attn_softcap
        self.wqkv = nn.Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.attn_bias or cfg.qkv_bias)
        self.wo = nn.Linear(cfg.q_dim, cfg.d_model, bias=cfg.attn_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # per head: (hd,) weights shared by the heads; full: one weight per channel
            self.q_norm = Norm(cfg, cfg.head_dim if cfg.qk_norm == "head" else cfg.q_dim)
            self.k_norm = Norm(cfg, cfg.head_dim if cfg.qk_norm == "head" else cfg.kv_dim)

    def project(self, x, rope):
        """q (B, H, T, hd), k, v (B, KV, T, hd) of x (B, T, d): projections, q/k norms, RoPE."""
        B, T, _ = x.shape
        H, KV, qd, kvd = self.n_heads, self.n_kv, self.cfg.q_dim, self.cfg.kv_dim
        h = self.wqkv(x)  # (B, T, q_dim + 2 kv_dim)
        if self.qk_norm == "full":  # OLMo 2: over all query / all key channels, before the split
            h = torch.cat(
                (self.q_norm(h[..., :qd]), self.k_norm(h[..., qd : qd + kvd]), h[..., qd + kvd :]), -1
            )
        qkv = h.view(B, T, H + 2 * KV, self.hd)  # heads of q, then k, then v
        qk = qkv[:, :, : H + KV]
        if self.qk_norm == "head":  # Qwen3, Gemma 3: over each head's channels
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), 2)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated together: (B, T, H + KV, hd)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, hd)
        v = qkv[:, :, H + KV :].transpose(1, 2)
        return q, k, v

    def forward(self, x, rope, mask, is_causal, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, S, hd)
        y = self.attend(q, k, v, mask, is_causal)  # (B, T, H, hd)
        return self.wo(y.reshape(B, T, self.cfg.q_dim))

    def attend(self, q, k, v, mask, is_causal):
        """softmax(q k^T * scale) v: q (B, H, T, hd), k, v (B, KV, S, hd), mask (B, 1, T, S) bool or
        None -> (B, T, H, hd). A few bf16 queries on CPU (decode steps) take two fp32 matmuls, several
        times faster than SDPA there (see few_query_attention); soft-capped scores (Gemma 2) are beyond
        SDPA: explicit matmuls, always; so does compiled CPU training over short windows (below). Static
        conditions first: a symbolic T (ONNX export) must not be compared unless needed."""
        drop = self.cfg.dropout if self.training else 0.0
        if self.softcap is not None:
            return few_query_attention(q, k, v, mask, self.scale, self.softcap, is_causal, drop)
        if q.device.type == "cpu" and not is_causal and q.dtype != torch.float32 and q.shape[2] <= 16:
            return few_query_attention(q, k, v, mask, self.scale)
        if (
            q.device.type == "cpu"
            and is_causal
            and torch.compiler.is_compiling()
            and torch.is_grad_enabled()
            and q.shape[2] <= 512
        ):
            # compiled CPU training over short windows: explicit fp32 attention, whose masked softmax
            # inductor fuses, trains faster than SDPA's flash kernel, whose backward is slow on CPU
            # (the quickstart's model, 16 x 256 tokens: forward+backward 127 ms against 138); its
            # (B, H, T, T) probabilities are kept for backward, so only up to 512 positions
            return few_query_attention(q, k, v, mask, self.scale, None, is_causal, drop)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=drop,
            scale=self.scale,
            enable_gqa=self.n_kv != self.n_heads,
        ).transpose(1, 2)


def few_query_attention(q, k, v, mask, scale, softcap=None, is_causal=False, dropout=0.0):
    """Attention as two fp32 batched matmuls: decode steps and speculative verification (a few
    queries), and any call with soft-capped scores (Gemma 2: score -> cap * tanh(score / cap)).

    For bf16 on CPU, PyTorch's fused attention kernel is several times slower than this when T is
    small (2.3 ms vs 0.5 ms per layer at 2048 keys, 0.15 vs 0.06 ms at 128), which dominates decoding
    at long contexts; computing in fp32 is also more accurate. q (B, H, T, hd); k, v (B, KV, S, hd),
    query head h reading key/value head h // (H / KV); mask (B, 1, T, S) bool (True = visible) or None
    (is_causal: query t sees keys up to S - T + t). Returns (B, T, H, hd)."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    qg = q.reshape(B * KV, G * T, hd).float()  # the G query heads of each KV head, (B KV, G T, hd)
    s = torch.bmm(qg, k.reshape(B * KV, S, hd).float().transpose(1, 2)) * scale  # (B KV, G T, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if is_causal:
        ar = torch.arange(S, device=q.device)
        causal = ar[None, :] <= (ar[S - T :])[:, None]  # (T, S)
        mask = causal[None, None] if mask is None else mask & causal
    if mask is not None:
        s = s.view(B, KV, G, T, S).masked_fill(~mask[:, :, None], float("-inf")).view(B * KV, G * T, S)
    p = s.softmax(dim=-1)
    if dropout:
        p = F.dropout(p, dropout)
    y = torch.bmm(p, v.reshape(B * KV, S, hd).float())  # (B KV, G T, hd)
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
    """x + f(norm(x)) (pre-norm), x + norm(f(norm(x))) (Gemma 2/3 sandwich), x + norm(f(x)) (OLMo 2),
    or norm(x + f(x)) (original GPT's post-norm), for f = attention, then the MLP."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.post_norm = cfg.post_norm
        if cfg.pre_norm or cfg.post_norm:
            self.attn_norm, self.mlp_norm = Norm(cfg), Norm(cfg)
        else:
            self.attn_norm = self.mlp_norm = nn.Identity()
        if cfg.sublayer_norm:
            self.attn_post_norm, self.mlp_post_norm = Norm(cfg), Norm(cfg)
        else:
            self.attn_post_norm = self.mlp_post_norm = nn.Identity()
        self.attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, is_causal, cache):
        if self.post_norm:  # original GPT: x = LN(x + f(x))
            x = self.attn_norm(x + self.drop(self.attn(x, rope, mask, is_causal, cache)))
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn_post_norm(self.attn(self.attn_norm(x), rope, mask, is_causal, cache)))
        return x + self.drop(self.mlp_post_norm(self.mlp(self.mlp_norm(x))))


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
        # RoPE tables (max_seq_len, rotary_dim/2) in fp32, attention factor included; not saved (derived
        # from the config). _local: sliding layers with their own base (Gemma 3); _long: LongRoPE's long
        # factors (Phi-3). Empty when unused.
        for name in (
            "rope_cos",
            "rope_sin",
            "rope_cos_local",
            "rope_sin_local",
            "rope_cos_long",
            "rope_sin_long",
        ):
            self.register_buffer(name, torch.empty(0), persistent=False)
        # The kind of each layer: "full" or "sliding"; each kind gets its own mask and RoPE per call.
        self.kinds = ["full" if cfg.layer_window(i) is None else "sliding" for i in range(cfg.n_layers)]
        self.kinds = ["all"] * cfg.n_layers if len(set(self.kinds)) == 1 else self.kinds
        self.aux_loss: torch.Tensor | None = None
        # Training switch (not a config field): each block's activations are recomputed in backward
        # instead of stored; parameter names and the HF layout are unchanged.
        self.activation_checkpointing = False
        if self.tok_emb.weight.device.type != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    def _init_rope(self) -> None:
        if self.config.pos_emb != "rope":
            return
        cfg, dev = self.config, self.tok_emb.weight.device
        t = torch.arange(cfg.max_seq_len, dtype=torch.int64).float()

        def tables(**kw):
            inv, factor = rope_parameters(cfg, **kw)
            freqs = torch.outer(t, inv)  # (max_seq_len, rotary_dim/2)
            return (freqs.cos() * factor).to(dev), (freqs.sin() * factor).to(dev)

        self.rope_cos, self.rope_sin = tables()
        if cfg.rope_local_theta is not None and any(cfg.layer_window(i) for i in range(cfg.n_layers)):
            self.rope_cos_local, self.rope_sin_local = tables(local=True)
        if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "longrope":
            self.rope_cos_long, self.rope_sin_long = tables(long=True)

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
        sliding = "sliding" in self.kinds  # layers of two kinds: the sliding ones' (mask, is_causal)
        if self.rope_cos_long.numel() and isinstance(cache, KVCache) and not cache.ring:
            again = self._longrope_restart(idx, valid, cache, logits_to_keep, return_hidden)
            if again is not None:
                return again
        if cache is not None:
            pos, mask, is_causal = cache.prepare(T, valid)
            if sliding:  # the cache's mask is the full layers'; the sliding ones need their own
                sliding = (cache.window_mask(cfg.sliding_window), False)
        else:
            if T > cfg.max_seq_len:
                raise ValueError(
                    f"input of {T} tokens is longer than the model's context of {cfg.max_seq_len}"
                )
            pos = positions_from_valid(valid, 0, T, idx.device)
            k_pos = pos if valid is None else pos.masked_fill(~valid, -1)

            def masks(window):
                if valid is None and (window is None or T <= window):
                    return None, True
                return make_mask(pos, k_pos, window, 0), False

            mask, is_causal = masks(cfg.cache_window)
            sliding = sliding and masks(cfg.sliding_window)
        x = self.tok_emb(idx)  # (B, T, d)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.d_model**0.5, dtype=x.dtype)
        rope = rope_local = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos.expand(B, T))
        else:
            rope = self._rope(pos, x.dtype)
            rope_local = self._rope(pos, x.dtype, local=True) if self.rope_cos_local.numel() else rope
        # (rope, mask, is_causal) of each kind of layer
        every_slides = cfg.cache_window is not None  # then "all" layers are sliding ones
        ctx = {
            "all": (rope_local if every_slides else rope, mask, is_causal),
            "full": (rope, mask, is_causal),
        }
        if sliding:
            ctx["sliding"] = (rope_local, *sliding)
        x = self.drop(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block, kind in zip(self.blocks, self.kinds):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, *ctx[kind], cache, use_reentrant=False)
            else:
                x = block(x, *ctx[kind], cache)
        if self.norm is not None:
            x = self.norm(x)
        if return_hidden:
            return x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if targets is None:
            return self.logits(x)  # (B, T, V)
        if cfg.final_softcap is None and type(self.lm_head) is nn.Linear:
            loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
        else:  # soft-capped logits or a quantized head: the chunked loss does not apply, materialise
            logits = self.logits(x).float().flatten(0, 1)
            loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100)
        if cfg.n_experts and self.training:
            self.aux_loss = load_balancing_loss(
                [b.mlp.router_logits for b in self.blocks],
                cfg.n_experts_per_tok,
                valid.reshape(-1) if valid is not None else None,
            )
            loss = loss + cfg.router_aux_loss_coef * self.aux_loss
        return loss

    def _longrope_restart(self, idx, valid, cache: KVCache, logits_to_keep: int, return_hidden: bool):
        """LongRoPE (Phi-3) as transformers generates: the first chunk that takes the cache past the
        pretraining length recomputes the whole sequence, so every cached key uses the long factors.
        Returns that call's output, or None (no restart: the chunk's ids are recorded)."""
        L, T = cache.length, idx.shape[1]
        orig = self.config.rope_scaling["original_max_position_embeddings"]
        if not 0 < L <= orig < L + T:
            cache.ids[:, L : L + T] = idx
            return None
        past_valid = cache.key_pos[:, :L] >= 0
        ids = torch.cat((cache.ids[:, :L], idx), 1)
        now = valid if valid is not None else torch.ones_like(idx, dtype=torch.bool)
        cache.reset()
        keep = min(logits_to_keep, T) if logits_to_keep else T
        out = self(ids, attention_mask=torch.cat((past_valid, now), 1), cache=cache, logits_to_keep=keep,
                   return_hidden=return_hidden)  # fmt: skip
        return out[:, -keep:] if return_hidden else out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Output projection of hidden states x (..., d) -> (..., V), soft-capped where the family does."""
        y = self.lm_head(x)
        cap = self.config.final_softcap
        return y if cap is None else torch.tanh(y / cap) * cap

    def _rope(self, pos: torch.Tensor, dtype, local: bool = False):
        """Full-width (cos, sin) tables (B or 1, T, 1, rot) for positions pos, broadcast over heads."""
        cos, sin = (self.rope_cos_local, self.rope_sin_local) if local else (self.rope_cos, self.rope_sin)
        cos, sin = cos[pos], sin[pos]  # (B or 1, T, rot/2)
        if self.rope_cos_long.numel() and not local:
            # LongRoPE as transformers runs it: the long factors for the whole call once its furthest
            # position passes the pretraining length (a tensor condition: no sync, traceable)
            long = (pos.max() + 1) > self.config.rope_scaling["original_max_position_embeddings"]
            cos = torch.where(long, self.rope_cos_long[pos], cos)
            sin = torch.where(long, self.rope_sin_long[pos], sin)
        cos, sin = rope_tables(cos, sin)
        return cos[:, :, None].to(dtype), sin[:, :, None].to(dtype)

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


def _loss_rows(v: int, cuda: bool, weight_grad: bool) -> int:
    """Rows of logits per chunk of linear_cross_entropy (vocabulary `v`). GPU: 2^26 fp32 logits (256 MB).
    CPU: the elementwise passes (max, exp, sum, scale, cast) run ~2x faster while a chunk stays in the
    L2 cache (4 MB of fp32 logits), so a vocabulary small enough for 256 rows in 4 MB takes such chunks;
    else the weight gradient's matmul (p^T x, inner dimension = rows) wants 512 rows, and without a
    weight gradient (a frozen tied head: LoRA) 256 rows are fastest and half the memory.
    Measured on the 2-core Xeon, bf16, one forward+backward: V 4096 x 4096 rows 44.6 ms at 256 rows,
    50.5 at 512, 71.6 at 2048; V 49152 x 1024 rows 613 ms at 256 rows, 521 at 512, 709 at 170; without
    the weight's gradient 274 ms at 256 rows, 302 at 512, 308 at 1024."""
    if cuda:
        return max(1, (1 << 26) // v)
    cached = (1 << 20) // v
    return cached if cached >= 256 else (512 if weight_grad else 256)


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
            rows = _loss_rows(V, x.is_cuda, need_w)
            for s in range(0, N, rows):
                xs, t = x[s : s + rows].to(dtype), targets[s : s + rows]
                ok, tt = t != -100, t.clamp(min=0)[:, None]
                logits = (xs @ w.t()).float()  # (rows, V)
                # log-sum-exp by hand: the exp is taken once and is the softmax's too
                m = logits.amax(dim=-1, keepdim=True)  # (rows, 1)
                picked = logits.gather(1, tt).squeeze(1)
                p = logits.sub_(m).exp_()  # (rows, V), in place
                total = p.sum(dim=-1)  # (rows,)
                lse = m.squeeze(1) + total.log()
                loss += ((lse - picked) * ok).sum()
                if need_x or need_w:
                    # softmax (ignored rows: 0) minus one-hot = d loss_row / d logits
                    p.mul_((ok / total)[:, None])
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
