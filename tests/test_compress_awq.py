"""AWQ: the scales change nothing before rounding (every family), the search and clip against brute
force, AWQ int4 against round to nearest where activation outliers make the difference, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from compress_data import debug_model
from train_data import base_model, run_lmforge

import lmforge
from lmforge.compress import awq
from lmforge.compress.calibrate import blocks_in_order
from lmforge.compress.qlinear import QuantLinear
from lmforge.compress.quantize import quantize_model
from lmforge.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "gpt", "gpt2", "gemma", "gemma2", "olmo2", "mixtral", "qwen3"]


def _tokens(model, seed, shape):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_scales_leave_the_float_model_unchanged(family):
    """Random scales in every group the plan folds, then the searched ones: same logits (1e-5)."""
    m = debug_model(family)
    x = _tokens(m, 0, (2, 16))
    ref = m(x)
    g = torch.Generator().manual_seed(1)
    for block in m.blocks:
        for group in awq.plan(block, m.config).groups:
            K = group.linear.in_features // (m.config.n_heads // m.config.n_kv_heads if group.pool else 1)
            awq.apply_scales(group, torch.rand(K, generator=g) * 4 + 0.25)  # 0.25 .. 4.25
    assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    cal = list(_tokens(m, 2, (4, 32)).split(2))
    for _, block, inputs in blocks_in_order(m, cal):
        awq.awq_block(block, m.config, inputs, 4, lambda K: 32, clip=False)
    assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    # what each family can fold exactly (see awq.py)
    names = [gr.name for gr in awq.plan(m.blocks[0], m.config).groups]
    expect = {
        "gpt": ["attn.wo"],  # post-norm: nothing in front of q/k/v or gate/up; GELU before down
        "gpt2": ["attn.wqkv", "attn.wo", "mlp.w_in"],  # GELU, plain MLP: down not scaled
        "olmo2": ["attn.wo", "mlp.w_out"],  # norms on the sub-layer outputs only
        "mixtral": ["attn.wqkv", "attn.wo"],  # experts stay float
    }.get(family, ["attn.wqkv", "attn.wo", "mlp.w_in", "mlp.w_out"])
    assert names == expect


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_is_what_the_layer_stores(bits):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        awq.fake_quant(w, bits, 32), QuantLinear.from_float(w, bits=bits, group_size=32).dequantize()
    )


def test_clip_search_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[:, 5] = 6.0  # one large weight per row: clipping it pays off in its group
    x = torch.randn(300, 64, generator=g)
    got = awq.search_clip(w, x, 4, 32, rows=slice(2, None))
    assert torch.equal(got[:2], w[:2])  # rows outside `rows` untouched
    xs = x[:: 300 // awq.CLIP_TOKENS or 1][: awq.CLIP_TOKENS]
    for r in range(2, 6):
        for j in range(2):
            wg, xg = w[r, 32 * j : 32 * j + 32], xs[:, 32 * j : 32 * j + 32]
            errs = []
            for k in range(10):
                m = wg.abs().max() * (1 - k / 20)
                c = wg.clamp(-m, m)
                q = awq.fake_quant(c[None].repeat(1, 1), 4, 32)[0]
                errs.append((float((xg @ q - xg @ wg).pow(2).mean()), c))
            best = min(errs, key=lambda e: e[0])[1]
            assert torch.allclose(got[r, 32 * j : 32 * j + 32], best)
    assert (got[2:, :32].abs().amax(1) < 6).any()  # some outlier groups were clipped (2 of 4 here)


def _with_outliers(family, seed=0):
    """A random model whose norms amplify 4 of the 64 channels 16x: the salient input channels real
    LLMs have, which round to nearest spends the same grid on as the rest."""
    m = debug_model(family, seed)
    idx = torch.randperm(m.config.d_model, generator=torch.Generator().manual_seed(seed))[:4]
    with torch.no_grad():
        for b in m.blocks:
            for n in (b.attn_norm, b.mlp_norm):
                if n.unit_offset:
                    n.weight[idx] += 15  # Gemma: (1 + w)
                else:
                    n.weight[idx] *= 16
    return m


@pytest.mark.parametrize("family", ["llama", "gemma"])
@torch.no_grad()
def test_awq_beats_round_to_nearest_on_outlier_channels(family):
    base = _with_outliers(family)
    cal = list(_tokens(base, 5, (16, 64)).split(8))
    test = _tokens(base, 6, (8, 64))  # held out, same distribution
    ref = base(test)
    err = {}
    for alg in ("rtn", "awq"):
        m = quantize_model(
            copy.deepcopy(base),
            "int4",
            32,
            calibration=None if alg == "rtn" else cal,
            algorithm=alg,
            log=print,
        )
        assert m.config.extra["quantization_config"]["algorithm"] == alg
        err[alg] = float(
            F.kl_div(m(test).log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
        )
    assert err["awq"] < 0.6 * err["rtn"], err  # measured: 0.013 vs 0.042 (llama), 0.0015 vs 0.0043 (gemma)
    # the search includes alpha = 0 (plain rounding): never worse on the objective it minimises
    m = copy.deepcopy(base)
    gains = [
        v
        for _, block, inputs in blocks_in_order(m, cal)
        for v in awq.awq_block(block, m.config, inputs, 4, lambda K: 32)["gain"].values()
    ]
    assert max(gains) <= 1.0 and min(gains) < 0.7, gains


def test_awq_needs_calibration_data():
    with pytest.raises(UserError, match="calibration"):
        quantize_model(debug_model("llama"), "int4", 32, algorithm="awq", log=lambda *a: None)


def test_quantize_cli_awq(corpus, tmp_path):  # noqa: F811
    base = base_model(corpus, tmp_path / "base")
    out = tmp_path / "awq"
    args = ["quantize", base, "--method", "int4", "--group-size", 32, "--out", out, "--algorithm", "awq"]
    args += ["--calibration-data", corpus["data"], "--calibration-samples", 8, "--calibration-seq-len", 32]
    r = run_lmforge(*args, "--no-eval")  # the before/after table: test_compress_quantize.py
    assert r.returncode == 0, r.stderr
    assert "AWQ on 1 batches (256 tokens)" in r.stdout, r.stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["algorithm"] == "awq" and qc["bits"] == 4 and qc["group_size"] == 32
    lm = lmforge.load(out, device="cpu")
    assert isinstance(lm.model.blocks[0].attn.wqkv, QuantLinear)
    # the folded norm weights are what was saved: not the float model's ones
    ref = lmforge.load(base, device="cpu")
    assert not torch.equal(lm.model.blocks[0].attn_norm.weight, ref.model.blocks[0].attn_norm.weight)
