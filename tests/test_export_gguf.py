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
def _llama(path, n_ctx=128, n_seq=1):
    from lmforge.export.llama_cpp import LlamaCpp, LlamaCppUnavailable

    try:  # f32 KV cache (the runner's default), so that only the kernels differ; one thread, as ggml's
        return LlamaCpp(path, n_ctx=n_ctx, n_threads=1, n_seq=n_seq)  # spinning threads crawl on a loaded box
    except LlamaCppUnavailable as e:  # not installed, or its libraries do not load here: says which
        pytest.skip(str(e))


@pytest.mark.parametrize("family", ["llama", "gemma"])  # every family: test_every_family_in_llama_cpp
def test_llama_cpp_greedy_matches_lmforge(tmp_path, tok, family):
    model = make_checkpoint(tmp_path / "ckpt", family, tok, seed=1)
    out = export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    llm = _llama(out)
    prompt = tok.encode("def add(a, b):\n    return a + b", bos=True)
    n = 24  # prompt + 24 < 64, the debug mistral's sliding window (llama.cpp's llama has none)
    # llama.cpp splits and merges text the way our tokenizer does (no BOS, special text not parsed)
    text = "It's a small world, isn't it? The quick brown fox: for i in range(10): total += i * i"
    assert llm.tokenize(text) == tok.encode(text, bos=False)
    got = llm.eval(prompt)  # the logits of every prompt position
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].numpy()
    assert got.shape == ref.shape
    tol = 5e-4 if family == "gpt2" else 1e-4  # ggml's GELU goes through an f16 lookup table
    np.testing.assert_allclose(got, ref, atol=tol * max(1.0, np.abs(ref).max()), rtol=0)
    assert llm.greedy(prompt, n) == torch_greedy(model, prompt, n)  # from an emptied cache
    llm.close()


def test_llama_cpp_batched_greedy_equals_each_sequence_alone(tmp_path, tok):
    """greedy_batch decodes several sequences in one cache (what bench/decode.py's batch sweep times):
    each gets lmforge's greedy tokens for its prompt alone, whatever the others' lengths."""
    model = make_checkpoint(tmp_path / "ckpt", "llama", tok, seed=3)
    llm = _llama(export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32"), n_ctx=48, n_seq=3)
    prompts = [tok.encode(t, bos=True) for t in ("def add(a, b):", "The quick brown fox jumps", "x = 1")]
    assert llm.greedy_batch(prompts, 10) == [torch_greedy(model, p, 10) for p in prompts]
    with pytest.raises(ValueError, match="1 to 3 prompts"):
        llm.greedy_batch(prompts * 2, 2)
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
    with pytest.raises(UserError, match="'gpt' family: llama.cpp has no architecture"):
        export(tmp_path / "gpt", "gguf", tmp_path / "gpt.gguf")
    make_checkpoint(tmp_path / "llama", "llama", tok)
    with pytest.raises(UserError, match="q4_k"):
        export(tmp_path / "llama", "gguf", tmp_path / "x.gguf", dtype="q4_k")  # q4_k_s / q4_k_m are
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
    (tmp_path / "old.gguf").write_bytes(b"GGUF previous")  # an earlier export: replaceable
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
    assert (tmp_path / "old.gguf").read_bytes() == b"GGUF previous"  # the previous file is whole
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


# ---------------------------------------------------------------------------------------------- families
# Every family from the real hub config.json of a model users bring (tests/hub_models.py, shrunk):
# llama.cpp's logits equal lmforge's at f32, and greedy tokens at f16 on a model trained to be peaked.
HUB_NAMES = [
    "gpt2",
    "smollm2-135m",
    "llama-3.2-1b",
    "mistral-7b-v0.3",
    "mixtral-8x7b",
    "gemma-2b",
    "qwen2.5-0.5b",
    "qwen3-0.6b",
    "gemma-2-2b",
    "gemma-3-1b",
    "phi-3.5-mini",
    "phi-4-mini",
    "olmo-2-1b",
]


def hub_checkpoint(path, name, tok):
    from hub_models import save_hub_model

    over = dict(vocab_size=320)
    if name.startswith("gemma-"):  # llama.cpp scales Gemma 2/3 attention by head_dim (16 once shrunk)
        over["query_pre_attn_scalar"] = 16
    if name != "gpt2":
        over |= dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    save_hub_model(name, path, **over)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def tok300():
    return train_tokenizer(TEXT, 300)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", HUB_NAMES)
def test_every_family_in_llama_cpp(tmp_path, tok300, name):
    from lmforge.checkpoint import load_model

    ckpt = hub_checkpoint(tmp_path / "ckpt", name, tok300)
    model = load_model(ckpt, dtype=torch.float32).eval()
    out = export(ckpt, "gguf", tmp_path / "m.gguf", dtype="f32")
    prompt = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = _llama(out)
    got = llm.eval(prompt)  # 24 positions: past the shrunk sliding windows (8) of Mistral / Gemma 2/3
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)
    if name != "mistral-7b-v0.3":  # llama.cpp's llama has no sliding window: beyond it greedy may differ
        assert llm.greedy(prompt, 8) == torch_greedy(model, prompt, 8)
    llm.close()
    # f16 on a model trained a few steps to repeat one sequence: peaked logits, so f16 rounding
    # must not change a single greedy token
    seq = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    for _ in range(30):
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.set_num_threads(threads)
    model.eval()
    assert losses[-1] < losses[0] / 2  # it learned: the logits are peaked, no longer flat
    from lmforge.checkpoint import save_model

    save_model(model, tmp_path / "trained", tokenizer=tok300)
    llm = _llama(export(tmp_path / "trained", "gguf", tmp_path / "t.gguf", dtype="f16"))
    start = seq[0, :4].tolist()
    want = torch_greedy(model, start, 12)
    assert llm.greedy(start, 12) == want
    llm.close()


