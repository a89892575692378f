"""The one mapping between lmforge and Hugging Face: config.json fields, tensor names, transforms.

Used by plain loading and saving (checkpoint.py), by quantized loading (compress/qlinear.py) and by
every exporter that needs HF names; nobody else re-implements it.

Our tensor names (per block i): blocks.{i}.attn_norm (before attention), blocks.{i}.attn.wqkv (rows
[q; k; v]), blocks.{i}.attn.wo, blocks.{i}.attn.q_norm / k_norm (Qwen3, Gemma 3: (head_dim,); OLMo 2:
(q_dim,) / (kv_dim,)), blocks.{i}.attn_post_norm (on the attention output: Gemma 2/3, OLMo 2),
blocks.{i}.mlp_norm (before the MLP), blocks.{i}.mlp.w_in (rows [gate; up] for GLU), blocks.{i}.mlp.w_out,
blocks.{i}.mlp_post_norm; tok_emb, pos_emb, norm, lm_head.

`layout(cfg)` lists (our name, HF names, how) for every tensor; how is one of
    same         the tensor as it is
    T            transposed (GPT's Conv1D stores (in, out))
    cat          our rows are the HF tensors stacked (split sizes: `cat_sizes`)
    experts_in   Mixtral: per-expert w1 (gate), w3 (up) stacked into (E, 2 ff, d)
    experts_out  Mixtral: per-expert w2 stacked into (E, d, ff)
`to_hf_tensors` / `from_hf_tensors` apply one row; `to_hf_state_dict` / `from_hf_state_dict` a model.

`config_from_hf` keeps every config.json field it does not read in `ModelConfig.extra`, and
`config_to_hf` writes them back unchanged (GPT-2's dropout rates, Qwen's max_window_layers, auto_map ...).
"""

from __future__ import annotations

import warnings

import torch

from lmforge.config import (
    FAMILIES,
    FAMILY_OF_MODEL_TYPE,
    HF_ARCHITECTURE,
    HF_MODEL_TYPE,
    LAYER_PATTERN,
    ROPE_TYPES,
    ModelConfig,
    layer_pattern,
)
from lmforge.utils import UserError

# --------------------------------------------------------------------------------------------- tensors
GPT_PREFIX = "transformer."  # GPT/GPT-2 names as transformers saves them; hub GPT-2 files omit it
# Buffers some HF checkpoints carry that are not weights (GPT-2's causal mask, RoPE caches).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def layout(cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, HF names, how) for every tensor of a `cfg` model (see the module docstring)."""
    rows: list[tuple[str, list[str], str]] = []
    if cfg.family in ("gpt", "gpt2"):
        p = GPT_PREFIX
        emb, pos = ("tokens_embed", "positions_embed") if cfg.family == "gpt" else ("wte", "wpe")
        rows += [
            ("tok_emb.weight", [p + emb + ".weight"], "same"),
            ("pos_emb.weight", [p + pos + ".weight"], "same"),
        ]
        for i in range(cfg.n_layers):
            h, b = f"{p}h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                rows += [(f"{b}{ours}.{w}", [f"{h}{theirs}.{w}"], "same") for w in ("weight", "bias")]
            for ours, theirs in (
                ("attn.wqkv", "attn.c_attn"),
                ("attn.wo", "attn.c_proj"),
                ("mlp.w_in", "mlp.c_fc"),
                ("mlp.w_out", "mlp.c_proj"),
            ):
                rows += [
                    (f"{b}{ours}.weight", [f"{h}{theirs}.weight"], "T"),
                    (f"{b}{ours}.bias", [f"{h}{theirs}.bias"], "same"),
                ]
        if cfg.final_norm:
            rows += [(f"norm.{w}", [f"{p}ln_f.{w}"], "same") for w in ("weight", "bias")]
    else:
        for i in range(cfg.n_layers):
            rows += _block_rows(cfg, f"model.layers.{i}.", f"blocks.{i}.")
        rows += [
            ("tok_emb.weight", ["model.embed_tokens.weight"], "same"),
            ("norm.weight", ["model.norm.weight"], "same"),
        ]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", ["lm_head.weight"], "same"))
    return rows


