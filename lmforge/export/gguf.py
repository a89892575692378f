"""GGUF export for llama.cpp (and Ollama): every family lmforge loads that llama.cpp has.

`export_gguf(ckpt, "model.gguf", dtype="q4_k_m")` writes one file with the metadata llama.cpp reads
(architecture, widths, head counts, RoPE base and scaling, norm epsilon, experts, sliding-window
pattern, soft-caps), the tokenizer (byte-level BPE or SentencePiece-style, with special ids and the
chat template) and the weights.

How our tensors become llama.cpp's, as llama.cpp's own convert_hf_to_gguf.py does it:
- The model is first written under its Hugging Face names and layouts (`checkpoint.to_hf_state_dict`,
  the one HF mapping), and gguf-py's `TensorNameMap` for the architecture names each tensor; so the
  names are llama.cpp's own table, context included (Gemma 2's post_attention_layernorm is a
  post-attention norm, Llama's is the FFN norm).
- Per architecture (rows of ARCHS): llama (llama, mistral, mixtral) rotates *adjacent* channel pairs
  while HF rotates (i, i + hd/2), so Q/K rows are permuted within each head (`_permute`); Gemma's
  RMSNorms scale by (1 + w), so 1 is added to every norm weight; Mixtral's experts are stacked
  (E, ff, d); GPT-2's Conv1D weights are transposed back; llama3 RoPE scaling becomes a
  `rope_freqs` tensor and Phi-3 longrope two `rope_factors_*` tensors.

dtype: f32, f16 or bf16 for matrices (norms, biases, the MoE router and positions stay f32, as in
llama.cpp's converter), q8_0 (written here), or one of llama.cpp's quantization types (QUANT_TYPES:
q4_0 ... q6_k, k-quants), which llama.cpp's own quantizer (`llama_model_quantize`, lmforge.export.
llama_cpp) makes from a temporary f32 file, optionally with an importance matrix from calibration text.
Every quantized matrix must have rows that are a multiple of 32 values; k-quants need 256 and, as in
llama.cpp, a tensor whose rows are not falls back to a 32-block type (q5_0, q5_1 or q8_0).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.export.targets import GGUF_DTYPES, QUANT_TYPES, check_out_path
from lmforge.utils import UserError, atomic_path, temp_prefix

DTYPES = GGUF_DTYPES
BLOCK = 32  # values per block of every quantized type (the k-quants' super-blocks are 256)

# One row per lmforge family llama.cpp has: its architecture and what that architecture requires of the
# config (field -> value; a tuple: any of these). openai-gpt (post-norm, no final norm) has none.
_GLU = dict(mlp="glu", norm="rmsnorm", pos_emb="rope", post_norm=False, final_norm=True, mlp_bias=False)
_PLAIN = dict(  # no Gemma / OLMo / Qwen3 extras
    _GLU, norm_unit_offset=False, embed_scale=False, pre_norm=True, sublayer_norm=False, qk_norm=None
)
_NO_CAPS = dict(attn_softcap=None, final_softcap=None, query_scale=None)
_GEMMA = dict(
    _GLU, act="gelu_tanh", norm_unit_offset=True, embed_scale=True, tie_embeddings=True, attn_bias=False
)
ARCHS: dict[str, dict] = {
    "llama": dict(arch="llama", need=dict(_PLAIN, **_NO_CAPS, act="silu", qkv_bias=False)),
    "mistral": dict(arch="llama", need=dict(_PLAIN, **_NO_CAPS, act="silu", qkv_bias=False)),
    "mixtral": dict(arch="llama", need=dict(_PLAIN, **_NO_CAPS, act="silu", qkv_bias=False)),
    "qwen2": dict(arch="qwen2", need=dict(_PLAIN, **_NO_CAPS, act="silu", attn_bias=False, qkv_bias=True)),
    "qwen3": dict(
        arch="qwen3",
        need=dict(_PLAIN, **_NO_CAPS, act="silu", attn_bias=False, qkv_bias=False, qk_norm="head"),
    ),
    "phi3": dict(arch="phi3", need=dict(_PLAIN, **_NO_CAPS, act="silu", attn_bias=False, qkv_bias=False)),
    "olmo2": dict(
        arch="olmo2",
        need=dict(
            _GLU,
            **_NO_CAPS,
            act="silu",
            norm_unit_offset=False,
            embed_scale=False,
            pre_norm=False,
            sublayer_norm=True,
            qk_norm="full",
            attn_bias=False,
            qkv_bias=False,
        ),
    ),
    "gemma": dict(
        arch="gemma", need=dict(_GEMMA, **_NO_CAPS, pre_norm=True, sublayer_norm=False, qk_norm=None)
    ),
    "gemma2": dict(
        arch="gemma2", need=dict(_GEMMA, pre_norm=True, sublayer_norm=True, qk_norm=None, qkv_bias=False)
    ),
    "gemma3": dict(
        arch="gemma3",
        need=dict(
            _GEMMA, pre_norm=True, sublayer_norm=True, qk_norm="head", attn_softcap=None, qkv_bias=False
        ),
    ),
    "gpt2": dict(
        arch="gpt2",
        need=dict(
            act="gelu_tanh",
            mlp="mlp",
            norm="layernorm",
            pos_emb="learned",
            attn_bias=True,
            mlp_bias=True,
            post_norm=False,
            final_norm=True,
        ),
    ),
}
GGUF_ARCH = {family: row["arch"] for family, row in ARCHS.items()}
_PERMUTED = {"llama"}  # architectures with llama.cpp's "normal" (adjacent-pair) RoPE: Q/K rows permuted
_UNIT_NORMS = {"gemma", "gemma2", "gemma3"}
# llama.cpp scales Gemma 2/3 attention by 1/sqrt(d_model / n_heads) for the 27B shapes it recognises by
# depth, else by 1/sqrt(head_dim): query_pre_attn_scalar must be the one it will pick.
_BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}  # RMSNorm by (1 + w): llama.cpp multiplies by w


def _gguf():
    import gguf  # imported lazily: an optional dependency (pip install lmforge[export])

    return gguf


# ---------------------------------------------------------------------------------------------- checks
def check_supported(cfg) -> str:
    """The llama.cpp architecture for `cfg`, or a UserError saying what llama.cpp cannot express."""
    if cfg.family not in ARCHS:
        raise UserError(
            f"GGUF export does not support the {cfg.family!r} family: llama.cpp has no architecture for it"
            f"{' (original GPT: post-norm, no final norm)' if cfg.family == 'gpt' else ''}. Supported: "
            f"{', '.join(ARCHS)}; use --format onnx for this model"
        )
    arch = ARCHS[cfg.family]["arch"]
    bad = [
        f"{k}={getattr(cfg, k)!r} (llama.cpp's {arch} needs {v!r})"
        for k, v in ARCHS[cfg.family]["need"].items()
        if hasattr(cfg, k) and getattr(cfg, k) != v
    ]
    if cfg.n_experts and arch != "llama":
        bad.append(f"experts (llama.cpp's {arch} has none)")
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "llama3" and arch != "llama":
        bad.append(f"rope_scaling {kind} (only the llama architecture reads rope_freqs)")
    if kind == "longrope" and arch != "phi3":
        bad.append(f"rope_scaling {kind} (only llama.cpp's phi3 reads rope factors)")
    rotary = getattr(cfg, "rotary_dim", cfg.head_dim)
    if rotary != cfg.head_dim and arch in _PERMUTED:
        bad.append(f"partial rotary ({rotary} of {cfg.head_dim} channels) with llama.cpp's {arch} RoPE")
    qs = getattr(cfg, "query_scale", None)
    want = cfg.head_dim
    if cfg.n_layers == _BIG_GEMMA_LAYERS.get(arch):
        want = cfg.d_model // cfg.n_heads
    if qs is not None and qs != want:
        bad.append(f"query_scale={qs} (llama.cpp's {arch} of this depth scales attention by {want} ** -0.5)")
    layer_types = getattr(cfg, "layer_types", None)
    if arch in ("gemma2", "gemma3") and cfg.sliding_window is None:
        bad.append(f"no sliding_window (llama.cpp's {arch} has sliding layers)")
    if layer_types and arch not in ("gemma2", "gemma3") and "full_attention" in layer_types:
        if cfg.sliding_window is not None and "sliding_attention" in layer_types:
            bad.append(f"a per-layer sliding-window pattern (llama.cpp's {arch} has none)")
    if bad:
        raise UserError(f"this {cfg.family} checkpoint cannot be written as GGUF: {'; '.join(bad)}")
    return arch


# ---------------------------------------------------------------------------------------------- tensors
def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Q/K projection (or bias) from rotate-half to llama.cpp's interleaved RoPE layout:
    within each head, row i of the first half and row i of the second half become rows 2i, 2i+1."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_freq_factors(cfg) -> torch.Tensor:
    """llama3 scaling as llama.cpp applies it: theta_i = pos * base^(-2i/d) / factor_i."""
    from lmforge.model import rope_inv_freq

    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    return plain / rope_inv_freq(cfg)


def _name_map(cfg):
    g = _gguf()
    arch = next(k for k, v in g.MODEL_ARCH_NAMES.items() if v == GGUF_ARCH[cfg.family])
    return g.get_tensor_name_map(arch, cfg.n_layers)


def gguf_name(cfg, hf_name: str) -> str:
    """llama.cpp's name for the HF tensor `hf_name` of a `cfg` model ("model.layers.0.self_attn.q_proj.
    weight" -> "blk.0.attn_q.weight"), by gguf-py's table for the architecture."""
    name = _name_map(cfg).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"GGUF: llama.cpp's {GGUF_ARCH[cfg.family]} has no tensor for {hf_name}")
    return name


