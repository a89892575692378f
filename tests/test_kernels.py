"""lmforge's CPU decode kernels (rows.cpp), the module swaps that install them (decode.py) and the
weights in huge pages (hugepages.py): results against PyTorch's own products and attention in float64."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.kernels import hugepages, rows
from lmforge.kernels.decode import DecodeLinear

needs_kernel = pytest.mark.skipif(not rows.available(), reason="the kernel did not build (no C++ compiler)")


def _ref(x, w, scale=None, bias=None):
    """The product in float64 from the values the kernel sees (x and scale read as fp32)."""
    w64 = w.double() * (scale.double()[:, None] if scale is not None else 1)
    y = x.double() @ w64.t()
    return y + bias.double() if bias is not None else y


@needs_kernel
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 17])
@pytest.mark.parametrize("K", [1, 15, 16, 17, 33, 576])
def test_linear_rows_equals_the_product(wdtype, M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    N = 37  # not a multiple of anything the kernel blocks by
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    scale = bias = None
    if wdtype == torch.int8:
        w = torch.randint(-127, 128, (N, K), generator=g).to(torch.int8)
        # stored bf16, as QuantLinear does (or fp32, which the kernel reads as it is too)
        scale = (torch.rand(N, generator=g) / 100).to(torch.bfloat16 if K % 2 else torch.float32)
        bias = torch.randn(N, generator=g)
    else:
        w = w.to(wdtype)
    y = rows.linear_rows(x, w, scale, bias)
    ref = _ref(x, w, scale, bias)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    # fp32 accumulation in another order than float64's: relative to the size of the terms
    tol = 1e-5 * float(
        (
            x.double().abs() @ (w.double().abs() * (scale.double()[:, None] if scale is not None else 1)).t()
        ).max()
    )
    assert float((y.double() - ref).abs().max()) <= tol + 1e-6
    # bf16 activations in, bf16 out: the same sums, rounded once at the end
    yb = rows.linear_rows(x.bfloat16(), w, scale, bias)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, _ref(x.bfloat16(), w, scale, bias).to(torch.bfloat16), atol=tol, rtol=1e-2)


@needs_kernel
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
def test_kernels_give_the_same_bits_at_every_thread_count(wdtype):
    """Threads split output rows (and attention's heads x rows), never a sum: 1 thread and 3 (more
    than this machine may have: OpenMP runs them anyway) give bit-identical results. And they do
    split: the build calls OpenMP's parallel regions (without -fopenmp at::parallel_for is a loop)."""
    from torch.utils.cpp_extension import _get_build_directory

    (so,) = Path(_get_build_directory(rows._NAME, verbose=False)).glob("*.so")
    assert b"GOMP_parallel" in so.read_bytes()
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1001, 577, generator=g)
    w = (
        torch.randint(-127, 128, w.shape, generator=g).to(torch.int8)
        if wdtype == torch.int8
        else w.to(wdtype)
    )
    scale = torch.rand(1001, generator=g) / 100 if wdtype == torch.int8 else None
    q, k, v, mask = _attention_case(3, 12, 4, 2, 70, 64, 24, seed=3)
    before = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            out[n] = [
                rows.linear_rows(torch.randn(m, 577, generator=torch.Generator().manual_seed(m)), w, scale)
                for m in (1, 3, 8)
            ]
            out[n].append(rows.decode_attention(q, k, v, mask, 0.125))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(out[1], out[3]):
        assert torch.equal(a, b)


@needs_kernel
def test_linear_rows_refuses_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="float32, bfloat16 or int8"):
        rows.linear_rows(torch.randn(1, 4), torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"x \(M, K\), w \(N, K\)"):
        rows.linear_rows(torch.randn(1, 5), torch.randn(3, 4))