def _block_rows(cfg: ModelConfig, h: str, b: str) -> list[tuple[str, list[str], str]]:
    rows = []
    sandwich = cfg.pre_norm and cfg.sublayer_norm  # Gemma 2/3 name the pre-MLP norm differently
    norms = []
    if cfg.pre_norm:
        norms += [("attn_norm", "input_layernorm")]
        norms += [("mlp_norm", "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm")]
    if cfg.sublayer_norm:
        norms += [
            ("attn_post_norm", "post_attention_layernorm"),
            ("mlp_post_norm", "post_feedforward_layernorm"),
        ]
    rows += [(f"{b}{ours}.weight", [f"{h}{theirs}.weight"], "same") for ours, theirs in norms]
    a = f"{h}self_attn."
    qkv_w = ("weight", "bias") if (cfg.attn_bias or cfg.qkv_bias) else ("weight",)
    fused = cfg.family == "phi3"  # Phi-3 stores q/k/v and gate/up fused, as we do
    for w in qkv_w:
        theirs = [f"{a}qkv_proj.{w}"] if fused else [f"{a}{x}_proj.{w}" for x in "qkv"]
        rows.append((f"{b}attn.wqkv.{w}", theirs, "same" if fused else "cat"))
    rows += [(f"{b}attn.wo.{w}", [f"{a}o_proj.{w}"], "same") for w in ("weight", "bias")[: 1 + cfg.attn_bias]]
    if cfg.qk_norm:
        rows += [(f"{b}attn.{x}_norm.weight", [f"{a}{x}_norm.weight"], "same") for x in "qk"]
    if cfg.n_experts:
        m = f"{h}block_sparse_moe."
        E = range(cfg.n_experts)
        rows += [
            (f"{b}mlp.router.weight", [f"{m}gate.weight"], "same"),
            (f"{b}mlp.w_in", [f"{m}experts.{e}.{w}.weight" for e in E for w in ("w1", "w3")], "experts_in"),
            (f"{b}mlp.w_out", [f"{m}experts.{e}.w2.weight" for e in E], "experts_out"),
        ]
        return rows
    m = f"{h}mlp."
    for w in ("weight", "bias") if cfg.mlp_bias else ("weight",):
        if fused:
            rows.append((f"{b}mlp.w_in.{w}", [f"{m}gate_up_proj.{w}"], "same"))
        else:
            rows.append((f"{b}mlp.w_in.{w}", [f"{m}gate_proj.{w}", f"{m}up_proj.{w}"], "cat"))
        rows.append((f"{b}mlp.w_out.{w}", [f"{m}down_proj.{w}"], "same"))
    return rows


def cat_sizes(cfg: ModelConfig, theirs: list[str]) -> list[int]:
    """Row counts of the HF tensors a `cat` row stacks: [q, k, v] or [gate, up]."""
    return [cfg.q_dim, cfg.kv_dim, cfg.kv_dim] if len(theirs) == 3 else [cfg.d_ff, cfg.d_ff]


def to_hf_tensors(cfg: ModelConfig, t: torch.Tensor, theirs: list[str], how: str, rows_only: bool = False):
    """[(HF name, tensor)] for our tensor `t` of one layout row. rows_only: `t` is stored (out, in)
    whatever the family (quantized weights), so T keeps it as it is."""
    if how == "same" or (how == "T" and rows_only):
        return [(theirs[0], t)]
    if how == "T":
        return [(theirs[0], t.t())]
    if how == "cat":
        return list(zip(theirs, t.split(cat_sizes(cfg, theirs), dim=0)))
    if how == "experts_in":  # (E, 2 ff, d) -> w1 (gate), w3 (up) per expert
        out = []
        for e in range(cfg.n_experts):
            out += zip(theirs[2 * e : 2 * e + 2], t[e].split([cfg.d_ff, cfg.d_ff], dim=0))
        return out
    if how == "experts_out":
        return [(theirs[e], t[e]) for e in range(cfg.n_experts)]
    raise ValueError(f"unknown layout transform {how!r}")


