"""ModelConfig: one dataclass describes every decoder lmforge builds.

The six families differ only in a handful of switches (positions, norm, MLP, biases, tying, ...),
so a family is a row in FAMILIES and a size is a row in SIZES; `preset(family, size)` combines them.
`to_hf` / `from_hf` map to and from the family's Hugging Face `config.json` schema, so every
lmforge checkpoint loads in transformers and every local HF directory of these families loads here.

Validation runs in `__post_init__` and raises a ValueError naming the bad field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

# HF `model_type` of each family, and back.
HF_MODEL_TYPE = {
    "gpt": "openai-gpt",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "gemma": "gemma",
}
FAMILY_OF_MODEL_TYPE = {v: k for k, v in HF_MODEL_TYPE.items()}
HF_ARCHITECTURE = {
    "gpt": "OpenAIGPTLMHeadModel",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma": "GemmaForCausalLM",
}

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Shape and architecture switches of a decoder. Field docs double as CLI help."""

    family: str = "llama"
    """architecture family: gpt, gpt2, llama, mistral, mixtral or gemma"""
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
    """RoPE frequency scaling as in HF: None, {"rope_type": "linear", "factor": f} or llama3's"""
    norm: str = "rmsnorm"
    """rmsnorm or layernorm"""
    norm_eps: float = 1e-5
    """epsilon inside the norms"""
    norm_unit_offset: bool = False
    """Gemma: RMSNorm scales by (1 + w), with w initialised at 0"""
    post_norm: bool = False
    """original GPT: normalise after each residual add instead of before each sub-layer"""
    final_norm: bool = True
    """a norm after the last block (absent in original GPT)"""
    mlp: str = "glu"
    """mlp (up, act, down) or glu (act(gate) * up, down)"""
    act: str = "silu"
    """activation: gelu (erf), gelu_tanh, silu or relu"""
    attn_bias: bool = False
    """biases on the q/k/v/o projections"""
    mlp_bias: bool = False
    """biases on the MLP projections"""
    tie_embeddings: bool = False
    """share the output projection with the token embedding"""
    embed_scale: bool = False
    """Gemma: multiply token embeddings by sqrt(d_model)"""
    sliding_window: int | None = None
    """Mistral: each token attends to at most this many previous tokens (itself included)"""
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
            if kind in ("linear", "llama3") and not self.rope_scaling.get("factor", 0) > 0:
                bad("rope_scaling", "needs a positive 'factor'")
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

    def _layer_params(self, active: bool = False) -> int:
        d, f = self.d_model, self.d_ff
        attn = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d
        if self.attn_bias:
            attn += self.q_dim + 2 * self.kv_dim + d
        n_mats = 3 if self.mlp == "glu" else 2
        mlp = n_mats * d * f + ((n_mats - 1) * f + d if self.mlp_bias else 0)
        if self.n_experts:
            mlp = (
                mlp * (self.n_experts_per_tok if active else self.n_experts) + d * self.n_experts
            )  # + router
        norm = d * (2 if self.norm == "layernorm" else 1)
        return attn + mlp + 2 * norm

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
        if self.sliding_window:
            t = min(t, self.sliding_window)
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

    def to_hf(self) -> dict:
        return to_hf(self)

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        return from_hf(d)


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
    if family == "gemma":  # MQA at small sizes, wide GeGLU, head size independent of d_model
        cfg.update(n_kv_heads=1, head_dim=max(32, d // n_heads * 2) if size == "debug" else 256, d_ff=8 * d)
        cfg["n_heads"] = max(1, n_heads // 2) if size != "debug" else n_heads
    if family == "mistral" and size in ("debug", "tiny"):
        fam["sliding_window"] = ctx // 4  # small enough that tests exercise it
    if family == "mixtral":
        cfg["d_ff"] = _glu_width(d) // 2  # experts are narrower; 8 of them with top-2
        if size == "debug":
            fam.update(n_experts=4, n_experts_per_tok=2)
    return ModelConfig(family=family, **{**fam, **cfg, **overrides})


# ---------------------------------------------------------------------------------------------- HF mapping
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}
_ACT_FROM_HF = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}


def _hf_act(name: str | None, field_name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(
            f"config.json {field_name}={name!r} is not supported (supported: {', '.join(_ACT_FROM_HF)})"
        )
    return _ACT_FROM_HF[name]


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling")
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if scaling:
        params = {**params, **scaling}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config.json: RoPE scaling type {kind!r} is not supported by lmforge "
            f"(supported: {', '.join(ROPE_TYPES)}); loading it would give a wrong model"
        )
    if kind == "default":
        return float(theta), None
    params.pop("type", None)
    params["rope_type"] = kind
    return float(theta), params


def from_hf(d: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict of one of the six families."""
    mt = d.get("model_type")
    if mt not in FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"config.json model_type={mt!r} is not supported; lmforge reads {', '.join(FAMILY_OF_MODEL_TYPE)}"
        )
    family = FAMILY_OF_MODEL_TYPE[mt]
    ids = dict(
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )
    for k, v in list(ids.items()):  # HF allows a list of eos ids; lmforge keeps the first as the default
        if isinstance(v, list):
            ids[k] = v = v[0] if v else None
        if v is not None and not 0 <= v < d["vocab_size"]:  # transformers only warns about these too
            warnings.warn(
                f"config.json {k}={v} is outside the vocabulary of {d['vocab_size']}; ignoring it",
                stacklevel=2,
            )
            ids[k] = None
    extra = {k: d[k] for k in ("quantization_config", "lmforge") if k in d}
    if family in ("gpt", "gpt2"):
        if d.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("config.json scale_attn_by_inverse_layer_idx=true is not supported by lmforge")
        if d.get("scale_attn_weights") is False:
            raise ValueError("config.json scale_attn_weights=false is not supported by lmforge")
        n_embd = d.get("n_embd", 768)
        act_key = "afn" if family == "gpt" else "activation_function"
        act = d.get(act_key, "gelu" if family == "gpt" else "gelu_new")
        # Original GPT's "gelu" is the tanh approximation (HF's gelu_new).
        act = "gelu_tanh" if (family == "gpt" and act == "gelu") else _hf_act(act, act_key)
        return ModelConfig(
            family=family,
            **FAMILIES[family]
            | dict(
                act=act,
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=d.get("tie_word_embeddings", True),
            ),
            vocab_size=d["vocab_size"],
            d_model=n_embd,
            n_layers=d.get("n_layer", 12),
            n_heads=d.get("n_head", 12),
            d_ff=d.get("n_inner") or 4 * n_embd,
            max_seq_len=d.get("n_positions", 1024),
            init_std=d.get("initializer_range", 0.02),
            extra=extra,
            **ids,
        )
    theta, scaling = _rope_from_hf(d)
    fam = dict(FAMILIES[family])
    act_key = "hidden_activation" if family == "gemma" and d.get("hidden_activation") else "hidden_act"
    fam.update(
        act=_hf_act(d.get(act_key, "silu"), act_key),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=d.get("rms_norm_eps", fam["norm_eps"]),
        attn_bias=bool(d.get("attention_bias", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
        tie_embeddings=bool(d.get("tie_word_embeddings", family == "gemma")),
        sliding_window=d.get("sliding_window") if family in ("mistral", "mixtral") else None,
    )
    if d.get("use_sliding_window") is False:
        fam["sliding_window"] = None
    if family == "mixtral":
        fam.update(
            n_experts=d.get("num_local_experts", 8),
            n_experts_per_tok=d.get("num_experts_per_tok", 2),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.02),
        )
    return ModelConfig(
        family=family,
        **fam,
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"),
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        init_std=d.get("initializer_range", 0.02),
        extra=extra,
        **ids,
    )


def to_hf(c: ModelConfig) -> dict:
    """The family's Hugging Face config.json dict for `c` (errors if the family cannot express it)."""
    base = FAMILIES[c.family]
    # The HF implementations of a family hard-code some switches; refuse configs they cannot express.
    fixed = [
        k
        for k in ("pos_emb", "norm", "post_norm", "final_norm", "mlp", "norm_unit_offset", "embed_scale")
        if getattr(c, k) != base.get(k, getattr(ModelConfig, k, None))
    ]
    if fixed:
        raise ValueError(
            f"a {c.family} checkpoint cannot express {', '.join(fixed)} != the family's value; "
            "pick the family that has these switches"
        )
    d: dict = {
        "architectures": [HF_ARCHITECTURE[c.family]],
        "model_type": HF_MODEL_TYPE[c.family],
        "vocab_size": c.vocab_size,
    }
    ids = {k: getattr(c, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if c.family in ("gpt", "gpt2"):
        if c.n_kv_heads != c.n_heads or c.head_dim * c.n_heads != c.d_model:
            raise ValueError(
                f"{c.family} checkpoints need n_kv_heads == n_heads and head_dim == d_model // n_heads"
            )
        if not (c.attn_bias and c.mlp_bias):
            raise ValueError(
                f"{c.family} checkpoints always have biases (attn_bias and mlp_bias must be true)"
            )
        d.update(
            n_embd=c.d_model,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            n_positions=c.max_seq_len,
            layer_norm_epsilon=c.norm_eps,
            initializer_range=c.init_std,
            tie_word_embeddings=c.tie_embeddings,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
        )
        if c.family == "gpt":
            if c.d_ff != 4 * c.d_model:
                raise ValueError("gpt (openai-gpt) checkpoints need d_ff == 4 * d_model")
            if c.act not in ("gelu_tanh", "relu", "silu"):
                raise ValueError("gpt (openai-gpt) supports act gelu_tanh, relu or silu")
            d.update(afn={"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"}[c.act], **ids)
        else:
            d.update(
                n_inner=c.d_ff,
                activation_function={"gelu_tanh": "gelu_new"}.get(c.act, c.act),
                scale_attn_weights=True,
                **ids,
            )
        return d | {k: v for k, v in c.extra.items()}
    d.update(
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        initializer_range=c.init_std,
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=c.dropout,
        rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_scaling is None
        else {**c.rope_scaling, "rope_theta": c.rope_theta},
        **ids,
    )
    act = _ACT_TO_HF[c.act]
    if c.family == "gemma":
        d.update(hidden_act=act, hidden_activation=act, attention_bias=c.attn_bias)
    else:
        d["hidden_act"] = act
    if c.family == "llama":
        d.update(attention_bias=c.attn_bias, mlp_bias=c.mlp_bias)
    elif c.mlp_bias or (c.attn_bias and c.family != "gemma"):
        raise ValueError(
            f"{c.family} checkpoints cannot express these projection biases; "
            "set attn_bias/mlp_bias to false or use the llama family"
        )
    if c.family in ("mistral", "mixtral"):
        d["sliding_window"] = c.sliding_window
    elif c.sliding_window is not None:
        raise ValueError(f"{c.family} has no sliding window; use the mistral family")
    if c.family == "mixtral":
        d.update(
            num_local_experts=c.n_experts,
            num_experts_per_tok=c.n_experts_per_tok,
            router_aux_loss_coef=c.router_aux_loss_coef,
        )
    elif c.n_experts:
        raise ValueError(f"{c.family} has no mixture of experts; use the mixtral family")
    return d | {k: v for k, v in c.extra.items()}