@needs_kernel
def test_linear_rows_traces_under_torch_compile():
    """The operator has a fake (shape) implementation, so a compiled graph holds it without a break."""
    w = torch.randn(24, 32)
    f = torch.compile(lambda x: rows.linear_rows(x, w).relu(), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 32)
    torch.testing.assert_close(f(x), (x @ w.t()).relu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_linear_layers_compute_the_same(monkeypatch, kernel, dtype):
    """Decode calls (few rows, no autograd) take the fast path, every other call the plain one; the
    results agree either way, with or without lmforge's kernel (PyTorch's layouts then)."""
    if kernel and not rows.available():
        pytest.skip("the kernel did not build")
    if not kernel:
        monkeypatch.setattr(rows, "available", lambda: False)
        monkeypatch.setattr(rows, "LOADED", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 48, bias=False)).to(dtype)
    ref = [p.detach().clone() for p in model.parameters()]
    kernels.install(model)
    done = ", ".join(kernels.installed(model))
    assert ("decode kernel" in done) == kernel, done
    assert all(type(m) is DecodeLinear for m in model)
    for p, r in zip(model.parameters(), ref):
        assert torch.equal(p, r)  # the values never change, whatever the storage
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for M in (1, 2, 4, 7, 30):
        x = torch.randn(M, 64).to(dtype)
        want = F.linear(F.linear(x.double(), ref[0].double(), ref[1].double()), ref[2].double())
        with torch.no_grad():
            got = model(x)
        torch.testing.assert_close(got.double(), want, atol=tol * float(want.abs().max()), rtol=0)
    x = torch.randn(3, 64, dtype=dtype)
    model(x).sum().backward()  # autograd: the plain path, gradients flow
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    kernels.uninstall(model)
    assert type(model[0]) is nn.Linear and model[0].weight.is_contiguous()


def _prefill_and_decode(model, ids):
    """Logits of a prefill of ids (B, T), then two one-token decode steps through the cache."""
    cache = model.new_cache(ids.shape[0], 16)
    with torch.no_grad():
        out = [model(ids, cache=cache), model(ids[:, :1], cache=cache), model(ids[:, 1:2], cache=cache)]
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_install_swaps_modules_keeping_parameters_and_uninstall_swaps_back(family):
    """install replaces Linear and Attention modules by kernel-backed subclasses holding the same
    Parameter objects (ties kept): same parameters, same logits (decode steps included), idempotent;
    uninstall gives plain modules again. Soft-capped attention (Gemma 2) stays plain."""
    from lmforge.config import preset
    from lmforge.kernels.decode import DecodeAttention, DecodeBlock
    from lmforge.model import Attention, build

    torch.manual_seed(0)
    model = build(preset(family, "debug", vocab_size=300)).eval()
    params = dict(model.named_parameters())
    ids = torch.randint(0, 300, (2, 9))
    ref = _prefill_and_decode(model, ids)
    kernels.install(model)
    kernels.install(model)  # idempotent
    assert not any(type(m) is nn.Linear for m in model.modules())
    want = DecodeAttention if family == "llama" and rows.available() else Attention
    assert all(type(m) is want for m in model.modules() if isinstance(m, Attention))
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[k] is params[k] for k in params)
    assert model.config.tie_embeddings == (model.lm_head.weight is model.tok_emb.weight)
    torch.testing.assert_close(_prefill_and_decode(model, ids), ref, atol=1e-4, rtol=0)
    kernels.uninstall(model)
    assert not any(isinstance(m, (DecodeLinear, DecodeAttention, DecodeBlock)) for m in model.modules())
    assert all(p is params[k] and p.is_contiguous() for k, p in model.named_parameters())
    torch.testing.assert_close(_prefill_and_decode(model, ids), ref, atol=1e-4, rtol=0)