def gguf_tensor_name(cfg, our_name: str) -> list[str]:
    """llama.cpp's names for one lmforge parameter (several where we fuse what llama.cpp splits:
    blocks.0.attn.wqkv.weight -> [blk.0.attn_q.weight, blk.0.attn_k.weight, blk.0.attn_v.weight], in
    row order). For LoRA exports: note that llama-architecture Q/K rows are also `_permute`d."""
    from lmforge.hf import layout

    for ours, theirs, _how in layout(cfg):
        if ours == our_name:
            return list(dict.fromkeys(gguf_name(cfg, t) for t in theirs))
    raise KeyError(our_name)


def _to_hf(model) -> dict[str, torch.Tensor]:
    from lmforge.checkpoint import to_hf_state_dict

    return {k: v.detach().float().cpu() for k, v in to_hf_state_dict(model).items()}


def _tensors(model, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in GGUF row-major layout) for every weight llama.cpp loads."""
    cfg = model.config
    hf = _to_hf(model)
    out: list[tuple[str, torch.Tensor]] = []
    experts: dict[str, list[torch.Tensor]] = {}
    for name, t in hf.items():
        m = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$", name)
        if m:  # Mixtral: per-expert HF tensors, stacked in expert order into (E, rows, cols)
            proj = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}[m[3]]
            experts.setdefault(f"blk.{m[1]}.{proj}.weight", []).append(t)
            continue
        if arch == "gpt2" and name.endswith(".weight") and t.ndim == 2 and ".h." in name:
            t = t.t()  # Conv1D (in, out) -> (out, in)
        g = gguf_name(cfg, name)
        if arch in _PERMUTED and re.search(r"\.attn_[qk]\.(weight|bias)$", g):
            t = _permute(t, cfg.n_heads if ".attn_q." in g else cfg.n_kv_heads)
        if arch in _UNIT_NORMS and g.endswith("norm.weight"):
            t = t + 1.0
        out.append((g, t))
    out += [(n, torch.stack(ts)) for n, ts in experts.items()]
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "llama3":
        out.append(("rope_freqs.weight", _rope_freq_factors(cfg)))
    if kind == "longrope":  # per-frequency divisors, (rotary_dim / 2,) each
        out.append(("rope_factors_long.weight", torch.tensor(sc["long_factor"], dtype=torch.float32)))
        out.append(("rope_factors_short.weight", torch.tensor(sc["short_factor"], dtype=torch.float32)))
    return [(n, t.contiguous()) for n, t in out]


_KEEP_F32 = ("ffn_gate_inp.weight", "position_embd.weight", "rope_freqs.weight")


def _quantized(name: str, shape) -> bool:
    """Whether llama.cpp's quantizer (and our q8_0) quantizes this tensor (2-D and more, not norms,
    router or positions)."""
    return len(shape) > 1 and not name.endswith(_KEEP_F32) and not name.endswith("_norm.weight")


def check_block_size(tensors, dtype: str) -> None:
    """UserError naming the first tensor whose rows are not a multiple of the quantization block."""
    for name, t in tensors:
        if _quantized(name, t.shape) and t.shape[-1] % BLOCK:
            raise UserError(
                f"GGUF --dtype {dtype}: tensor {name} has rows of {t.shape[-1]} values, not a multiple "
                f"of the {BLOCK}-value quantization block; use --dtype f16 (or a model whose widths are)"
            )


def _encode(name: str, t: torch.Tensor, dtype: str):
    """(numpy data, GGML type) for one tensor; 1-D tensors and a few small matrices stay f32."""
    g = _gguf()
    Q = g.GGMLQuantizationType
    a = t.numpy().astype(np.float32)
    if a.ndim <= 1 or name.endswith(_KEEP_F32) or dtype == "f32":
        return a, Q.F32
    if dtype == "q8_0" and not _quantized(name, a.shape):
        dtype = "f16"
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    return g.quants.quantize(a, qtype), qtype


# ---------------------------------------------------------------------------------------------- tokenizer
# Pre-tokenizer regexes llama.cpp knows, by the name it gives them (`tokenizer.ggml.pre`), recognised
# from tokenizer.json's pre_tokenizer (a Split with this regex followed by a ByteLevel without its own
# regex). "dbrx" is the cl100k (GPT-4) split lmforge's tokenizer trains with.
_CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
_LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PRE_BY_REGEX = {_CL100K: "dbrx", _LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json (as a dict):
    gpt-2 (ByteLevel's own regex), smollm (single digits, then GPT-2's regex), llama-bpe (Llama 3),
    qwen2, dbrx (lmforge's), or "default" with a warning when the split is none of these."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    regex_in_bytelevel = bool(byte_level) and byte_level[0].get("use_regex", True)
    if kinds == ["ByteLevel"] and regex_in_bytelevel:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex_in_bytelevel:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not regex_in_bytelevel:
        name = _PRE_BY_REGEX.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    warnings.warn(
        "GGUF: the tokenizer's pre-tokenizer is not one llama.cpp knows by name; writing 'default', "
        "so llama.cpp may split some texts differently (ids given directly are unaffected)",
        stacklevel=3,
    )
    return "default"


def tokenizer_kind(spec: dict) -> str:
    """ "bpe" (byte-level BPE: GPT-2, Llama 3, Qwen, lmforge) or "spm" (SentencePiece-style BPE with
    byte fallback and ▁ for spaces: Llama 2, Mistral, Gemma), else a UserError."""
    model, dec = spec.get("model") or {}, json.dumps(spec.get("decoder"))
    if model.get("type") == "BPE" and "ByteLevel" in dec:
        return "bpe"
    if (
        model.get("type") == "BPE"
        and model.get("byte_fallback")
        and "\u2581" in json.dumps(spec, ensure_ascii=False)
    ):
        return "spm"
    raise UserError(
        "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, lmforge) and SentencePiece-"
        f"style BPE with byte fallback (Llama 2, Mistral, Gemma); this tokenizer is {model.get('type')} "
        f"with decoder {(spec.get('decoder') or {}).get('type')}"
    )


def _adds_space_prefix(spec: dict) -> bool:
    """SentencePiece's add_dummy_prefix as tokenizer.json spells it: a Metaspace that prepends, or a
    Prepend("▁") normalizer (Llama 2, Mistral); Gemma only replaces spaces."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if '"Prepend"' in text:
        return True
    for m in re.finditer(r'\{[^{}]*"type": "Metaspace"[^{}]*\}', text):
        d = json.loads(m[0])
        if d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never") != "never":
            return True
    return False


