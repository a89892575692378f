"""Pruning: exact unstructured and 2:4 sparsity, structured models that transformers loads with the
same logits, recovery fine-tuning that lowers the loss and keeps the zeros, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from compress_data import debug_model
from train_data import run_lmforge

import lmforge
from lmforge.checkpoint import load_model, save_model
from lmforge.compress.prune import prune, prune_model, sparsity_of
from lmforge.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(cfg, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, cfg.vocab_size, (n * 2, 32), generator=g).split(2))


def _linears(model):
    for b in model.blocks:
        yield from (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_sparsity_is_exact(method):
    m = debug_model("llama")
    before = [lin.weight.clone() for lin in _linears(m)]
    cal = _calibration(m.config) if method == "wanda" else None
    m, info = prune_model(m, method, 0.3, "unstructured", cal, log=lambda *a: None)
    for lin, w0 in zip(_linears(m), before):
        N, K = lin.weight.shape
        zeros = (lin.weight == 0).sum(dim=1)
        assert torch.all(zeros == round(0.3 * K)), (zeros, K)  # the same count in every output row
        kept = lin.weight != 0
        assert torch.equal(lin.weight[kept], w0[kept])  # the others are untouched
    assert info["pruned_weights"] == sum(
        lin.weight.shape[0] * round(0.3 * lin.weight.shape[1]) for lin in _linears(m)
    )
    if method == "magnitude":  # in each row, no kept weight is smaller than a pruned one
        for lin, w0 in zip(_linears(m), before):
            pruned_max = w0.abs().masked_fill(lin.weight != 0, 0).amax(1)
            kept_min = w0.abs().masked_fill(lin.weight == 0, float("inf")).amin(1)
            assert torch.all(pruned_max <= kept_min)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_two_four_pattern(method):
    m = debug_model("gpt2")
    cal = _calibration(m.config) if method == "wanda" else None
    m, info = prune_model(m, method, 0.5, "2:4", cal, log=lambda *a: None)
    for lin in _linears(m):
        groups = (lin.weight == 0).view(lin.weight.shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2)  # exactly 2 of every 4 consecutive weights in a row
    assert info["sparsity"] == 0.5 and abs(sparsity_of(m) - 0.5) < 1e-9


@pytest.mark.parametrize(
    "family,structure,method",
    [
        ("llama", "heads", "magnitude"),
        ("llama", "ffn", "wanda"),
        ("mistral", "heads", "wanda"),
        ("gemma", "heads", "magnitude"),  # MQA: query heads are removed one by one
        ("gpt2", "ffn", "magnitude"),
        ("mixtral", "heads", "magnitude"),
    ],
)
def test_structured_pruning_loads_in_transformers(family, structure, method, tmp_path):
    from transformers import AutoModelForCausalLM

    m = debug_model(family, max_seq_len=64)
    cfg = m.config
    new, info = prune_model(
        m, method, 0.5, structure, _calibration(cfg) if method == "wanda" else None, log=lambda *a: None
    )
    nc = new.config
    if structure == "heads":
        if cfg.n_kv_heads > 1:
            assert nc.n_kv_heads == cfg.n_kv_heads // 2 and nc.n_heads == cfg.n_heads // 2
        else:
            assert nc.n_kv_heads == 1 and nc.n_heads == cfg.n_heads // 2
        assert nc.head_dim == cfg.head_dim
    else:
        assert nc.d_ff < cfg.d_ff and nc.d_ff % 32 == 0
    assert new.num_params() < m.num_params() and info["params_after"] == new.num_params()
    save_model(new, tmp_path / "p")
    hf_cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert "quantization_config" not in hf_cfg
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "p", torch_dtype=torch.float32).eval()
    ours = load_model(tmp_path / "p").eval()
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())


def test_structured_pruning_refuses_what_the_family_cannot_express():
    with pytest.raises(UserError, match="head size"):
        prune_model(debug_model("gpt2"), "magnitude", 0.5, "heads", log=lambda *a: None)
    with pytest.raises(UserError, match="larger sparsity"):
        prune_model(debug_model("llama"), "magnitude", 0.1, "heads", log=lambda *a: None)
    with pytest.raises(UserError, match="calibration"):
        prune_model(debug_model("llama"), "wanda", 0.5, "unstructured", None, log=lambda *a: None)


def test_recovery_lowers_the_loss_and_keeps_the_zeros(trained, corpus, tmp_path):  # noqa: F811
    s = prune(
        trained,
        tmp_path / "p",
        method="magnitude",
        sparsity=0.9,
        structure="unstructured",
        recover_steps=20,
        data=corpus["data"],
        recover_batch_size=8,
        recover_seq_len=64,
        recover_lr=1e-3,
        eval_data=None,
        log=lambda *a: None,
    )
    rec = s["prune"]["recovery"]
    assert rec["loss_after"] < rec["loss_before"] - 0.05, rec  # ~4.64 -> ~4.46
    # the pruned positions are still exactly zero after fine-tuning
    pruned = lmforge.load(tmp_path / "p-recovery" / "pruned", device="cpu").model
    final = lmforge.load(tmp_path / "p", device="cpu").model
    for a, b in zip(_linears(pruned), _linears(final)):
        assert torch.equal(a.weight == 0, b.weight == 0)
        assert not torch.equal(a.weight, b.weight)  # and the rest was trained
    assert abs(s["prune"]["achieved_sparsity"] - 0.9) < 0.01


def test_prune_cli_ffn(trained, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "ffn"
    args = ["prune", trained, "--method", "wanda", "--structure", "ffn", "--sparsity", 0.5, "--out", out]
    args += ["--calibration-data", corpus["data"], "--calibration-samples", 8]
    args += ["--eval-data", corpus["data"], "--eval-tokens", 1000]
    r = run_lmforge(*args)
    assert r.returncode == 0, r.stderr
    assert "removed 192 of 384 FFN channels" in r.stdout and "bits per byte" in r.stdout
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 192