def from_hf_tensors(
    cfg: ModelConfig, ts: list[torch.Tensor], how: str, rows_only: bool = False
) -> torch.Tensor:
    """Our tensor from the HF tensors `ts` of one layout row (the inverse of to_hf_tensors)."""
    if how == "same" or (how == "T" and rows_only):
        return ts[0]
    if how == "T":
        return ts[0].t()
    if how == "cat":
        return torch.cat(ts, dim=0)
    if how == "experts_in":
        return torch.stack([torch.cat(ts[2 * e : 2 * e + 2], 0) for e in range(cfg.n_experts)])
    if how == "experts_out":
        return torch.stack(ts)
    raise ValueError(f"unknown layout transform {how!r}")


def name_aliases(cfg: ModelConfig, name: str) -> list[str]:
    """Other names a file may use for the HF tensor `name`: GPT-2 as the hub ships it has no
    `transformer.` prefix (transformers accepts both)."""
    if cfg.family in ("gpt", "gpt2") and name.startswith(GPT_PREFIX):
        return [name[len(GPT_PREFIX) :]]
    return []


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our parameters under HF names and layouts (contiguous, ready for safetensors)."""
    cfg, sd = model.config, model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, how in layout(cfg):
        out.update(to_hf_tensors(cfg, sd[ours].detach(), theirs, how))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, get, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our state dict from HF tensors; get(name) returns a tensor or None when absent."""
    out: dict[str, torch.Tensor] = {}
    missing = []
    for ours, theirs, how in layout(cfg):
        ts = [get(n) for n in theirs]
        gone = [n for n, t in zip(theirs, ts) if t is None]
        if gone:
            missing += gone
            continue
        out[ours] = from_hf_tensors(cfg, ts, how)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise UserError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}{more}; the weights do not match config.json"
        )
    return out


# --------------------------------------------------------------------------------------------- config.json
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
GEMMAS = ("gemma", "gemma2", "gemma3")
# Fields never carried in `extra`: save_model writes its own.
_NOT_CARRIED = {"torch_dtype", "dtype", "transformers_version"}
# What each family's HF config can express beyond the Llama baseline (to_hf refuses anything else).
_CAN = {
    "llama": {"attn_bias", "mlp_bias"},
    "mistral": {"sliding_window"},
    "mixtral": {"sliding_window", "n_experts"},
    "gemma": {"attn_bias"},
    "qwen2": {"sliding_window", "layer_types"},
    "qwen3": {"attn_bias", "sliding_window", "layer_types"},
    "gemma2": {"attn_bias", "sliding_window", "layer_types", "attn_softcap", "final_softcap", "query_scale"},
    "gemma3": {
        "attn_bias",
        "sliding_window",
        "layer_types",
        "attn_softcap",
        "final_softcap",
        "query_scale",
        "rope_local_theta",
    },
    "phi3": {"sliding_window", "partial_rotary_factor"},
    "olmo2": {"attn_bias"},
}


class _Reads(dict):
    """A config.json dict that records which fields were read (the rest go to `extra`)."""

    def __init__(self, d):
        super().__init__(d)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)


