"""ModelConfig: one dataclass describes every decoder lmforge builds.

The twelve families differ only in a handful of switches (positions, norms, MLP, biases, q/k norms,
soft-caps, sliding layers, RoPE scaling, ...), so a family is a row in FAMILIES and a size is a row in
SIZES; `preset(family, size)` combines them. lmforge/hf.py maps a ModelConfig to and from the family's
Hugging Face `config.json` schema (`config_to_hf` / `config_from_hf`; hf imports this module, never the
other way round), so every lmforge checkpoint loads in transformers and every local HF directory of
these families loads here.

Validation runs in `__post_init__` and raises a ValueError naming the bad field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# HF `model_type` of each family, and back.
HF_MODEL_TYPE = {
    "gpt": "openai-gpt",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "gemma": "gemma",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "olmo2": "olmo2",
}
FAMILY_OF_MODEL_TYPE = {v: k for k, v in HF_MODEL_TYPE.items()}
HF_ARCHITECTURE = {
    "gpt": "OpenAIGPTLMHeadModel",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma": "GemmaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("sliding_attention", "full_attention")
QK_NORMS = (None, "head", "full")


@dataclass
class ModelConfig:
    """Shape and architecture switches of a decoder. Field docs double as CLI help."""

    family: str = "llama"
    """architecture family: gpt, gpt2, llama, mistral, mixtral, gemma, qwen2, qwen3, gemma2, gemma3, phi3
    or olmo2"""
    vocab_size: int = 32000
    """number of token ids (rows of the embedding table)"""
    d_model: int = 768
    """width of the residual stream"""
    n_layers: int = 12
    """number of transformer blocks"""
    n_heads: int = 12
    """query heads per attention layer"""
    n_kv_heads: int | None = None
    """key/value heads (GQA: fewer than n_heads; MQA: 1); default n_heads"""
    head_dim: int | None = None
    """size of one head; default d_model // n_heads (Gemma sets it independently)"""
    d_ff: int = 3072
    """hidden width of the MLP (per expert for MoE)"""
    max_seq_len: int = 2048
    """longest context the model is built for (learned positions, RoPE tables, KV cache)"""
    pos_emb: str = "rope"
    """position encoding: rope or learned"""
    rope_theta: float = 10000.0
    """RoPE base frequency"""
    rope_scaling: dict | None = None
    """RoPE frequency scaling as in HF: None, {"rope_type": "linear", "factor": f}, llama3, yarn or longrope
    (Phi-3: short_factor, long_factor, original_max_position_embeddings)"""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers (Gemma 3's rope_local_base_freq); None: rope_theta"""
    partial_rotary_factor: float = 1.0
    """fraction of each head's channels that RoPE rotates (Phi-4-mini: 0.75)"""
    norm: str = "rmsnorm"
    """rmsnorm or layernorm"""
    norm_eps: float = 1e-5
    """epsilon inside the norms"""
    norm_unit_offset: bool = False
    """Gemma: RMSNorm scales by (1 + w), with w initialised at 0"""
    post_norm: bool = False
    """original GPT: normalise after each residual add instead of before each sub-layer"""
    pre_norm: bool = True
    """a norm before each sub-layer (False for OLMo 2, which only normalises sub-layer outputs)"""
    sublayer_norm: bool = False
    """a norm on each sub-layer's output before the residual add (Gemma 2/3, OLMo 2)"""
    final_norm: bool = True
    """a norm after the last block (absent in original GPT)"""
    mlp: str = "glu"
    """mlp (up, act, down) or glu (act(gate) * up, down)"""
    act: str = "silu"
    """activation: gelu (erf), gelu_tanh, silu or relu"""
    attn_bias: bool = False
    """biases on the q/k/v/o projections"""
    qkv_bias: bool = False
    """biases on the q/k/v projections but not on o (Qwen2)"""
    qk_norm: str | None = None
    """RMSNorm of queries and keys before RoPE: head (over each head, Qwen3/Gemma 3) or full (over all
    q / all k channels, OLMo 2); None: none"""
    query_scale: float | None = None
    """attention scores are scaled by query_scale ** -0.5 (Gemma's query_pre_attn_scalar); None: head_dim"""
    attn_softcap: float | None = None
    """Gemma 2: attention scores become cap * tanh(score / cap)"""
    final_softcap: float | None = None
    """Gemma 2: output logits become cap * tanh(logit / cap)"""
    mlp_bias: bool = False
    """biases on the MLP projections"""
    tie_embeddings: bool = False
    """share the output projection with the token embedding"""
    embed_scale: bool = False
    """Gemma: multiply token embeddings by sqrt(d_model)"""
    sliding_window: int | None = None
    """each token attends to at most this many previous tokens (itself included): every layer
    (Mistral), or the layers layer_types marks sliding (Gemma 2/3, Qwen2)"""
    layer_types: list[str] | None = None
    """per layer: sliding_attention or full_attention (HF's names); None: every layer uses sliding_window"""
    n_experts: int = 0
    """Mixtral: experts per MoE layer (0 = dense MLP)"""
    n_experts_per_tok: int = 2
    """Mixtral: experts each token is routed to (top-k)"""
    router_aux_loss_coef: float = 0.01
    """Mixtral: weight of the load-balancing loss added to the training loss"""
    dropout: float = 0.0
    """dropout on embeddings, attention and residual branches (training only)"""
    init_std: float = 0.02
    """std of the normal weight init; residual projections are scaled by 1/sqrt(2 n_layers)"""
    bos_token_id: int | None = None
    """id of the beginning-of-sequence token, if any"""
    eos_token_id: int | None = None
    """id of the end-of-sequence token, if any"""
    pad_token_id: int | None = None
    """id of the padding token, if any"""
    extra: dict = field(default_factory=dict)
    """fields of the HF config.json that lmforge carries through unchanged (quantization_config, ...)"""

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                    "change one of them or set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        if self.family not in HF_MODEL_TYPE:
            bad("family", f"unknown family; choose one of {', '.join(HF_MODEL_TYPE)}")
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "d_ff",
            "max_seq_len",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"n_heads={self.n_heads} must be a multiple of n_kv_heads")
        if self.pos_emb not in ("rope", "learned"):
            bad("pos_emb", "must be 'rope' or 'learned'")
        if self.pos_emb == "rope" and self.head_dim % 2:
            bad("head_dim", "RoPE rotates pairs of channels, so the head size must be even")
        if self.rope_theta <= 0:
            bad("rope_theta", "must be positive")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                bad(
                    "rope_scaling",
                    f"RoPE scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})",
                )
            if kind in ("linear", "llama3", "yarn") and not (self.rope_scaling.get("factor") or 0) > 0:
                bad("rope_scaling", "needs a positive 'factor'")
            if kind == "longrope":
                n = self.rotary_dim // 2
                for key in ("short_factor", "long_factor"):
                    if len(self.rope_scaling.get(key) or []) != n:
                        bad("rope_scaling", f"longrope needs {key} with rotary_dim / 2 = {n} numbers")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or (self.pos_emb == "rope" and self.rotary_dim % 2):
            bad("partial_rotary_factor", "must be in (0, 1] and rotate an even number of channels")
        if self.qk_norm not in QK_NORMS:
            bad("qk_norm", "must be None, 'head' or 'full'")
        if not (self.pre_norm or self.sublayer_norm) and not self.post_norm:
            bad("pre_norm", "a block needs pre_norm, sublayer_norm or post_norm")
        for name in ("attn_softcap", "final_softcap", "query_scale", "rope_local_theta"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(name, "must be positive or None")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                bad(
                    "layer_types",
                    f"needs n_layers={self.n_layers} entries, each one of {', '.join(LAYER_TYPES)}",
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                bad("layer_types", "sliding_attention layers need sliding_window")
        if self.norm not in ("rmsnorm", "layernorm"):
            bad("norm", "must be 'rmsnorm' or 'layernorm'")
        if self.norm_eps <= 0:
            bad("norm_eps", "must be positive")
        if self.mlp not in ("mlp", "glu"):
            bad("mlp", "must be 'mlp' or 'glu'")
        if self.act not in ACTIVATIONS:
            bad("act", f"must be one of {', '.join(ACTIVATIONS)}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window <= 0
        ):
            bad("sliding_window", "must be a positive integer or None")
        if self.n_experts < 0:
            bad("n_experts", "must be >= 0 (0 means a dense MLP)")
        if self.n_experts and not 1 <= self.n_experts_per_tok <= self.n_experts:
            bad("n_experts_per_tok", f"top-k must be between 1 and n_experts={self.n_experts}")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                bad(name, f"must be a token id in [0, vocab_size={self.vocab_size})")

    # ------------------------------------------------------------------ derived numbers
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to the whole context)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def cache_window(self) -> int | None:
        """The window every layer shares (a KV cache may then keep only that many slots), else None."""
        windows = {self.layer_window(i) for i in range(self.n_layers)}
        return windows.pop() if len(windows) == 1 else None

    def _layer_params(self, active: bool = False) -> int:
        d, f = self.d_model, self.d_ff
        attn = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d
        if self.attn_bias:
            attn += self.q_dim + 2 * self.kv_dim + d
        elif self.qkv_bias:
            attn += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            attn += 2 * self.head_dim if self.qk_norm == "head" else self.q_dim + self.kv_dim
        n_mats = 3 if self.mlp == "glu" else 2
        mlp = n_mats * d * f + ((n_mats - 1) * f + d if self.mlp_bias else 0)
        if self.n_experts:
            mlp = (
                mlp * (self.n_experts_per_tok if active else self.n_experts) + d * self.n_experts
            )  # + router
        norm = d * (2 if self.norm == "layernorm" else 1)
        n_norms = 2 * (int(self.pre_norm or self.post_norm) + int(self.sublayer_norm))
        return attn + mlp + n_norms * norm

    def n_params(self, embeddings: bool = True) -> int:
        """Parameter count (tied embeddings counted once)."""
        n = self.n_layers * self._layer_params()
        if self.final_norm:
            n += self.d_model * (2 if self.norm == "layernorm" else 1)
        if embeddings:
            n += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
            if self.pos_emb == "learned":
                n += self.max_seq_len * self.d_model
        return n

    def n_active_params(self) -> int:
        """Parameters a token passes through (MoE counts top-k experts), without embedding tables."""
        return self.n_layers * self._layer_params(active=True)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token: 6N (or 2N for a forward pass) plus attention over seq_len (PaLM appendix B)."""
        t = seq_len or self.max_seq_len
        if self.cache_window:
            t = min(t, self.cache_window)
        n = self.n_active_params() + self.vocab_size * self.d_model  # the output projection is a matmul too
        attn = (
            2 * self.n_layers * self.q_dim * t
        )  # QK^T and AV, averaged causal length ~ t/2, x2 matmuls x2 flops
        mult = 3 if training else 1
        return mult * (2 * n + attn)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes of K and V the cache holds for one token (all layers)."""
        return 2 * self.n_layers * self.kv_dim * bytes_per_value

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------- presets
# The switches that make a family. Everything not listed takes the dataclass default.
FAMILIES: dict[str, dict] = {
    "gpt": dict(
        pos_emb="learned",
        norm="layernorm",
        post_norm=True,
        final_norm=False,
        mlp="mlp",
        act="gelu_tanh",
        attn_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
    ),
    "gpt2": dict(
        pos_emb="learned",
        norm="layernorm",
        mlp="mlp",
        act="gelu_tanh",
        attn_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
    ),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="glu", act="silu", rope_theta=10000.0, norm_eps=1e-5),
    "mistral": dict(
        pos_emb="rope",
        norm="rmsnorm",
        mlp="glu",
        act="silu",
        rope_theta=10000.0,
        norm_eps=1e-5,
        sliding_window=4096,
    ),
    "mixtral": dict(
        pos_emb="rope",
        norm="rmsnorm",
        mlp="glu",
        act="silu",
        rope_theta=1e6,
        norm_eps=1e-5,
        n_experts=8,
        n_experts_per_tok=2,
        router_aux_loss_coef=0.02,
    ),
    "gemma": dict(
        pos_emb="rope",
        norm="rmsnorm",
        norm_unit_offset=True,
        mlp="glu",
        act="gelu_tanh",
        tie_embeddings=True,
        embed_scale=True,
        norm_eps=1e-6,
    ),
}
# The families added since are their parent's row with a few switches more.
_LLAMA, _GEMMA = FAMILIES["llama"], FAMILIES["gemma"]
FAMILIES |= {
    # Qwen2 / Qwen2.5: Llama with biases on q, k and v (not o)
    "qwen2": _LLAMA | dict(rope_theta=1e6, norm_eps=1e-6, qkv_bias=True),
    # Qwen3: Llama with RMSNorm over each query and key head before RoPE
    "qwen3": _LLAMA | dict(rope_theta=1e6, norm_eps=1e-6, qk_norm="head"),
    # Gemma 2: Gemma with sandwich norms, soft-capped attention and logits, alternating sliding/full layers
    "gemma2": _GEMMA | dict(sublayer_norm=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096),
    # Gemma 3 (text): Gemma 2 without soft-caps, with per-head q/k norms, five sliding layers per full one
    # and a separate RoPE base for the sliding layers
    "gemma3": _GEMMA
    | dict(sublayer_norm=True, qk_norm="head", rope_theta=1e6, rope_local_theta=1e4, sliding_window=512),
    # Phi-3 / Phi-3.5 / Phi-4-mini: Llama with fused qkv_proj / gate_up_proj tensors (a mapping difference
    # only), longrope scaling and partial rotary embeddings in the long-context versions
    "phi3": dict(_LLAMA),
    # OLMo 2: no norms before the sub-layers, a norm on each sub-layer's output, RMSNorm over all of q / k
    "olmo2": _LLAMA | dict(rope_theta=5e5, norm_eps=1e-6, pre_norm=False, sublayer_norm=True, qk_norm="full"),
}

