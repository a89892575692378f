"""LoRA on a quantized base (QLoRA-style): the int8/int4 layers stay quantized and frozen, the adapter
trains through their input gradient, and the adapter merges into the float model they came from."""

from __future__ import annotations

import pytest
import torch
from train_data import base_model, make_config

from lmforge.checkpoint import load_model, save_model
from lmforge.compress.qlinear import QuantLinear
from lmforge.compress.quantize import quantize_model
from lmforge.train import load_lora_model, train
from lmforge.train.lora import LoRALinear
from lmforge.utils import UserError


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_over_a_quantized_layer_has_the_gradients_of_the_dequantized_formula(bits):
    """y = Q(x) + s (x A^T) B^T, with Q the quantized kernel; the gradients of x, A and B equal
    autograd's over the same formula with Q's dequantized weight Ŵ (dx = g Ŵ + s g B A)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q = QuantLinear.from_float(w, bits=bits, group_size=32)
    m = LoRALinear(q, rank=4, alpha=8.0)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), (x, m.lora_A, m.lora_B))

    wd = q.dequantize(torch.float64)
    x64, A, B = (t.detach().double().requires_grad_() for t in (x, m.lora_A, m.lora_B))
    ref = x64 @ wd.t() + (x64 @ A.t()) @ B.t() * m.scale
    want = torch.autograd.grad((ref * g.double()).sum(), (x64, A, B))
    # the forward runs PyTorch's int8/int4 kernels on bf16 activations: bf16 rounding, nothing more
    torch.testing.assert_close(y.double(), ref, atol=0.05 * float(ref.detach().abs().max()), rtol=0)
    for a, b in zip(got, want):  # the backward is fp32 on the stored grid
        torch.testing.assert_close(a.double(), b, atol=1e-4 * float(b.abs().max()), rtol=0)
    assert not any(p.requires_grad for p in q.parameters()) and q.qweight.dtype != torch.float32


def test_finetune_lora_on_an_int4_base_trains_and_merges_into_the_float_base(corpus, tmp_path):  # noqa: F811
    base = base_model(corpus, tmp_path / "base")
    model = load_model(base)
    quantize_model(model, "int4", group_size=32, log=lambda *a: None)
    save_model(model, tmp_path / "int4", tokenizer=None)
    (tmp_path / "int4" / "tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
    cfg = make_config(
        corpus,
        tmp_path,
        "qlora",
        **{
            "task": "sft",
            "model.init_from": str(tmp_path / "int4"),
            "data.path": str(corpus["chat"]),
            "ckpt.every": 0,
            "lora.rank": 8,
            "lora.targets": ["all"],
            "train.lr": 1e-2,
            "train.max_steps": 12,
        },
    )
    cfg.model.overrides.pop("max_seq_len")
    cfg.data.tokenizer = None
    s = train(cfg)
    assert "LoRA rank 8" in s["model"]
    final = tmp_path / "qlora/final"
    unmerged = load_lora_model(final)  # onto the int4 base it trained against
    layers = [m for m in unmerged.modules() if isinstance(m, LoRALinear)]
    assert layers and all(isinstance(m.base, QuantLinear) and m.base.bits == 4 for m in layers)
    assert all(float(m.lora_B.abs().max()) > 0 for m in layers)  # every adapter learned something
    with pytest.raises(UserError, match="base is quantized"):
        load_lora_model(final, merge=True)
    # merged into the float model the int4 one came from: the float base plus exactly B A s
    merged = load_lora_model(final, base=str(base), merge=True)
    plain = dict(load_model(base).named_parameters())
    for name, m in unmerged.named_modules():
        if isinstance(m, LoRALinear):
            torch.testing.assert_close(
                merged.get_submodule(name).weight, plain[name + ".weight"] + m.delta(), atol=1e-6, rtol=0
            )


def test_full_finetune_of_a_quantized_model_is_refused(corpus, tmp_path):  # noqa: F811
    base = base_model(corpus, tmp_path / "base")
    model = load_model(base)
    quantize_model(model, "int8", log=lambda *a: None)
    save_model(model, tmp_path / "int8", tokenizer=None)
    cfg = make_config(
        corpus,
        tmp_path,
        "full",
        **{"task": "sft", "model.init_from": str(tmp_path / "int8"), "data.path": str(corpus["chat"])},
    )
    cfg.model.overrides.pop("max_seq_len")
    with pytest.raises(UserError, match="--lora.rank"):
        train(cfg)