def _hf_act(name: str | None, field_name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(
            f"config.json {field_name}={name!r} is not supported (supported: {', '.join(_ACT_FROM_HF)})"
        )
    return _ACT_FROM_HF[name]


def _rope_from_hf(d: dict, family: str) -> tuple[float, dict | None, float | None, float]:
    """(rope_theta, rope_scaling, local theta, partial_rotary_factor) from either schema: transformers
    >= 5 writes `rope_parameters` (Gemma 3: one dict per layer type), older versions `rope_theta` +
    `rope_scaling` (+ Gemma 3's `rope_local_base_freq`, Phi's top-level fields)."""
    params = dict(d.get("rope_parameters") or {})
    local = None
    if "full_attention" in params or "sliding_attention" in params:  # per layer type
        local = (params.get("sliding_attention") or {}).get("rope_theta")
        params = dict(params.get("full_attention") or {})
    if d.get("rope_local_base_freq") is not None:
        local = d["rope_local_base_freq"]
    scaling = d.get("rope_scaling")
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or FAMILIES[family].get("rope_theta", 1e4)
    partial = params.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    if scaling:
        params = {**params, **scaling}
    kind = params.get("rope_type", params.get("type", "default"))
    if family == "phi3" and kind in ("su", "yarn"):  # Phi-3's legacy names of longrope (as transformers)
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config.json: RoPE scaling type {kind!r} is not supported by lmforge "
            f"(supported: {', '.join(ROPE_TYPES)}); loading it would give a wrong model"
        )
    if family == "gemma3" and local is None:
        local = 1e4  # transformers' default rope_local_base_freq
    if kind == "default":
        return float(theta), None, local, float(partial)
    params.pop("type", None)
    params.pop("rope_theta", None)
    params["rope_type"] = kind
    if kind in ("llama3", "yarn", "longrope"):
        # Phi-3 keeps the pretraining length at the top level, and transformers prefers it there.
        top = d.get("original_max_position_embeddings") if family == "phi3" else None
        params["original_max_position_embeddings"] = (
            top or params.get("original_max_position_embeddings") or d.get("max_position_embeddings", 2048)
        )
    return float(theta), params, local, float(partial)


def _layer_types(d: dict, family: str, n_layers: int, window: int | None) -> list[str] | None:
    if window is None or family not in ("qwen2", "qwen3", "gemma2", "gemma3"):
        return None
    if d.get("layer_types"):
        return list(d["layer_types"])
    if family in LAYER_PATTERN:
        every = d.get("sliding_window_pattern") or LAYER_PATTERN[family]
        return layer_pattern(n_layers, every)
    first = d.get("max_window_layers", 28)  # Qwen: layers from max_window_layers on slide
    return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]