def test_gemma_query_scale_llama_cpp_cannot_express(tmp_path, tok300):
    from hub_models import save_hub_model

    save_hub_model("gemma-2-2b", tmp_path / "g", vocab_size=320)  # query_pre_attn_scalar 256, head_dim 16
    tok300.save(tmp_path / "g")
    with pytest.raises(UserError, match=r"query_scale=256\.?0? .*gemma2.* 16 \*\* -0.5"):
        export(tmp_path / "g", "gguf", tmp_path / "g.gguf")
    assert not (tmp_path / "g.gguf").exists()


# ---------------------------------------------------------------------------------------------- tokenizers
# Tiny tokenizers of every kind, built as their hub tokenizer.json files are: byte-level BPE with the
# GPT-2, Llama 3, Qwen2 and SmolLM pre-tokenizers, and SentencePiece BPE (byte fallback) converted by
# transformers in Llama 2's legacy form (Prepend normalizer), Mistral v0.3's (Metaspace, prepend
# "first") and Gemma's (spaces replaced, no prefix).
_LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = TEXT + ["Grüße aus Köln, naïve café — 東京 🙂 ñ 12345 + 678 = 13023\n\tx != y;"] * 10
STRINGS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "line one\nline two\n\n\nthree",
    "tabs\tand\r\nwindows newlines",
    "digits 1234567890 and 3.14159",
    "def f(a, b):\n    return a ** 2 + b",
    "if (x != y) { return -1; } // done",
    "Grüße aus Köln, naïve café",
    "東京は大きい 🙂🙃 emoji",
    "ñandú — «quotes» ‘single’",
    "It's we'll they've I'M DON'T",
    "MiXeD CaSe WoRdS",
    "    indented code\n\tand tab",
    "a" * 40,
    " ",
    "end.",
    "{special0}text after a special token",
    "before{special1} after {special0}x",
]
BPE_KINDS = {  # name -> (special tokens, BOS token added by the post-processor or None)
    "gpt-2": (["<|endoftext|>"], None),
    "llama-bpe": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], "<|begin_of_text|>"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None),
    "smollm": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None),
}


