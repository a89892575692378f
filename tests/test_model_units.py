"""Each block against a reference: hand formulas, naive loops, element-wise computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import preset
from lmforge.model import (
    MoE,
    Norm,
    apply_rope,
    build,
    linear_cross_entropy,
    load_balancing_loss,
    rope_inv_freq,
    rope_tables,
)


@pytest.fixture(autouse=True)
def _no_grad():
    """These tests compare values only; gradients are switched off per test, never for the session."""
    with torch.no_grad():
        yield


def test_rmsnorm_matches_formula():
    for unit_offset in (False, True):
        cfg = preset("gemma" if unit_offset else "llama", "debug")
        n = Norm(cfg)
        n.weight.copy_(torch.randn(cfg.d_model))
        x = torch.randn(3, 5, cfg.d_model)
        w = (1 + n.weight) if unit_offset else n.weight
        ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
        torch.testing.assert_close(n(x), ref, atol=1e-6, rtol=1e-5)


def test_layernorm_matches_formula():
    cfg = preset("gpt2", "debug")
    n = Norm(cfg)
    n.weight.copy_(torch.randn(cfg.d_model))
    n.bias.copy_(torch.randn(cfg.d_model))
    x = torch.randn(4, cfg.d_model)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(
        n(x), (x - mu) / torch.sqrt(var + cfg.norm_eps) * n.weight + n.bias, atol=1e-5, rtol=1e-5
    )


def test_rope_is_a_rotation_of_channel_pairs():
    """Channel pairs (j, j + hd/2) rotate by angle pos * theta^(-2j/hd): check against complex numbers."""
    cfg = preset("llama", "debug", rope_theta=100.0)
    hd = cfg.head_dim
    x = torch.randn(1, 2, 6, hd, dtype=torch.float64)
    inv = rope_inv_freq(cfg).double()
    pos = torch.arange(6, dtype=torch.float64)
    ang = pos[:, None] * inv[None]  # (T, hd/2)
    got = apply_rope(x, *rope_tables(ang.cos()[None, None], ang.sin()[None, None]))
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :]) * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1))
    torch.testing.assert_close(
        inv, torch.tensor([100.0 ** (-2 * j / hd) for j in range(hd // 2)], dtype=torch.float64)
    )
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def rot(v, p):
        a = p * inv
        return apply_rope(v, *rope_tables(a.cos(), a.sin()))

    assert torch.allclose(rot(q, 7) @ rot(k, 3), rot(q, 14) @ rot(k, 10))


def _naive_attention(model, layer, x, valid, window):
    """Loop over batch, heads, queries and keys: softmax(q.k / sqrt(hd)) v with causal/window/padding rules."""
    cfg, attn = model.config, model.blocks[layer].attn
    B, T, _ = x.shape
    q, k, v = attn.wqkv(x).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], -1)
    q = q.view(B, T, cfg.n_heads, cfg.head_dim)
    k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)
    v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim)
    out = torch.zeros(B, T, cfg.n_heads, cfg.head_dim)
    group = cfg.n_heads // cfg.n_kv_heads
    inv = rope_inv_freq(cfg)

    def rope(vec, p):
        a = p * inv
        return apply_rope(vec, *rope_tables(a.cos(), a.sin()))

    for b in range(B):
        pos = (valid[b].long().cumsum(0) - 1).tolist()
        for t in range(T):
            if not valid[b, t]:
                continue
            for h in range(cfg.n_heads):
                g = h // group  # GQA: query head h reads key/value head h // group
                qv = rope(q[b, t, h], pos[t])
                keys = [
                    s
                    for s in range(T)
                    if valid[b, s] and pos[s] <= pos[t] and (window is None or pos[t] - pos[s] < window)
                ]
                scores = torch.stack([qv @ rope(k[b, s, g], pos[s]) for s in keys]) / math.sqrt(cfg.head_dim)
                w = scores.softmax(0)
                out[b, t, h] = sum(wi * v[b, s, g] for wi, s in zip(w, keys))
    return attn.wo(out.reshape(B, T, cfg.q_dim))


@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, None), (2, 3)])
def test_attention_matches_naive_loop(kv_heads, window):
    torch.manual_seed(0)
    cfg = preset("mistral" if window else "llama", "debug", n_kv_heads=kv_heads, sliding_window=window)
    model = build(cfg).eval()
    x = torch.randn(2, 7, cfg.d_model)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False  # left padding on row 1
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    from lmforge.cache import make_mask

    mask = make_mask(pos, pos.masked_fill(~valid, -1), window, 0)
    inv = rope_inv_freq(cfg)
    ang = pos[..., None] * inv
    got = model.blocks[0].attn(
        x, rope_tables(ang.cos()[:, :, None], ang.sin()[:, :, None]), mask, False, None
    )
    ref = _naive_attention(model, 0, x, valid, window)
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=1e-4)


def test_moe_matches_per_token_loop():
    torch.manual_seed(0)
    cfg = preset("mixtral", "debug", n_experts=5, n_experts_per_tok=2)
    moe = MoE(cfg)
    for p in moe.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 9, cfg.d_model)
    got = moe(x)
    ref = torch.zeros_like(x)
    for b in range(2):
        for t in range(9):
            xt = x[b, t]
            probs = (moe.router.weight @ xt).softmax(-1)
            top = probs.topk(2)
            for w, e in zip(top.values / top.values.sum(), top.indices):
                gate, up = (moe.w_in[e] @ xt).chunk(2)
                ref[b, t] += w * (moe.w_out[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_load_balancing_loss_matches_elementwise():
    torch.manual_seed(0)
    E, k, N, layers = 4, 2, 10, 3
    logits = [torch.randn(N, E) for _ in range(layers)]
    valid = torch.ones(N, dtype=torch.bool)
    valid[:3] = False
    for mask in (None, valid):
        toks = [(lg, n) for lg in logits for n in range(N) if mask is None or mask[n]]
        count = len(toks)
        f = [[0.0] * E for _ in range(k)]
        p = [0.0] * E
        for lg, n in toks:
            probs = lg[n].softmax(-1)
            for slot, e in enumerate(probs.topk(k).indices.tolist()):
                f[slot][e] += 1 / count
            for e in range(E):
                p[e] += probs[e].item() / count
        ref = E * sum(f[s][e] * p[e] for s in range(k) for e in range(E))
        got = load_balancing_loss(logits, k, mask)
        assert got.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("V", [64, 8192])  # one chunk; 512-row chunks with a partial last one
def test_chunked_loss_and_gradients_match_cross_entropy(V):
    """linear_cross_entropy (chunks, gradients formed in the forward pass) against
    F.cross_entropy(F.linear(x, w)) in float64, ignored targets included."""
    torch.manual_seed(0)
    N, d = 1100, 8
    x64, w64 = torch.randn(N, d, dtype=torch.float64), torch.randn(V, d, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    t[::7] = -100
    with torch.enable_grad():
        x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
        xr, wr = x64.clone().requires_grad_(), w64.clone().requires_grad_()
        got = linear_cross_entropy(x, w, t)
        ref = F.cross_entropy(F.linear(xr, wr), t, ignore_index=-100)
        (2 * got).backward()
        (2 * ref).backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-7, rtol=1e-4)
    with torch.enable_grad():  # a frozen head (LoRA): other chunks, the input's gradient alone
        x2 = x64.float().requires_grad_()
        linear_cross_entropy(x2, w64.float(), t).backward()
    torch.testing.assert_close(x2.grad.double(), xr.grad / 2, atol=1e-7, rtol=1e-4)


def test_compiled_training_step_equals_eager():
    """Compiled CPU training takes explicit attention instead of SDPA (Attention.attend): the loss and
    every gradient equal the eager model's."""
    torch.manual_seed(0)
    model = build(preset("qwen3", "debug", n_heads=4, n_kv_heads=2))
    x = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.enable_grad():
        eager = model(x[:, :-1], x[:, 1:])
        eager.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        got = torch.compile(model, backend="aot_eager")(x[:, :-1], x[:, 1:])
        got.backward()
    assert got.item() == pytest.approx(eager.item(), rel=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("family", ["gpt", "gpt2", "llama", "mistral", "mixtral", "gemma"])
def test_cache_equals_full_pass_at_every_position(family):
    torch.manual_seed(0)
    cfg = preset(family, "debug", max_seq_len=64, **({"sliding_window": 5} if family == "mistral" else {}))
    model = build(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    full = model(ids)
    # token by token
    cache = model.new_cache(2, 24)
    steps = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(24)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)
    # uneven chunks (chunked prefill, speculative verification): 7 + 1 + 3 + 6 + 7 (some longer than the window)
    cache = model.new_cache(2, 24)
    parts, t = [], 0
    for n in (7, 1, 3, 6, 7):
        parts.append(model(ids[:, t : t + n], cache=cache))
        t += n
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_cache_with_left_padding_equals_rows_alone(family):
    torch.manual_seed(0)
    cfg = preset(family, "debug", max_seq_len=64, **({"sliding_window": 4} if family == "mistral" else {}))
    model = build(cfg).eval()
    lengths = [9, 4]
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :5] = 0
    nxt = torch.randint(0, cfg.vocab_size, (2, 6))
    cache = model.new_cache(2, 15)
    batched = [model(ids, attention_mask=mask, cache=cache)[:, -1]]
    batched += [model(nxt[:, t : t + 1], cache=cache)[:, -1] for t in range(6)]
    for b, n in enumerate(lengths):
        row = torch.cat([ids[b, 9 - n :], nxt[b]])[None]
        alone = model(row)[0, n - 1 :]
        torch.testing.assert_close(torch.stack([x[b] for x in batched]), alone, atol=1e-5, rtol=0)


def test_meta_build_allocates_nothing_and_counts_parameters():
    cfg = preset("llama", "1b")
    model = build(cfg, meta=True)
    assert model.tok_emb.weight.device.type == "meta"
    assert model.num_params() == cfg.n_params()
    seven_b = preset("llama", "1b", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008)
    assert build(seven_b, meta=True).num_params() == seven_b.n_params() == 6_738_415_616  # Llama-2-7B


def test_meta_materialize_initialises_like_build():
    cfg = preset("llama", "debug")
    model = build(cfg, meta=True).materialize("cpu")
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    assert torch.isfinite(model(ids)).all()
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # untied family


def test_init_scales_residual_projections():
    cfg = preset("llama", "small", vocab_size=1000)
    model = build(cfg)
    std_q = model.blocks[0].attn.wqkv.weight.std().item()
    std_o = model.blocks[0].attn.wo.weight.std().item()
    assert std_q == pytest.approx(cfg.init_std, rel=0.05)
    assert std_o == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers), rel=0.05)
    tied = build(preset("gpt2", "debug"))
    assert tied.lm_head.weight is tied.tok_emb.weight
