"""GGUF export: metadata, tensors and the RoPE permutation read back with gguf.GGUFReader; logits and
greedy tokens from llama.cpp (lmforge.export.llama_cpp over llama-cpp-py-sync, when installed) equal to
lmforge's on random tiny models with a real (trained) tokenizer; Ollama Modelfile; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import preset
from lmforge.export import export
from lmforge.export.gguf import _permute, read_gguf
from lmforge.model import apply_rope, build, rope_tables
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore:GGUF. llama.cpp runs mistral with full attention")

TEXT = [
    "The quick brown fox jumps over the lazy dog. ",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Language models predict the next token from the tokens before it.",
    "for i in range(10):\n    total += i * i\n",
    "It's a small world, isn't it? We'll see what they've done.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, 400)


def make_checkpoint(path, family, tok, seed=0, **overrides):
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    cfg = preset(family, "debug", **{"vocab_size": tok.vocab_size, **ids, **overrides})
    model = build(cfg).eval()
    if cfg.norm_unit_offset:  # Gemma inits its norm weights at 0; random ones test the +1 shift
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.normal_(0, 0.1)
    save_model(model, path, tokenizer=tok)
    return model


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    return x[0, len(ids) :].tolist()


# ---------------------------------------------------------------------------------------------- structure
LLAMA_KEYS = [
    "general.architecture",
    "general.name",
    "general.file_type",
    "{a}.context_length",
    "{a}.embedding_length",
    "{a}.block_count",
    "{a}.feed_forward_length",
    "{a}.attention.head_count",
    "{a}.attention.head_count_kv",
    "{a}.attention.layer_norm_rms_epsilon",
    "{a}.attention.key_length",
    "{a}.attention.value_length",
    "{a}.rope.freq_base",
    "{a}.rope.dimension_count",
    "{a}.vocab_size",
]
TOKENIZER_KEYS = [
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]


def expected_tensors(cfg) -> dict[str, tuple]:
    d, q, kv, ff, V = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.d_ff, cfg.vocab_size
    t = {"token_embd.weight": (V, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        t |= {b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,), b + "attn_output.weight": (d, q)}
        if cfg.family == "gpt2":
            t |= {b + "attn_qkv.weight": (q + 2 * kv, d), b + "attn_qkv.bias": (q + 2 * kv,)}
            t |= {b + "attn_norm.bias": (d,), b + "ffn_norm.bias": (d,), b + "attn_output.bias": (d,)}
            t |= {b + "ffn_up.weight": (ff, d), b + "ffn_up.bias": (ff,)}
            t |= {b + "ffn_down.weight": (d, ff), b + "ffn_down.bias": (d,)}
            continue
        t |= {b + "attn_q.weight": (q, d), b + "attn_k.weight": (kv, d), b + "attn_v.weight": (kv, d)}
        if cfg.n_experts:
            E = cfg.n_experts
            t |= {b + "ffn_gate_inp.weight": (E, d), b + "ffn_down_exps.weight": (E, d, ff)}
            t |= {b + "ffn_gate_exps.weight": (E, ff, d), b + "ffn_up_exps.weight": (E, ff, d)}
        else:
            t |= {
                b + "ffn_gate.weight": (ff, d),
                b + "ffn_up.weight": (ff, d),
                b + "ffn_down.weight": (d, ff),
            }
    if cfg.family == "gpt2":
        t |= {"position_embd.weight": (cfg.max_seq_len, d), "output_norm.bias": (d,)}
    if not cfg.tie_embeddings:
        t["output.weight"] = (V, d)
    return t


@pytest.mark.parametrize(
    "family, arch",
    [("llama", "llama"), ("mistral", "llama"), ("mixtral", "llama"), ("gemma", "gemma"), ("gpt2", "gpt2")],
)
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_metadata_and_tensors_read_back(tmp_path, tok, family, arch, dtype):
    model = make_checkpoint(tmp_path / "ckpt", family, tok)
    cfg = model.config
    out = export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype=dtype)
    r = read_gguf(out)
    meta, tensors = r["metadata"], r["tensors"]
    keys = [k.format(a=arch) for k in LLAMA_KEYS] if arch != "gpt2" else []
    keys += [
        f"{arch}.context_length",
        f"{arch}.embedding_length",
        f"{arch}.block_count",
        f"{arch}.feed_forward_length",
        f"{arch}.attention.head_count",
    ]
    keys += [f"{arch}.attention.layer_norm_epsilon"] if arch == "gpt2" else []
    keys += [f"{arch}.expert_count", f"{arch}.expert_used_count"] if cfg.n_experts else []
    keys += [f"{arch}.attention.sliding_window"] if cfg.sliding_window else []
    missing = [k for k in keys + TOKENIZER_KEYS if k not in meta]
    assert not missing, missing
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.context_length"] == cfg.max_seq_len
    assert meta[f"{arch}.block_count"] == cfg.n_layers
    assert meta[f"{arch}.feed_forward_length"] == cfg.d_ff
    if arch != "gpt2":
        assert meta[f"{arch}.attention.head_count_kv"] == cfg.n_kv_heads
        assert meta[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    if cfg.n_experts:
        assert (meta[f"{arch}.expert_count"], meta[f"{arch}.expert_used_count"]) == (4, 2)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "dbrx"
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert meta["tokenizer.ggml.tokens"][tok.eos_id] == "<|eos|>"
    assert meta["tokenizer.ggml.token_type"][tok.bos_id] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert meta["tokenizer.chat_template"] == tok.chat_template
    # every tensor, with its shape (torch order) and type
    want = expected_tensors(cfg)
    assert set(tensors) == set(want)
    allowed = gguf.MODEL_TENSORS[next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)]
    names = {gguf.TENSOR_NAMES[t].format(bid=i) for t in allowed for i in range(cfg.n_layers)}
    assert {n.rsplit(".", 1)[0] for n in tensors} <= names  # names llama.cpp knows for this arch
    for name, (shape, qtype) in tensors.items():
        assert shape == want[name], name
        matrix = len(shape) > 1 and not name.startswith(("position_embd", "blk.0.ffn_gate_inp"))
        matrix = matrix and "ffn_gate_inp" not in name
        assert qtype == ({"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype] if matrix else "F32"), name


def test_weights_and_rope_permutation(tmp_path, tok):
    """f32 weights read back exactly; llama.cpp's interleaved RoPE on the permuted Q/K rows gives the
    same attention scores as lmforge's rotate-half RoPE on the original rows."""
    model = make_checkpoint(tmp_path / "ckpt", "llama", tok)
    cfg = model.config
    out = export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    data = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    sd = model.state_dict()
    assert np.array_equal(data["token_embd.weight"], sd["tok_emb.weight"].numpy())
    assert np.array_equal(data["blk.1.ffn_down.weight"], sd["blocks.1.mlp.w_out.weight"].numpy())
    wq, wk, _ = sd["blocks.0.attn.wqkv.weight"].split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])
    x = torch.randn(5, cfg.d_model)
    hd, T = cfg.head_dim, 5
    ang = torch.arange(T)[:, None] / cfg.rope_theta ** (torch.arange(0, hd, 2) / hd)
    cos, sin = ang.cos(), ang.sin()  # (T, hd/2)

    def ours(w, n):  # rotate-half on (n, T, hd)
        return apply_rope((x @ w.T).view(T, n, hd).transpose(0, 1), *rope_tables(cos, sin))

    def llama_cpp(w, n):  # adjacent pairs (2i, 2i+1) rotated by angle i
        y = (x @ torch.from_numpy(w).T).view(T, n, hd // 2, 2).transpose(0, 1)
        a, b = y[..., 0], y[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    q1, k1 = ours(wq, cfg.n_heads), ours(wk, cfg.n_kv_heads)
    q2 = llama_cpp(data["blk.0.attn_q.weight"], cfg.n_heads)
    k2 = llama_cpp(data["blk.0.attn_k.weight"], cfg.n_kv_heads)
    g = cfg.n_heads // cfg.n_kv_heads
    s1 = q1 @ k1.repeat_interleave(g, 0).transpose(1, 2)
    s2 = q2 @ k2.repeat_interleave(g, 0).transpose(1, 2)
    torch.testing.assert_close(s2, s1, atol=1e-5, rtol=1e-5)
    # and the permutation is the one llama.cpp's converter applies (reshape/swap of (2, hd/2))
    assert torch.equal(
        _permute(torch.arange(8.0)[:, None], 1)[:, 0], torch.tensor([0, 4, 1, 5, 2, 6, 3, 7.0])
    )


def test_gemma_norms_are_shifted_by_one(tmp_path, tok):
    model = make_checkpoint(tmp_path / "ckpt", "gemma", tok)
    out = export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    data = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    w = model.state_dict()["blocks.0.attn_norm.weight"].numpy()
    np.testing.assert_allclose(data["blk.0.attn_norm.weight"], w + 1, rtol=0, atol=1e-7)


def test_vocabulary_padded_beyond_the_tokenizer(tmp_path, tok):
    make_checkpoint(tmp_path / "ckpt", "llama", tok, vocab_size=tok.vocab_size + 7)
    meta = read_gguf(export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32"))["metadata"]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.vocab_size + 7
    assert tokens[-1] == f"[PAD{tok.vocab_size + 6}]" and types[-1] == gguf.TokenType.UNUSED
    assert tokens[tok.vocab_size - 1] == tok.id_to_token(tok.vocab_size - 1)


def test_ollama_modelfile(tmp_path, tok):
    make_checkpoint(tmp_path / "ckpt", "llama", tok)
    out = export(tmp_path / "ckpt", "ollama", tmp_path / "ollama", dtype="q8_0")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert (
        'TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"""'
        in text
    )
    assert 'PARAMETER stop "<|end|>"' in text and 'PARAMETER stop "<|eos|>"' in text
    assert read_gguf(out / "model.gguf")["metadata"]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


# ---------------------------------------------------------------------------------------------- llama.cpp
def _llama(path, n_ctx=128):
    from lmforge.export.llama_cpp import LlamaCpp, LlamaCppUnavailable

    try:  # f32 KV cache (the runner's default), so that only the kernels differ; one thread, as ggml's
        return LlamaCpp(path, n_ctx=n_ctx, n_threads=1)  # spinning threads crawl on a loaded 2-core box
    except LlamaCppUnavailable as e:  # not installed, or its libraries do not load here: says which
        pytest.skip(str(e))


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "gemma", "gpt2"])
def test_llama_cpp_greedy_matches_lmforge(tmp_path, tok, family):
    model = make_checkpoint(tmp_path / "ckpt", family, tok, seed=1)
    out = export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    llm = _llama(out)
    prompt = tok.encode("def add(a, b):\n    return a + b", bos=True)
    n = 24  # prompt + 24 < 64, the debug mistral's sliding window (llama.cpp's llama has none)
    # llama.cpp splits and merges text the way our tokenizer does (no BOS, special text not parsed)
    text = "It's a small world, isn't it? The quick brown fox: for i in range(10): total += i * i"
    assert llm.tokenize(text) == tok.encode(text)
    got = llm.eval(prompt)  # the logits of every prompt position
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].numpy()
    assert got.shape == ref.shape
    tol = 5e-4 if family == "gpt2" else 1e-4  # ggml's GELU goes through an f16 lookup table
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, np.abs(ref).max()), rtol=0)
    assert llm.greedy(prompt, n) == torch_greedy(model, prompt, n)  # from an emptied cache
    llm.close()


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_loads_reduced_precision(tmp_path, tok, dtype):
    model = make_checkpoint(tmp_path / "ckpt", "llama", tok, seed=2)
    llm = _llama(export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype=dtype))
    prompt = tok.encode("The quick brown fox", bos=True)
    got = llm.eval(prompt)
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].numpy()
    llm.close()
    assert got.shape == ref.shape
    # weights rounded to f16 / 8 bits (measured: 5e-4 / 1.3e-2 of the largest logit)
    assert np.abs(got - ref).max() < {"f16": 2e-3, "q8_0": 2e-2}[dtype] * np.abs(ref).max()