# Which layers slide, per family (HF's defaults when config.json has no layer_types).
LAYER_PATTERN = {"gemma2": 2, "gemma3": 6}  # layer i is full iff (i + 1) % pattern == 0


def switches(cfg: ModelConfig | str) -> str:
    """What a config (or a family's row, by name) switches on, in one line (`lmforge info`)."""
    if isinstance(cfg, str):
        fam = dict(FAMILIES[cfg])
        if cfg in LAYER_PATTERN:
            fam["layer_types"] = layer_pattern(LAYER_PATTERN[cfg], LAYER_PATTERN[cfg])
        cfg = ModelConfig(family=cfg, **fam, n_layers=len(fam.get("layer_types") or [0]))
    c, on = cfg, []
    on.append("learned positions" if c.pos_emb == "learned" else f"RoPE theta={c.rope_theta:g}")
    if c.rope_scaling:
        on.append(f"{c.rope_scaling.get('rope_type')} RoPE scaling")
    if c.partial_rotary_factor != 1.0:
        on.append(f"partial rotary {c.partial_rotary_factor:g}")
    if c.rope_local_theta is not None:
        on.append(f"sliding layers' RoPE theta={c.rope_local_theta:g}")
    norm = "LayerNorm" if c.norm == "layernorm" else "RMSNorm x (1 + w)" if c.norm_unit_offset else "RMSNorm"
    where = [w for w, f in (("post-residual", c.post_norm), ("pre", c.pre_norm and not c.post_norm),
                            ("sub-layer output", c.sublayer_norm)) if f]  # fmt: skip
    on.append(f"{norm} ({' + '.join(where)})")
    if c.qk_norm:
        on.append(f"q/k RMSNorm ({'per head' if c.qk_norm == 'head' else 'all channels'})")
    act = {"silu": "SwiGLU", "gelu_tanh": "GeGLU (tanh)", "gelu": "GeGLU"}.get(c.act, c.act + " GLU")
    mlp = act if c.mlp == "glu" else f"{c.act} MLP"
    on.append(f"MoE {c.n_experts} experts top-{c.n_experts_per_tok} of {mlp}" if c.n_experts else mlp)
    if c.attn_bias:
        on.append("q/k/v/o biases")
    elif c.qkv_bias:
        on.append("q/k/v biases")
    if c.query_scale is not None:
        on.append(f"query scale {c.query_scale:g}^-0.5")
    if c.attn_softcap:
        on.append(f"attention soft-cap {c.attn_softcap:g}")
    if c.final_softcap:
        on.append(f"logit soft-cap {c.final_softcap:g}")
    if c.sliding_window:
        n = sum(c.layer_window(i) is not None for i in range(c.n_layers))
        every = "every layer" if n == c.n_layers else f"{n} of {c.n_layers} layers"
        on.append(f"sliding window {c.sliding_window} on {every}")
    if c.tie_embeddings:
        on.append("tied embeddings")
    if c.embed_scale:
        on.append("embeddings x sqrt(d)")
    if c.family == "phi3":
        on.append("files with fused qkv_proj / gate_up_proj")
    return ", ".join(on)