def _token_ids(d: dict) -> tuple[dict, dict]:
    """(bos/eos/pad ids for ModelConfig, fields to carry in extra). A list of eos ids keeps its first
    as the default and the whole list in extra (written back as it was)."""
    ids, keep = {}, {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = d.get(k)
        if isinstance(v, list):
            keep[k] = v
            v = v[0] if v else None
        if v is not None and not 0 <= v < d["vocab_size"]:  # transformers only warns about these too
            warnings.warn(
                f"config.json {k}={v} is outside the vocabulary of {d['vocab_size']}; ignoring it",
                stacklevel=3,
            )
            keep[k] = d[k]
            v = None
        ids[k] = v
    return ids, keep


def config_from_hf(raw: dict) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict of one of the families."""
    d = _Reads(raw)
    mt = d.get("model_type")
    if mt not in FAMILY_OF_MODEL_TYPE:
        raise ValueError(
            f"config.json model_type={mt!r} is not supported; lmforge reads {', '.join(FAMILY_OF_MODEL_TYPE)}"
        )
    family = FAMILY_OF_MODEL_TYPE[mt]
    d.get("architectures")
    ids, keep = _token_ids(d)
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
        cfg = ModelConfig(
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
            **ids,
        )
        return _with_extra(cfg, raw, d.read, keep)
    theta, scaling, local, partial = _rope_from_hf(d, family)
    fam = dict(FAMILIES[family])
    if family in GEMMAS:
        # transformers runs every Gemma with hidden_activation (default tanh GELU); Gemma 1's legacy
        # hidden_act "gelu" means the tanh approximation too.
        act = d.get("hidden_activation") or "gelu_pytorch_tanh"
        act = _hf_act(act, "hidden_activation")
        d.get("hidden_act")
    else:
        act = _hf_act(d.get("hidden_act", "silu"), "hidden_act")
    n_layers, n_heads = d["num_hidden_layers"], d["num_attention_heads"]
    head_dim = d.get("head_dim") if family != "phi3" else None  # Phi-3 derives it from hidden_size
    window = None
    if family in ("mistral", "mixtral", "phi3", "gemma2", "gemma3"):
        window = d.get("sliding_window")
    elif family in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        window = d.get("sliding_window")
    if window is not None and window >= d.get("max_position_embeddings", 2048) and family in ("phi3",):
        window = None  # Phi-3.5 / Phi-4-mini: a window longer than the context is no window
        d.read.discard("sliding_window")
    layer_types = _layer_types(d, family, n_layers, window)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    fam.update(
        act=act,
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        rope_local_theta=local,
        norm_eps=d.get("rms_norm_eps", fam["norm_eps"]),
        attn_bias=bool(d.get("attention_bias", False)) and family != "qwen2",
        mlp_bias=bool(d.get("mlp_bias", False)) if family == "llama" else False,
        tie_embeddings=bool(d.get("tie_word_embeddings", family in GEMMAS)),
        sliding_window=window,
        layer_types=layer_types,
    )
    if family in ("gemma2", "gemma3"):
        hd = head_dim or d["hidden_size"] // n_heads
        q = d.get("query_pre_attn_scalar", 256)
        fam.update(
            attn_softcap=d.get("attn_logit_softcapping"),
            final_softcap=d.get("final_logit_softcapping"),
            query_scale=None if q == hd else q,
        )
        if d.get("use_bidirectional_attention"):
            raise ValueError("config.json use_bidirectional_attention=true (an encoder) is not supported")
    if family == "mixtral":
        fam.update(
            n_experts=d.get("num_local_experts", 8),
            n_experts_per_tok=d.get("num_experts_per_tok", 2),
            router_aux_loss_coef=d.get("router_aux_loss_coef", 0.02),
        )
    cfg = ModelConfig(
        family=family,
        **fam,
        vocab_size=d["vocab_size"],
        d_model=d["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048),
        init_std=d.get("initializer_range", 0.02),
        **ids,
    )
    return _with_extra(cfg, raw, d.read, keep)


def _with_extra(cfg: ModelConfig, raw: dict, read: set[str], keep: dict) -> ModelConfig:
    """`cfg` with every field of `raw` it was not built from kept in extra (unless config_to_hf writes
    that very value anyway), so that saving writes them back unchanged (GPT-2's dropout rates, ...)."""
    written = config_to_hf(cfg)
    extra = {
        k: v
        for k, v in raw.items()
        if k not in read and k not in _NOT_CARRIED and not (k in written and written[k] == v)
    }
    extra.update(keep)
    return cfg.replace(extra=extra) if extra else cfg


def config_to_hf(c: ModelConfig) -> dict:
    """The family's Hugging Face config.json dict for `c` (errors if the family cannot express it)."""
    base = FAMILIES[c.family]
    # The HF implementations of a family hard-code some switches; refuse configs they cannot express.
    fixed = [
        k
        for k in (
            "pos_emb",
            "norm",
            "post_norm",
            "pre_norm",
            "sublayer_norm",
            "final_norm",
            "mlp",
            "norm_unit_offset",
            "embed_scale",
            "qk_norm",
            "qkv_bias",
        )
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
        return _gpt_to_hf(c, d, ids) | c.extra
    can = _CAN[c.family]
    for name, why in (
        ("attn_bias", "projection biases"),
        ("mlp_bias", "MLP biases"),
        ("n_experts", "a mixture of experts"),
        ("attn_softcap", "attention soft-capping"),
        ("final_softcap", "logit soft-capping"),
        ("query_scale", "a query scale"),
        ("rope_local_theta", "a separate RoPE base for sliding layers"),
        ("layer_types", "per-layer sliding windows"),
        ("sliding_window", "a sliding window"),
    ):
        if getattr(c, name) and name not in can:
            raise ValueError(
                f"{c.family} checkpoints cannot express {why} ({name}); use a family that has it"
            )
    if c.partial_rotary_factor != 1.0 and "partial_rotary_factor" not in can:
        raise ValueError(f"{c.family} checkpoints cannot express partial_rotary_factor; use phi3")
    if c.family == "phi3" and c.head_dim * c.n_heads != c.d_model:
        raise ValueError("phi3 checkpoints need head_dim == d_model // n_heads")
    if c.family in ("qwen2", "qwen3") and c.sliding_window and c.layer_types is None:
        raise ValueError(f"{c.family} slides per layer: set layer_types along with sliding_window")
    scaling = dict(c.rope_scaling) if c.rope_scaling else None
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
        rope_scaling=scaling,
        **ids,
    )
    params = (
        {"rope_type": "default", "rope_theta": c.rope_theta}
        if scaling is None
        else {**scaling, "rope_theta": c.rope_theta}
    )
    if c.family == "phi3":
        del d["head_dim"]
        if c.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = params["partial_rotary_factor"] = c.partial_rotary_factor
        if scaling and "original_max_position_embeddings" in scaling:
            d["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if c.family == "gemma3":  # one RoPE per layer type
        local = c.rope_local_theta or c.rope_theta
        d["rope_local_base_freq"] = local
        params = {
            "full_attention": params,
            "sliding_attention": {"rope_type": "default", "rope_theta": local},
        }
    d["rope_parameters"] = params
    act = _ACT_TO_HF[c.act]
    if c.family in GEMMAS:
        d.update(hidden_act=act, hidden_activation=act)
    else:
        d["hidden_act"] = act
    if "attn_bias" in can:
        d["attention_bias"] = c.attn_bias
    if c.family == "llama":
        d["mlp_bias"] = c.mlp_bias
    if c.family in ("gemma2", "gemma3"):
        d.update(
            query_pre_attn_scalar=c.query_scale or c.head_dim,
            attn_logit_softcapping=c.attn_softcap,
            final_logit_softcapping=c.final_softcap,
        )
    if "sliding_window" in can:
        d["sliding_window"] = c.sliding_window
    if "layer_types" in can and c.layer_types is not None:
        d["layer_types"] = list(c.layer_types)
    if c.family in ("qwen2", "qwen3"):
        d["use_sliding_window"] = c.sliding_window is not None
        if c.layer_types and c.sliding_window:
            d["max_window_layers"] = next(
                (i for i, t in enumerate(c.layer_types) if t == "sliding_attention"), 0
            )
    if c.family == "mixtral":
        d.update(
            num_local_experts=c.n_experts,
            num_experts_per_tok=c.n_experts_per_tok,
            router_aux_loss_coef=c.router_aux_loss_coef,
        )
    return d | c.extra


def _gpt_to_hf(c: ModelConfig, d: dict, ids: dict) -> dict:
    if c.n_kv_heads != c.n_heads or c.head_dim * c.n_heads != c.d_model:
        raise ValueError(
            f"{c.family} checkpoints need n_kv_heads == n_heads and head_dim == d_model // n_heads"
        )
    if not (c.attn_bias and c.mlp_bias):
        raise ValueError(f"{c.family} checkpoints always have biases (attn_bias and mlp_bias must be true)")
    for name in (
        "qkv_bias",
        "qk_norm",
        "attn_softcap",
        "final_softcap",
        "query_scale",
        "sliding_window",
        "layer_types",
    ):
        if getattr(c, name):
            raise ValueError(f"{c.family} checkpoints cannot express {name}")
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
    return d