def test_llama_cpp_runner_errors(tmp_path, tok):
    make_checkpoint(tmp_path / "ckpt", "llama", tok)
    llm = _llama(export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="q8_0"), n_ctx=16)
    assert llm.n_ctx >= 16  # llama.cpp may round the context up
    with pytest.raises(ValueError, match=f"exceed the context of {llm.n_ctx}"):
        llm.eval([1] * (llm.n_ctx + 1))
    assert llm.greedy([1, 2, 3], 4) == llm.greedy([1, 2, 3], 4)  # each run starts from an empty cache
    llm.close()
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="could not load .*invalid magic"):
        _llama(tmp_path / "bad.gguf")


# ---------------------------------------------------------------------------------------------- errors
def test_unsupported_family_and_dtype(tmp_path, tok):
    make_checkpoint(tmp_path / "gpt", "gpt", tok)
    with pytest.raises(UserError, match="openai-gpt"):
        export(tmp_path / "gpt", "gguf", tmp_path / "gpt.gguf")
    make_checkpoint(tmp_path / "llama", "llama", tok)
    with pytest.raises(UserError, match="q4_k"):
        export(tmp_path / "llama", "gguf", tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(UserError, match="--with-cache"):
        export(tmp_path / "llama", "gguf", tmp_path / "x.gguf", with_cache=True)
    with pytest.raises(UserError, match="--format"):
        export(tmp_path / "llama", "safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt", "llama"]


def test_config_llama_cpp_cannot_express(tmp_path, tok):
    torch.manual_seed(0)
    save_model(
        build(preset("llama", "debug", vocab_size=tok.vocab_size, act="gelu_tanh")),
        tmp_path / "c",
        tokenizer=tok,
    )
    with pytest.raises(UserError, match="act='gelu_tanh'"):
        export(tmp_path / "c", "gguf", tmp_path / "c.gguf")
    save_model(build(preset("llama", "debug", vocab_size=tok.vocab_size)), tmp_path / "notok")
    with pytest.raises(UserError, match="tokenizer"):
        export(tmp_path / "notok", "gguf", tmp_path / "n.gguf")
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "n.gguf").exists()