def _attention_case(B, H, KV, T, S, hd, window, seed):
    """q, k, v and a mask (B, 1, T, S) with left padding in row 0 and a sliding window."""
    from lmforge.cache import make_mask

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, t, hd, generator=g) for n, t in ((H, T), (KV, S), (KV, S)))
    k_pos = torch.arange(S).expand(B, S).clone()
    k_pos[0, : S // 4] = -1  # padding
    mask = make_mask(torch.arange(S - T, S).expand(B, T), k_pos, window, S - T)
    return q, k, v, mask


def _attention_ref(q, k, v, mask, scale):
    """SDPA in float64 from the values the implementation sees, as (B, T, H, hd)."""
    q, k, v = (t.double() for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("impl", ["kernel", "few_query"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B, H, KV, T, S, hd, window",
    [
        (2, 6, 2, 3, 40, 16, 16),  # GQA, a sliding window, several queries
        (1, 9, 3, 1, 192, 64, None),  # SmolLM's decode step
        (3, 4, 4, 2, 33, 17, None),  # multi-head; a head size that is no multiple of 16
        (1, 20, 1, 1, 50, 80, None),  # multi-query with 20 heads: three passes of <= 8 heads
        (2, 8, 2, 16, 300, 128, 100),
    ],
)
def test_decode_attention_equals_sdpa(impl, dtype, B, H, KV, T, S, hd, window):
    """The decode attention (lmforge's kernel, or few_query_attention for bf16 without it) is SDPA's
    math, with and without a mask, reading q through the strides of the model's fused qkv view."""
    from lmforge.model import few_query_attention

    if impl == "kernel" and not rows.available():
        pytest.skip("the kernel did not build (no C++ compiler)")
    attend = rows.decode_attention if impl == "kernel" else few_query_attention
    q, k, v, mask = _attention_case(B, H, KV, T, S, hd, window, seed=H * S + hd)
    q = torch.cat([q.transpose(1, 2), k[:, :, :T].transpose(1, 2)], 2).transpose(1, 2)[:, :H]  # strided
    args = [t.to(dtype) for t in (q, k, v)]
    for m in (mask, mask[:1].expand(B, -1, -1, -1).contiguous()[:1], None):
        got = attend(*args, m, hd**-0.5)
        ref = _attention_ref(*args, m if m is None or m.shape[0] == B else m.expand(B, -1, -1, -1), hd**-0.5)
        assert got.dtype == dtype and got.shape == (B, T, H, hd)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output rounded once
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


@needs_kernel
def test_decode_attention_reads_only_the_visible_slots():
    """Masked slots are skipped, not weighted by zero: NaN in them changes nothing."""
    q, k, v, mask = _attention_case(2, 6, 2, 2, 40, 16, 16, seed=1)
    ref = rows.decode_attention(q, k, v, mask, 0.25)
    k[~mask[:, 0, 0:1].expand(-1, 2, -1)] = float("nan")  # every slot the first query may not see
    v[~mask[:, 0, 0:1].expand(-1, 2, -1)] = float("nan")
    got = rows.decode_attention(q[:, :, :1], k, v, mask[:, :, :1], 0.25)
    assert torch.equal(got, ref[:, :1])


@needs_kernel
def test_decode_attention_refuses_what_it_cannot_do():
    q, k = torch.randn(1, 6, 1, 16), torch.randn(1, 4, 8, 16)
    with pytest.raises(RuntimeError, match="H a multiple of KV"):
        rows.decode_attention(q, k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        rows.decode_attention(q, k[:, :3].double(), k[:, :3].double(), None, 1.0)
    with pytest.raises(RuntimeError, match=r"mask must be bool \(B, 1, T, S\)"):
        rows.decode_attention(q, k[:, :3], k[:, :3], torch.ones(1, 1, 1, 8), 1.0)


def _huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mapping that holds t, from /proc/self/smaps."""
    addr, kb, inside = t.data_ptr(), 0, False
    for line in open("/proc/self/smaps"):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m[1], 16) <= addr < int(m[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            kb = int(line.split()[1])
    return kb


def test_weights_move_to_huge_pages_keeping_values_strides_and_ties():
    if not hugepages.available():
        pytest.skip("transparent huge pages are not available on this machine")
    torch.manual_seed(0)
    emb, head = nn.Embedding(4096, 256), nn.Linear(256, 4096, bias=False)
    head.weight = emb.weight  # tied
    lin = nn.Linear(256, 1024)
    lin.weight.data = lin.weight.data.t().contiguous().t()  # stored transposed
    model = nn.ModuleDict({"emb": emb, "head": head, "lin": lin})
    model.register_buffer("small", torch.arange(10.0))  # under min_bytes: left where it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = lin.weight.stride()
    moved = hugepages.place(model)
    assert moved >= (4096 * 256 + 256 * 1024) * 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model["head"].weight is model["emb"].weight  # still one Parameter
    assert lin.weight.stride() == strides
    assert _huge_kb(emb.weight) >= 2048  # the kernel gave the mapping 2 MiB pages
    assert hugepages.place(model) == 0  # already placed: nothing moves twice
    # training still works on the moved parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model["lin"](torch.randn(2, 256)).sum().backward()
    opt.step()
    assert not torch.equal(lin.weight, before["lin.weight"])


@needs_kernel
@pytest.mark.parametrize(
    "family, dtype, over",
    [
        ("llama", torch.float32, {}),  # GQA, SiLU GLU
        ("llama", torch.bfloat16, {}),
        ("qwen2", torch.float32, {}),  # q/k/v biases
        ("gemma", torch.bfloat16, {}),  # RMSNorm by 1 + w, GELU (tanh), multi-query
        ("phi3", torch.float32, dict(partial_rotary_factor=0.5)),  # RoPE on half of each head
        ("mistral", torch.float32, dict(sliding_window=6)),  # a ring-buffer cache of 6 slots
        ("gpt2", torch.float32, {}),  # LayerNorm: not fused, the eager block
    ],
)
def test_fused_decode_layer_equals_the_eager_blocks(monkeypatch, family, dtype, over):
    """kernels.install fuses each supported block's decode step into one decode_layer call: a left-padded
    batch of 2 (masks), prefilled and decoded 6 steps, gives the logits of the eager model in float64."""
    from lmforge.config import preset
    from lmforge.kernels.decode import FUSED_ROWS, DecodeBlock
    from lmforge.model import build

    torch.manual_seed(0)
    model = build(preset(family, "debug", vocab_size=300, **over)).eval()
    ref = build(preset(family, "debug", vocab_size=300, **over)).eval()
    with torch.no_grad():  # larger weights than init's: peaked attention, which a wrong score would show
        for p in model.parameters():
            p.mul_(4 if p.dim() == 2 else 1)
    ref.load_state_dict(model.state_dict())
    model, ref = model.to(dtype), ref.to(dtype).double()
    kernels.install(model)
    fused = [type(b) is DecodeBlock for b in model.blocks]
    assert all(fused) == (family != "gpt2") and any(fused) == all(fused)
    calls = []
    op = torch.ops.lmforge.decode_layer
    monkeypatch.setattr(torch.ops.lmforge, "decode_layer", lambda *a: calls.append(1) or op(*a))
    ids = torch.randint(0, 300, (2, 5))
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, :2] = False  # row 0 left-padded
    got, want = [], []
    for m, out in ((model, got), (ref, want)):
        cache = m.new_cache(2, 16, dtype=m.tok_emb.weight.dtype)
        with torch.no_grad():
            out.append(m(ids, attention_mask=valid, cache=cache, logits_to_keep=1))
            for t in range(6):
                out.append(m(ids[:, t % 5 : t % 5 + 1], cache=cache))
            out.append(m(ids[:, :3], cache=cache))  # 3 tokens a row (speculative verification): 6 rows
    # 6 one-token steps and the 3-token chunk (none on a ring); the prefill of 10 rows where fp32 fuses as many
    fused_steps = 6 if "sliding_window" in over else 7 + (FUSED_ROWS[dtype] >= 10)
    assert len(calls) == (0 if family == "gpt2" else fused_steps * model.config.n_layers)
    got, want = torch.cat(got, 1).double(), torch.cat(want, 1)
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: the eager path rounds at every op
    torch.testing.assert_close(got, want, atol=tol * float(want.abs().max()), rtol=0)