def _spm_scores(spec: dict, n_vocab: int) -> list[float]:
    """Scores for llama.cpp's SentencePiece tokenizer, which merges the adjacent pair whose result has
    the highest score: minus the rank of the first merge that makes the token, so that merges apply in
    tokenizer.json's order; tokens no merge makes (characters, bytes, specials) score 0."""
    vocab = spec["model"]["vocab"]
    scores = [0.0] * n_vocab
    seen = set()
    for rank, m in enumerate(spec["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(a + b)
        if i is not None and i not in seen and i < n_vocab:
            scores[i] = -float(rank + 1)
            seen.add(i)
    return scores


def _call(value):
    return value() if callable(value) else value


def stop_ids(tokenizer, cfg) -> list[int]:
    """Every id that ends generation in lmforge: the tokenizer's stop ids and the config's EOS."""
    ids = set(_call(tokenizer.stop_ids))
    if cfg.eos_token_id is not None:
        ids.add(cfg.eos_token_id)
    return sorted(ids)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Ids lmforge gives a text prompt (its BOS rule included), which llama.cpp must reproduce."""
    return tokenizer.encode_prompt(text)


_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _add_tokenizer(w, tokenizer, n_vocab: int, cfg) -> None:
    g = _gguf()
    spec = json.loads(tokenizer._json)  # the tokenizer.json text, for the model type and merges
    kind = tokenizer_kind(spec)
    if tokenizer.vocab_size > n_vocab:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {n_vocab} embeddings"
        )
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    unk = spec["model"].get("unk_token")
    tokens, types = [], []
    for i in range(n_vocab):
        name = tokenizer.id_to_token(i) if i < tokenizer.vocab_size else None
        if name is None:  # embedding rows beyond the tokenizer (vocabulary padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
            continue
        tokens.append(name)
        if kind == "spm" and name == unk:
            types.append(g.TokenType.UNKNOWN)
        elif i in added and (added[i].get("special") or kind == "spm" and name in ("<s>", "</s>")):
            types.append(g.TokenType.CONTROL)
        elif i in added:
            types.append(g.TokenType.USER_DEFINED)
        elif kind == "spm" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", name):
            types.append(g.TokenType.BYTE)
        else:
            types.append(g.TokenType.NORMAL)
    if kind == "bpe":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(spec))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(
            [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        )
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(_spm_scores(spec, n_vocab))
        w.add_token_types(types)
        w.add_add_space_prefix(_adds_space_prefix(spec))
        if unk is not None and tokenizer.token_to_id(unk) is not None:
            w.add_unk_token_id(tokenizer.token_to_id(unk))
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else cfg.bos_token_id
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else cfg.pad_token_id
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if pad is not None:
        w.add_pad_token_id(pad)
    stops = stop_ids(tokenizer, cfg)
    eot = next((tokenizer.token_to_id(t) for t in _END_OF_TURN if tokenizer.token_to_id(t) in stops), None)
    if eot is not None and eot != eos:
        w.add_eot_token_id(eot)  # end of a chat turn: llama.cpp stops there too
    eom = tokenizer.token_to_id("<|eom_id|>")
    if eom is not None and eom in stops:
        w.add_eom_token_id(eom)
    # llama.cpp adds BOS (and EOS) to a prompt exactly when lmforge does.
    probe = prompt_ids(tokenizer, "a")
    w.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    w.add_add_eos_token(eos is not None and len(probe) > 1 and probe[-1] == eos)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------- writer
def _sliding_pattern(cfg) -> list[bool]:
    lt = getattr(cfg, "layer_types", None)
    return [t == "sliding_attention" for t in lt] if lt else [True] * cfg.n_layers


def _add_metadata(w, cfg, arch: str, name: str, dtype: str) -> None:
    g = _gguf()
    w.add_name(name)
    w.add_file_type(
        {
            "f32": g.LlamaFileType.ALL_F32,
            "f16": g.LlamaFileType.MOSTLY_F16,
            "bf16": g.LlamaFileType.MOSTLY_BF16,
            "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    if dtype == "q8_0":
        w.add_quantization_version(g.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_vocab_size(cfg.vocab_size)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(getattr(cfg, "rotary_dim", cfg.head_dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(sc["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(sc.get("original_max_position_embeddings") or cfg.max_seq_len))
    elif kind == "longrope":  # HF's attention factor: sqrt(1 + ln(scale) / ln(original context))
        import math

        orig = int(sc.get("original_max_position_embeddings") or cfg.max_seq_len)
        scale = cfg.max_seq_len / orig
        attn = sc.get("attention_factor") or (
            1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
        )
        w.add_rope_scaling_attn_factors(float(attn))
        w.add_rope_scaling_orig_ctx_len(orig)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern(_sliding_pattern(cfg))
        if getattr(cfg, "rope_local_theta", None):
            w.add_rope_freq_base_swa(cfg.rope_local_theta)
        if getattr(cfg, "attn_softcap", None):
            w.add_attn_logit_softcapping(cfg.attn_softcap)
        if getattr(cfg, "final_softcap", None):
            w.add_final_logit_softcapping(cfg.final_softcap)
    elif cfg.sliding_window is not None:
        # Recorded for completeness: these llama.cpp architectures attend to the whole context.
        w.add_sliding_window(cfg.sliding_window)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_tok)


# A temporary sibling path, renamed over the target on success (shared rules: utils.atomic_path).
_atomic_path = atomic_path


def export_gguf(
    checkpoint,
    out: str | os.PathLike,
    dtype: str = "f16",
    name: str | None = None,
    calibration: str | os.PathLike | None = None,
) -> Path:
    """Write `checkpoint` (a directory or an LM with a tokenizer) as a GGUF file `out`. Returns `out`.

    dtype: f32, f16, bf16, q8_0, or a llama.cpp quantization type (QUANT_TYPES; needs llama-cpp-py-sync).
    calibration: a text file; with a llama.cpp type, its importance matrix (mean squared input of every
    matrix over the text, from lmforge's model) steers the quantizer, as llama-imatrix's does.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: GGUF export writes {', '.join(DTYPES)}")
    if calibration is not None and dtype not in QUANT_TYPES:
        raise UserError(f"--calibration applies to llama.cpp's quantization types, not --dtype {dtype}")
    out = Path(out)
    check_out_path(out)
    if dtype in QUANT_TYPES:  # llama.cpp's quantizer must load before any work is done
        from lmforge.export.llama_cpp import LlamaCppUnavailable, _bindings

        try:
            _bindings()
        except LlamaCppUnavailable as e:
            raise UserError(f"--dtype {dtype} is made by llama.cpp's quantizer: {e}") from e
    model, tokenizer, src = _load(checkpoint)
    cfg = model.config
    arch = check_supported(cfg)
    if tokenizer is None:
        raise UserError(
            f"{src or 'the model'}: no tokenizer.json; a GGUF file carries the tokenizer, so the "
            "checkpoint needs one (save it with save_model(..., tokenizer=tok))"
        )
    tokenizer_kind(json.loads(tokenizer._json))  # an unsupported tokenizer fails before any work
    full = [
        w
        for i in range(cfg.n_layers)
        if (w := cfg.layer_window(i) if hasattr(cfg, "layer_window") else cfg.sliding_window) is not None
    ]
    if full and arch not in ("gemma2", "gemma3") and min(full) < cfg.max_seq_len:
        warnings.warn(
            f"GGUF: llama.cpp runs {cfg.family} with full attention; beyond the sliding window of "
            f"{min(full)} tokens its outputs differ from this model's",
            stacklevel=2,
        )
    tensors = _tensors(model, arch)
    if dtype != "f32" and dtype not in ("f16", "bf16"):
        check_block_size(tensors, dtype)
    imatrix = None
    if calibration is not None:
        text = Path(calibration).read_text(encoding="utf-8") if Path(calibration).is_file() else None
        if not text:
            raise UserError(f"--calibration {calibration}: not a readable, non-empty text file")
        imatrix = importance_matrix(model, tokenizer, text)
    g = _gguf()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_path(out) as tmp:
            base = "f32" if dtype in QUANT_TYPES else dtype
            w = g.GGUFWriter(str(tmp), arch)
            _add_metadata(w, cfg, arch, name or (src.name if src else cfg.family), base)
            _add_tokenizer(w, tokenizer, cfg.vocab_size, cfg)
            for tname, t in tensors:
                data, qtype = _encode(tname, t, base)
                w.add_tensor(tname, data, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            if dtype in QUANT_TYPES:
                from lmforge.export.llama_cpp import quantize

                with tempfile.TemporaryDirectory(dir=out.parent, prefix=temp_prefix(out), suffix=".tmp") as d:
                    q = Path(d) / "q.gguf"
                    quantize(tmp, q, dtype, imatrix=imatrix)
                    os.replace(q, tmp)
    except OSError as e:
        raise UserError(f"{out}: cannot write the GGUF file ({e.strerror or e})") from e
    return out


@torch.no_grad()
def importance_matrix(model, tokenizer, text: str, max_tokens: int = 4096) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix from lmforge's fp32 model: for every matrix llama.cpp quantizes,
    the mean over calibration tokens of each input channel's squared activation, (in_features,)
    (experts: (E * in_features,), each expert over the tokens routed to it; here over all tokens)."""
    cfg = model.config
    ids = prompt_ids(tokenizer, text)[:max_tokens]
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    # Which GGUF tensors read each of our Linear inputs (q/k/v share one input, gate/up another).
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod_name.endswith("router"):
            continue
        try:
            names = gguf_tensor_name(cfg, f"{mod_name}.weight")
        except (KeyError, UserError):
            continue

        def hook(_m, inp, _out, names=names):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            s = (x * x).sum(0)
            for n in names:
                prev = sums.get(n)
                sums[n] = s if prev is None else prev + s
            sums.setdefault("#tokens", torch.zeros(()))

        hooks.append(mod.register_forward_hook(hook))
    try:
        n = 0
        for start in range(0, len(ids), cfg.max_seq_len):
            chunk = ids[start : start + cfg.max_seq_len]
            model(torch.tensor([chunk]))
            n += len(chunk)
    finally:
        for h in hooks:
            h.remove()
    sums.pop("#tokens", None)
    return {k: (v / max(n, 1)).numpy().astype(np.float32) for k, v in sums.items()}


def _load(checkpoint):
    """(fp32 model, tokenizer or None, source directory or None) from a path or an LM."""
    if hasattr(checkpoint, "model"):
        src = Path(checkpoint.path) if getattr(checkpoint, "path", None) else None
        return checkpoint.model, checkpoint.tokenizer, src
    from lmforge.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    src = Path(checkpoint)
    model = load_model(src, device="cpu", dtype=torch.float32)
    tokenizer = Tokenizer.load(src) if (src / "tokenizer.json").exists() else None
    return model, tokenizer, src


def read_gguf(path: str | os.PathLike) -> dict:
    """Metadata (key -> value) and tensors (name -> (shape, type name)) of a GGUF file, for checks."""
    g = _gguf()
    r = g.GGUFReader(str(path))
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            meta[k] = f.contents()
        except Exception:  # very old gguf versions: no contents(); keep the raw parts
            meta[k] = f.parts
    tensors = {t.name: (tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name) for t in r.tensors}
    return {"metadata": meta, "tensors": tensors}