def test_missing_checkpoint_and_unwritable_output(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist"):
        export(tmp_path / "nope", "gguf", tmp_path / "x.gguf")
    make_checkpoint(tmp_path / "ckpt", "llama", tok)
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="is a file"):
        export(tmp_path / "ckpt", "gguf", tmp_path / "afile" / "sub" / "x.gguf")
    with pytest.raises(UserError, match="is a file"):
        export(tmp_path / "ckpt", "ollama", tmp_path / "afile" / "ollama")
    (tmp_path / "adir").mkdir()
    with pytest.raises(UserError, match="directory"):
        export(tmp_path / "ckpt", "gguf", tmp_path / "adir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "ckpt"]


def test_failure_midway_leaves_no_file(tmp_path, tok, monkeypatch):
    import lmforge.export.gguf as g

    make_checkpoint(tmp_path / "ckpt", "llama", tok)
    (tmp_path / "old.gguf").write_bytes(b"previous")
    calls = []

    def boom(name, t, dtype):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(name, t, dtype)

    real = g._encode
    monkeypatch.setattr(g, "_encode", boom)
    with pytest.raises(UserError, match="No space left"):
        export(tmp_path / "ckpt", "gguf", tmp_path / "old.gguf")
    with pytest.raises(UserError, match="No space left"):
        calls.clear()
        export(tmp_path / "ckpt", "ollama", tmp_path / "oll")
    assert (tmp_path / "old.gguf").read_bytes() == b"previous"  # the previous file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "old.gguf"]


def test_cli_subprocess(tmp_path, tok):
    import subprocess
    import sys

    make_checkpoint(tmp_path / "ckpt", "llama", tok)
    cmd = [sys.executable, "-m", "lmforge", "export", str(tmp_path / "ckpt"), "--format", "gguf"]
    r = subprocess.run([*cmd, "--dtype", "q8_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ckpt-q8_0.gguf").is_file() and "wrote" in r.stdout  # the default path
    r = subprocess.run([*cmd, "--with-cache"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--with-cache is an ONNX option" in r.stderr and "Traceback" not in r.stderr