def layer_pattern(n_layers: int, every: int) -> list[str]:
    """HF's layer_types for `every`-th layer full, the others sliding (Gemma 2: 2, Gemma 3: 6)."""
    return ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]


# (d_model, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len). GQA ratios apply to RoPE families;
# gpt/gpt2 always use full multi-head attention (their HF schema has no kv-head count).
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "debug": (64, 2, 4, 2, 4096, 256),  # < 1M parameters: unit tests
    "tiny": (256, 6, 8, 4, 8192, 512),  # ~5M: learns on a laptop CPU in minutes
    "small": (512, 8, 8, 4, 16384, 1024),  # ~30M
    "125m": (768, 12, 12, 4, 32000, 2048),
    "350m": (1024, 24, 16, 8, 32000, 2048),
    "1b": (2048, 16, 32, 8, 32000, 4096),
}

# Named real-model shapes (random weights), used by the benchmarks.
NAMED: dict[str, dict] = {
    "smollm-135m": dict(
        family="llama",
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        vocab_size=49152,
        max_seq_len=2048,
        tie_embeddings=True,
        rope_theta=10000.0,
    ),
}


def _glu_width(d: int) -> int:
    """~8/3 d (same FLOPs as a 4d GELU MLP), rounded up to a multiple of 64 for fast matmuls."""
    return int(math.ceil(8 * d / 3 / 64) * 64)