def bpe_tokenizer_dir(path, kind):
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, processors, trainers
    from tokenizers import pre_tokenizers as pt

    specials, bos = BPE_KINDS[kind]
    t = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    t.pre_tokenizer = {
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": pt.Sequence(
            [
                pt.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        "qwen2": pt.Sequence(
            [pt.Split(Regex(_QWEN2_SPLIT), "isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]
        ),
    }[kind]
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=specials,
            initial_alphabet=pt.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    config = {"eos_token": specials[-1]}
    if bos:
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
        config["bos_token"] = bos
    path.mkdir(parents=True)
    t.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def spm_tokenizer_dir(path, kind):
    import io
    import json

    import transformers
    from tokenizers import models, normalizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    spm = pytest.importorskip("sentencepiece")
    gemma = kind == "gemma"
    ids = (
        dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3)
        if gemma
        else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    )
    names = dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>") if gemma else {}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=600, model_type="bpe", byte_fallback=True,
        character_coverage=0.995, split_digits=True, remove_extra_whitespaces=False, minloglevel=2,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, **ids, **names,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"] if gemma else ["[INST]", "[/INST]"],
    )  # fmt: skip
    path.mkdir(parents=True)
    (path / "sp.model").write_bytes(buf.getvalue())
    ex = SentencePieceExtractor(str(path / "sp.model")).extract(models.BPE)
    (path / "sp.model").unlink()
    if gemma:
        hf, bos = transformers.GemmaTokenizer(vocab=ex["vocab"], merges=ex["merges"]), ("<bos>", 2)
    else:
        hf = transformers.LlamaTokenizer(vocab=ex["vocab"], merges=ex["merges"], legacy=kind == "llama2")
        bos = ("<s>", 1)
    t = hf._tokenizer
    if kind == "llama2":  # Llama 2's own tokenizer.json: Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer
        t.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        t.pre_tokenizer = None
    t.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    t.save(str(path / "tokenizer.json"))
    eos = "<eos>" if gemma else "</s>"
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos[0], "eos_token": eos}))
    return path


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization, which llama.cpp's detokenizer applies for the gpt-2,
    llama-bpe and dbrx pre-tokenizers (their hub tokenizers set clean_up_tokenization_spaces)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(a, b)
    for a, b in ((" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "kind", ["dbrx", "gpt-2", "llama-bpe", "qwen2", "smollm", "llama2", "gemma", "mistral"]
)
def test_tokenizer_kinds_in_llama_cpp(tmp_path, tok, kind):
    import json
    import warnings

    from lmforge.export.gguf import prompt_ids, stop_ids
    from lmforge.tokenizer import Tokenizer

    if kind == "dbrx":  # lmforge's own trained tokenizer (cl100k split)
        t = tok
    elif kind in BPE_KINDS:
        t = Tokenizer.load(bpe_tokenizer_dir(tmp_path / "tok", kind))
    else:
        t = Tokenizer.load(spm_tokenizer_dir(tmp_path / "tok", kind))
    torch.manual_seed(0)
    cfg = preset("llama", "debug", vocab_size=t.vocab_size, bos_token_id=t.bos_id, eos_token_id=t.eos_id)
    save_model(build(cfg), tmp_path / "ckpt", tokenizer=t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pre-tokenizer is one llama.cpp knows: no 'default' fallback
        out = export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="f32")
    meta = read_gguf(out)["metadata"]
    spm = kind in ("llama2", "gemma", "mistral")
    assert meta["tokenizer.ggml.model"] == ("llama" if spm else "gpt2")
    if not spm:
        assert meta["tokenizer.ggml.pre"] == kind
    else:
        assert meta["tokenizer.ggml.add_space_prefix"] == (kind != "gemma")
        assert len(meta["tokenizer.ggml.scores"]) == cfg.vocab_size
        assert meta["tokenizer.ggml.token_type"][t.token_to_id("<0x0A>")] == gguf.TokenType.BYTE
    llm = _llama(out, n_ctx=256)
    specials = sorted(t.special_tokens, key=t.special_tokens.get)
    texts = [s.replace("{special0}", specials[0]).replace("{special1}", specials[-1]) for s in STRINGS]
    assert len(texts) == 20
    spec = json.loads(t._json)
    hf_first = kind == "mistral"  # Metaspace(prepend_scheme="first"): see docs/export.md
    for text in texts:
        ours = prompt_ids(t, text)  # lmforge's ids for a prompt (its BOS rule: AutoTokenizer's)
        theirs = llm.tokenize(text, add_special=True, parse_special=True)
        if hf_first and (text.startswith(" ") or any(sp in text for sp in specials)):
            # HF's Metaspace adds no "▁" to text that starts with a space or follows a special token;
            # SentencePiece (and so llama.cpp) always does
            continue
        assert theirs == ours, text
        # back to text: the bytes llama.cpp streams token by token, and its detokenizer
        if not spm:
            assert llm.piece_bytes(theirs).decode() == t.decode(ours), text
        back = llm.detokenize(theirs)  # special tokens written out, as t.decode does
        want = t.decode(ours)
        assert back == (_clean_up(want) if kind in ("gpt-2", "llama-bpe", "dbrx") else want), text
    # the same BOS rule, and llama.cpp stops at every id lmforge stops at
    assert llm.special_ids()["add_bos"] == (t.add_bos if hasattr(t, "add_bos") else t.bos_id is not None)
    assert all(llm.is_eog(i) for i in stop_ids(t, cfg)), stop_ids(t, cfg)
    assert spec["model"]["type"] == "BPE"
    llm.close()


# ---------------------------------------------------------------------------------------------- quantizers
@pytest.fixture(scope="module")
def wide(tmp_path_factory, tok):
    """A llama of width 256 (the k-quant super-block), trained to repeat TEXT a little."""
    path = tmp_path_factory.mktemp("wide") / "ckpt"
    make_checkpoint(path, "llama", tok, d_model=256, d_ff=512, n_heads=4, n_kv_heads=2, vocab_size=512)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "dtype, qtype, tol", [("q8_0", "Q8_0", 0.03), ("q4_k_m", "Q4_K", 0.3), ("q6_k", "Q6_K", 0.1)]
)
def test_llama_cpp_quantizer(tmp_path, tok, wide, dtype, qtype, tol):
    from lmforge.checkpoint import load_model

    out = export(wide, "gguf", tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    r = read_gguf(out)
    types = {n: q for n, (_shape, q) in r["tensors"].items()}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    if dtype == "q4_k_m":  # llama.cpp's mix: a few tensors at 6 bits (output, half the ffn_down / attn_v)
        assert types["output.weight"] == "Q6_K" and "Q6_K" in {
            types["blk.0.ffn_down.weight"],
            types["blk.1.ffn_down.weight"],
        }
        assert r["metadata"]["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left behind
    model = load_model(wide, dtype=torch.float32)
    prompt = tok.encode("def add(a, b):\n    return a + b", bos=True)
    llm = _llama(out)
    got = llm.eval(prompt)
    llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].numpy()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < tol  # measured: q8_0 1.6e-2, q6_k 4.5e-2, q4_k_m 1.4e-1 of the largest logit


def test_k_quant_fallback_and_block_errors(tmp_path, tok):
    # width 64: rows are not a multiple of 256, so llama.cpp's q4_k_m falls back to q5_0 (32-blocks)
    make_checkpoint(tmp_path / "narrow", "llama", tok)
    types = {
        n: q
        for n, (_s, q) in read_gguf(export(tmp_path / "narrow", "gguf", tmp_path / "n.gguf", dtype="q4_k_m"))[
            "tensors"
        ].items()
    }
    assert types["blk.0.attn_q.weight"] in ("Q5_0", "Q5_1", "Q8_0") and "Q4_K" not in types.values()
    # width 48: not even a 32-block; one line naming the tensor, nothing written
    make_checkpoint(tmp_path / "odd", "llama", tok, d_model=48, n_heads=3, n_kv_heads=3, d_ff=96)
    for dtype in ("q8_0", "q4_0", "q4_k_m"):
        with pytest.raises(
            UserError,
            match=r"tensor blk.0.attn_q.weight has rows of 48 values, not a multiple of the 32-value",
        ):
            export(tmp_path / "odd", "gguf", tmp_path / "o.gguf", dtype=dtype)
    assert not (tmp_path / "o.gguf").exists()


def test_importance_matrix_from_calibration_text(tmp_path, tok, wide):
    from lmforge.checkpoint import load_model
    from lmforge.export.gguf import importance_matrix

    model = load_model(wide, dtype=torch.float32)
    text = "".join(TEXT[:3])  # within the context: one forward pass
    assert len(tok.encode(text, bos=True)) <= model.config.max_seq_len
    im = importance_matrix(model, tok, text)
    # q/k/v read the same input: one entry each, equal to the mean squared attention-norm output
    x = {}
    h = model.blocks[0].attn.wqkv.register_forward_hook(lambda m, i, o: x.update(inp=i[0]))
    with torch.no_grad():
        model(torch.tensor([tok.encode(text, bos=True)]))
    h.remove()
    want = (x["inp"][0] ** 2).mean(0).numpy()
    for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        np.testing.assert_allclose(im[n], want, rtol=1e-5)
    assert im["blk.1.ffn_down.weight"].shape == (512,) and "output.weight" in im
    (tmp_path / "calib.txt").write_text(text)
    out = export(wide, "gguf", tmp_path / "m.gguf", dtype="q4_k_m", calibration=tmp_path / "calib.txt")
    llm = _llama(out)
    assert llm.eval(tok.encode("The quick", bos=True)).shape[1] == 512
    llm.close()
    with pytest.raises(UserError, match="calibration"):
        export(wide, "gguf", tmp_path / "x.gguf", dtype="f16", calibration=tmp_path / "calib.txt")


def test_llama_cpp_type_without_llama_cpp_is_a_clear_error(tmp_path, tok, monkeypatch):
    import lmforge.export.llama_cpp as lc

    make_checkpoint(tmp_path / "ckpt", "llama", tok)

    def missing():
        raise lc.LlamaCppUnavailable('llama.cpp needs llama-cpp-py-sync: pip install "lmforge[llama]"')

    monkeypatch.setattr(lc, "_bindings", missing)
    with pytest.raises(
        UserError, match=r"--dtype q4_k_m is made by llama.cpp's quantizer: .*lmforge\[llama\]"
    ):
        export(tmp_path / "ckpt", "gguf", tmp_path / "m.gguf", dtype="q4_k_m")
    assert not (tmp_path / "m.gguf").exists()
