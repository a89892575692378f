"""GGUF export for llama.cpp (and Ollama): llama, mistral, mixtral, gemma and gpt2 checkpoints.

`export_gguf(ckpt, "model.gguf", dtype="f16")` writes one file with the metadata llama.cpp reads
(architecture, context, widths, head counts, RoPE base, norm epsilon, experts, sliding window), the
byte-level BPE tokenizer (tokens, token types, merges, special ids, chat template) and the weights.

How our tensors become llama.cpp's (a table per architecture in `_tensors`):
- llama, mistral and mixtral are llama.cpp's "llama" architecture. llama.cpp rotates *adjacent*
  channel pairs (2i, 2i+1) while HF/lmforge rotate (i, i + hd/2) ("rotate half"), so the rows of the
  Q and K projections (and their biases) are permuted within each head, exactly as llama.cpp's
  convert_hf_to_gguf.py does (`_permute`); attention scores are unchanged by the relabelling.
- gemma is llama.cpp's "gemma" (rotate-half RoPE natively: no permutation); its RMSNorm scales by
  (1 + w), so 1 is added to the norm weights; embeddings are always tied.
- gpt2 keeps the fused q/k/v projection (`attn_qkv`) and learned positions.
- mixtral's experts are written stacked, (E, ff, d) per projection, as llama.cpp expects.
- llama3 RoPE scaling becomes a `rope_freqs` tensor (per-frequency divisors); linear scaling a key.

dtype: f32, f16 or bf16 for matrices (norms, biases, the MoE router and positions stay f32, as in
llama.cpp's converter), or q8_0 (blocks of 32 int8 values with an f16 scale; a matrix whose rows
are not a multiple of 32 falls back to f16).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.export import GGUF_DTYPES, check_out_path
from lmforge.utils import UserError

# lmforge family -> llama.cpp architecture. openai-gpt (post-norm, no final norm) has no
# llama.cpp architecture.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "gemma": "gemma", "gpt2": "gpt2"}
DTYPES = GGUF_DTYPES


def _gguf():
    import gguf  # imported lazily: an optional dependency (pip install lmforge[export])

    return gguf


# ---------------------------------------------------------------------------------------------- checks
def check_supported(cfg) -> str:
    """The llama.cpp architecture for `cfg`, or a UserError saying what llama.cpp cannot express."""
    if cfg.family not in GGUF_ARCH:
        raise UserError(
            f"GGUF export does not support the {cfg.family!r} family (HF openai-gpt): llama.cpp has no "
            f"architecture for original GPT (post-norm, no final norm). Supported: {', '.join(GGUF_ARCH)}; "
            "use --format onnx for this model"
        )
    arch = GGUF_ARCH[cfg.family]
    need: dict[str, object] = {}
    if arch == "llama":
        need = dict(
            act="silu", mlp="glu", norm="rmsnorm", pos_emb="rope", norm_unit_offset=False, embed_scale=False
        )
    elif arch == "gemma":
        need = dict(
            act="gelu_tanh", mlp="glu", norm="rmsnorm", pos_emb="rope", attn_bias=False, tie_embeddings=True
        )
    elif arch == "gpt2":
        need = dict(
            act="gelu_tanh", mlp="mlp", norm="layernorm", pos_emb="learned", attn_bias=True, mlp_bias=True
        )
    bad = [
        f"{k}={getattr(cfg, k)!r} (llama.cpp's {arch} needs {v!r})"
        for k, v in need.items()
        if getattr(cfg, k) != v
    ]
    if cfg.n_experts and cfg.mlp_bias:
        bad.append("mlp_bias with experts (llama.cpp has no expert biases)")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind == "llama3" and arch != "llama":
        bad.append(f"rope_scaling {kind} (only the llama architecture reads rope_freqs)")
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


def _tensors(model, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in GGUF row-major layout) for every weight llama.cpp loads."""
    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["tok_emb.weight"])]
    if arch == "gpt2":
        out.append(("position_embd.weight", sd["pos_emb.weight"]))
    unit = 1.0 if cfg.norm_unit_offset else 0.0  # gemma: llama.cpp multiplies by w, HF by (1 + w)
    q, kv, ff = cfg.q_dim, cfg.kv_dim, cfg.d_ff
    for i in range(cfg.n_layers):
        b, g = f"blocks.{i}.", f"blk.{i}."
        for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")):
            out.append((f"{g}{theirs}.weight", sd[f"{b}{ours}.weight"] + unit))
            if cfg.norm == "layernorm":
                out.append((f"{g}{theirs}.bias", sd[f"{b}{ours}.bias"]))
        for w in ("weight", "bias") if cfg.attn_bias else ("weight",):
            wqkv = sd[f"{b}attn.wqkv.{w}"]
            if arch == "gpt2":
                out.append((f"{g}attn_qkv.{w}", wqkv))
            else:
                wq, wk, wv = wqkv.split([q, kv, kv], dim=0)
                if arch == "llama":
                    wq, wk = _permute(wq, cfg.n_heads), _permute(wk, cfg.n_kv_heads)
                out += [(f"{g}attn_q.{w}", wq), (f"{g}attn_k.{w}", wk), (f"{g}attn_v.{w}", wv)]
            out.append((f"{g}attn_output.{w}", sd[f"{b}attn.wo.{w}"]))
        if cfg.n_experts:
            w_in = sd[f"{b}mlp.w_in"]  # (E, 2 ff, d): gate ; up
            out += [
                (f"{g}ffn_gate_inp.weight", sd[f"{b}mlp.router.weight"]),  # (E, d)
                (f"{g}ffn_gate_exps.weight", w_in[:, :ff].contiguous()),  # (E, ff, d)
                (f"{g}ffn_up_exps.weight", w_in[:, ff:].contiguous()),
                (f"{g}ffn_down_exps.weight", sd[f"{b}mlp.w_out"]),  # (E, d, ff)
            ]
            continue
        for w in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            w_in = sd[f"{b}mlp.w_in.{w}"]
            if cfg.mlp == "glu":
                gate, up = w_in.split([ff, ff], dim=0)
                out += [(f"{g}ffn_gate.{w}", gate), (f"{g}ffn_up.{w}", up)]
            else:
                out.append((f"{g}ffn_up.{w}", w_in))
            out.append((f"{g}ffn_down.{w}", sd[f"{b}mlp.w_out.{w}"]))
    out.append(("output_norm.weight", sd["norm.weight"] + unit))
    if cfg.norm == "layernorm":
        out.append(("output_norm.bias", sd["norm.bias"]))
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd
        out.append(("output.weight", sd["lm_head.weight"]))
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", _rope_freq_factors(cfg)))
    return [(n, t.contiguous()) for n, t in out]