def preset(family: str = "llama", size: str = "debug", **overrides) -> ModelConfig:
    """A ModelConfig for `family` at `size` (see SIZES), with any field overridden."""
    if size in NAMED:
        return ModelConfig(**{**FAMILIES[NAMED[size]["family"]], **NAMED[size], **overrides})
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join([*SIZES, *NAMED])}")
    d, n_layers, n_heads, n_kv, vocab, ctx = SIZES[size]
    fam = dict(FAMILIES[family])
    cfg = dict(
        d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab, max_seq_len=ctx
    )
    if fam["pos_emb"] == "learned":
        cfg.update(n_kv_heads=n_heads, d_ff=4 * d)
    else:
        cfg["d_ff"] = _glu_width(d)
    if family in ("gemma", "gemma2", "gemma3"):  # MQA at small sizes, wide GeGLU, head size independent
        cfg.update(n_kv_heads=1, head_dim=max(32, d // n_heads * 2) if size == "debug" else 256, d_ff=8 * d)
        cfg["n_heads"] = max(1, n_heads // 2) if size != "debug" else n_heads
    if family in ("mistral", "gemma2", "gemma3") and size in ("debug", "tiny"):
        fam["sliding_window"] = ctx // 4  # small enough that tests exercise it
    if family in LAYER_PATTERN:
        fam["layer_types"] = layer_pattern(overrides.get("n_layers", n_layers), LAYER_PATTERN[family])
    if family == "mixtral":
        cfg["d_ff"] = _glu_width(d) // 2  # experts are narrower; 8 of them with top-2
        if size == "debug":
            fam.update(n_experts=4, n_experts_per_tok=2)
    return ModelConfig(family=family, **{**fam, **cfg, **overrides})