_KEEP_F32 = ("ffn_gate_inp.weight", "position_embd.weight", "rope_freqs.weight")


def _encode(name: str, t: torch.Tensor, dtype: str):
    """(numpy data, GGML type) for one tensor; 1-D tensors and a few small matrices stay f32."""
    g = _gguf()
    Q = g.GGMLQuantizationType
    a = t.numpy().astype(np.float32)
    if a.ndim <= 1 or name.endswith(_KEEP_F32) or dtype == "f32":
        return a, Q.F32
    if dtype == "q8_0" and a.shape[-1] % 32:
        warnings.warn(
            f"GGUF: {name} rows of {a.shape[-1]} are not a multiple of 32; writing it as f16", stacklevel=3
        )
        dtype = "f16"
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    return g.quants.quantize(a, qtype), qtype


# ---------------------------------------------------------------------------------------------- tokenizer
# Pre-tokenizer regexes llama.cpp knows, by the name it uses for them (`tokenizer.ggml.pre`).
# "dbrx" is the cl100k (GPT-4) split that lmforge's tokenizer trains with, without llama-3's
# `ignore_merges` (so merges apply exactly as in HF tokenizers' BPE).
_CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
_LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PRE_BY_REGEX = {_CL100K: "dbrx", _LLAMA3: "llama-bpe"}


def _pre_tokenizer_name(spec: dict) -> str:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1:
        regex = (splits[0].get("pattern") or {}).get("Regex")
        if regex in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regex]
    warnings.warn(
        "GGUF: the tokenizer's pre-tokenizer is not one llama.cpp knows by name; writing 'default', "
        "so llama.cpp may split some texts differently (ids given directly are unaffected)",
        stacklevel=3,
    )
    return "default"


def _add_tokenizer(w, tokenizer, n_vocab: int, cfg) -> None:
    g = _gguf()
    spec = json.loads(tokenizer._json)  # the tokenizer.json text, for the model type and merges
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as lmforge trains); this "
            f"tokenizer is {model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}"
        )
    if tokenizer.vocab_size > n_vocab:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {n_vocab} embeddings"
        )
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        name = tokenizer.id_to_token(i) if i < tokenizer.vocab_size else None
        if name is None:  # embedding rows beyond the tokenizer (vocabulary padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
        elif i in added:
            tokens.append(name)
            types.append(g.TokenType.CONTROL if added[i].get("special") else g.TokenType.USER_DEFINED)
        else:
            tokens.append(name)
            types.append(g.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else cfg.bos_token_id
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else cfg.pad_token_id
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if pad is not None:
        w.add_pad_token_id(pad)
    end = tokenizer.token_to_id("<|end|>")
    if end is not None:
        w.add_eot_token_id(end)  # end of a chat turn: llama.cpp stops there too
    # lmforge trains documents as BOS + text + EOS and its generate adds BOS to text prompts.
    w.add_add_bos_token(bos is not None)
    w.add_add_eos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------- writer
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
    w.add_rope_dimension_count(cfg.head_dim)
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") == "linear":
        w.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))
    if cfg.sliding_window is not None:
        # Recorded for completeness: llama.cpp's llama architecture attends to the whole context.
        w.add_sliding_window(cfg.sliding_window)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_per_tok)


@contextlib.contextmanager
def _atomic_path(path: Path):
    """A temporary sibling path to write; renamed over `path` on success, removed on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def export_gguf(checkpoint, out: str | os.PathLike, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `checkpoint` (a directory or an LM with a tokenizer) as a GGUF file `out`. Returns `out`."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: GGUF export writes {', '.join(DTYPES)}")
    out = Path(out)
    check_out_path(out)
    model, tokenizer, src = _load(checkpoint)
    cfg = model.config
    arch = check_supported(cfg)
    if tokenizer is None:
        raise UserError(
            f"{src or 'the model'}: no tokenizer.json; a GGUF file carries the tokenizer, so the "
            "checkpoint needs one (save it with save_model(..., tokenizer=tok))"
        )
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        warnings.warn(
            f"GGUF: llama.cpp runs {cfg.family} with full attention; beyond the sliding window of "
            f"{cfg.sliding_window} tokens its outputs differ from this model's",
            stacklevel=2,
        )
    g = _gguf()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_path(out) as tmp:
            w = g.GGUFWriter(str(tmp), arch)
            _add_metadata(w, cfg, arch, name or (src.name if src else cfg.family), dtype)
            _add_tokenizer(w, tokenizer, cfg.vocab_size, cfg)
            for tname, t in _tensors(model, arch):
                data, qtype = _encode(tname, t, dtype)
                w.add_tensor(tname, data, raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise UserError(f"{out}: cannot write the GGUF file ({e.strerror or e})") from e
    return out


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
