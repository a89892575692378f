"""Quantized checkpoints in the ecosystem's formats (lmforge/compress/formats.py): GPTQ, AWQ and
compressed-tensors directories load in transformers (or through a dequantizing reference written from
the formats' specs where transformers needs a GPU library) with lmforge's logits, lmforge re-imports them
bit for bit, and lmforge's own format never loads in transformers as random weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from compress_data import debug_model
from safetensors.torch import load_file, save_file

from lmforge import hf
from lmforge.checkpoint import load_model, save_model
from lmforge.compress.qlinear import QuantLinear
from lmforge.compress.quantize import quantize_model
from lmforge.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")
CASES = [("int4", "gptq"), ("int4", "awq"), ("int4", "compressed-tensors"), ("int8", "compressed-tensors")]


def _quiet(*a):
    pass


def _dequant_mode(model):
    """Run every quantized layer on its exact dequantized weights (the CPU kernels take bf16 inputs)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = "dequant"
    return model


def _quantized(method, fmt, family="llama", algorithm=None):
    m = debug_model(family)
    calib = None
    if algorithm:
        g = torch.Generator().manual_seed(1)
        calib = [torch.randint(0, m.config.vocab_size, (4, 32), generator=g) for _ in range(2)]
    return quantize_model(m, method, 32, calibration=calib, algorithm=algorithm, format=fmt, log=_quiet)


# --------------------------------------------------------------------------------------------- references
def _u32(t):
    return t.to(torch.int64) & 0xFFFFFFFF


def _gptq_reference(t, mod, qc):
    """GPTQ v1 dequantized from the spec: qweight (K/8, N) holds input 8i+j of output n in bits 4j..4j+3
    of word [i, n]; qzeros (K/G, N/8) the zero of output 8i+j in bits 4j.., stored minus one."""
    qw, qz, s, g_idx = (
        _u32(t[f"{mod}.qweight"]),
        _u32(t[f"{mod}.qzeros"]),
        t[f"{mod}.scales"],
        t[f"{mod}.g_idx"],
    )
    K, N = qw.shape[0] * 8, qw.shape[1]
    k, n = torch.arange(K)[:, None], torch.arange(N)[None, :]
    q = (qw[k // 8, n] >> (4 * (k % 8))) & 15
    g = g_idx.long()[:, None]
    z = ((qz[g, n // 8] >> (4 * (n % 8))) & 15) + 1
    return ((q - z).float() * s.float()[g, n]).t()  # (N, K)


def _awq_reference(t, mod, qc):
    """AWQ GEMM from the spec: qweight (K, N/8), output 8i+j of row k in nibble [0,4,1,5,2,6,3,7][j] of
    word [k, i] (the kernel's interleaved order); qzeros (K/G, N/8) likewise, stored as they are."""
    qw, qz, s = _u32(t[f"{mod}.qweight"]), _u32(t[f"{mod}.qzeros"]), t[f"{mod}.scales"]
    K, N = qw.shape[0], qw.shape[1] * 8
    G = qc["group_size"]
    slot = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    k, n = torch.arange(K)[:, None], torch.arange(N)[None, :]
    q = (qw[k, n // 8] >> (4 * slot[n % 8])) & 15
    z = (qz[k // G, n // 8] >> (4 * slot[n % 8])) & 15
    return ((q - z).float() * s.float()[k // G, n]).t()


def _reference_logits(d, x):
    """Logits of an ecosystem directory through the spec references: every quantized layer dequantized
    into a float copy of the model, run by lmforge's plain float path."""
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    t = load_file(str(d / "model.safetensors"))
    ref = _gptq_reference if qc["quant_method"] == "gptq" else _awq_reference
    floats = {k: v for k, v in t.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    for k in t:
        if k.endswith(".qweight"):
            floats[k[: -len("qweight")] + "weight"] = ref(t, k[: -len(".qweight")], qc).contiguous()
    plain = d.parent / (d.name + "-float")
    plain.mkdir()
    save_file(floats, str(plain / "model.safetensors"))
    del cfg["quantization_config"]
    (plain / "config.json").write_text(json.dumps(cfg))
    return load_model(plain)(x)


def _elsewhere_logits(d, fmt, x):
    """Logits of an exported directory outside lmforge's loader."""
    if fmt == "compressed-tensors":  # transformers + compressed-tensors run it on CPU
        pytest.importorskip("compressed_tensors")
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(x).logits
    # transformers needs gptqmodel (CUDA wheels) for these: the spec's dequantization instead
    return _reference_logits(d, x)


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_lmforge_format_never_loads_in_transformers_as_random_weights(method, tmp_path):
    save_model(quantize_model(debug_model("llama"), method, 32, log=_quiet), tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert "quant_method" not in qc and qc["format"] == "lmforge"  # what makes transformers stop
    for kw in ({}, {"dtype": torch.float32}):
        with pytest.raises(ValueError, match="quant_method"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", **kw)


@pytest.mark.parametrize(("method", "fmt"), CASES)
@torch.no_grad()
def test_export_loads_elsewhere_and_reimports_exactly(method, fmt, tmp_path):
    q = _dequant_mode(_quantized(method, fmt))
    d = tmp_path / fmt
    save_model(q, d, format=fmt)
    x = torch.randint(0, q.config.vocab_size, (2, 9))
    want = q(x)

    back = load_model(d)  # lmforge's own int layers, the very numbers
    assert back.config.extra["quantization_config"]["imported_from"] == fmt
    ours = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in back.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 4 * q.config.n_layers
    for n in ours:
        assert torch.equal(ours[n].dequantize(), theirs[n].dequantize()), n
    assert torch.equal(_dequant_mode(back)(x), want)

    got = _elsewhere_logits(d, fmt, x)
    assert float((got - want).norm() / want.norm()) < 1e-3


@pytest.mark.parametrize(
    ("method", "algorithm", "fmt"),
    [
        ("int4", "gptq", "gptq"),
        ("int4", "awq", "awq"),
        ("int8", "gptq", "compressed-tensors"),
        ("int8", "awq", "compressed-tensors"),
    ],
)
@torch.no_grad()
def test_calibrated_exports_exactly(method, algorithm, fmt, tmp_path):
    """GPTQ and AWQ only choose other codes: their checkpoints export and re-import like RTN's."""
    q = _dequant_mode(_quantized(method, fmt, algorithm=algorithm))
    assert q.config.extra["quantization_config"]["algorithm"] == algorithm
    save_model(q, tmp_path / fmt, format=fmt)
    x = torch.randint(0, q.config.vocab_size, (1, 7))
    want = q(x)
    assert torch.equal(_dequant_mode(load_model(tmp_path / fmt))(x), want)
    got = _elsewhere_logits(tmp_path / fmt, fmt, x)
    assert float((got - want).norm() / want.norm()) < 1e-3


def test_compressed_tensors_own_unpacking_agrees(tmp_path):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = _quantized("int4", "compressed-tensors")
    save_model(q, tmp_path / "ct", format="compressed-tensors")
    t = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    codes = ct.unpack_from_int32(t[f"{name}.weight_packed"], 4, tuple(t[f"{name}.weight_shape"].tolist()))
    w = codes.float().view(codes.shape[0], -1, 32) * t[f"{name}.weight_scale"].float()[..., None]
    assert torch.equal(w.view(codes.shape), q.blocks[0].mlp.w_out.dequantize())


def test_without_the_quantization_library_transformers_stops(tmp_path, monkeypatch):
    import transformers.quantizers.quantizer_compressed_tensors as qct
    from transformers.utils import is_gptqmodel_available

    for method, fmt in CASES[:3]:
        save_model(_quantized(method, fmt), tmp_path / fmt, format=fmt)
    monkeypatch.setattr(qct, "is_compressed_tensors_available", lambda: False)
    with pytest.raises(ImportError, match="compressed-tensors"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors")
    if not is_gptqmodel_available():  # as here: no CPU wheel without CUDA packages
        for fmt in ("gptq", "awq"):
            with pytest.raises((ImportError, RuntimeError)):
                transformers.AutoModelForCausalLM.from_pretrained(tmp_path / fmt)


@torch.no_grad()
def test_hub_style_gptq_with_fp16_scales_loads_as_float_with_a_note(tmp_path):
    q = _quantized("int4", "gptq")
    save_model(q, tmp_path / "g", format="gptq")
    f = tmp_path / "g" / "model.safetensors"
    t = load_file(str(f))
    for k in [k for k in t if k.endswith(".scales")]:
        t[k] = (t[k].float() * 1.001).half()  # fp16 scales bf16 cannot hold, as quantizers elsewhere write
    save_file(t, str(f))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = load_model(tmp_path / "g")
    assert any("dequantized to float" in str(x.message) for x in w)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert "quantization_config" not in m.config.extra
    rows = {o: th for o, th, _ in hf.layout(m.config)}
    want = torch.cat([_gptq_reference(t, n.rsplit(".", 1)[0], {}) for n in rows["blocks.0.attn.wqkv.weight"]])
    assert torch.equal(m.blocks[0].attn.wqkv.weight, want)


@torch.no_grad()
def test_lora_on_an_imported_base_behaves_as_on_lmforge_quantized(tmp_path):
    """QLoRA on a GPTQ directory made elsewhere: the same adapter on it and on the lmforge model it was
    written from gives the same logits (the int layers hold the same numbers)."""
    from lmforge.train.lora import LoRALinear, apply_lora

    q = _quantized("int4", "gptq")
    save_model(q, tmp_path / "g", format="gptq")
    models = [apply_lora(_dequant_mode(m), 4, targets=["all"]) for m in (q, load_model(tmp_path / "g"))]
    adapters = [{n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)} for model in models]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 4 * q.config.n_layers
    g = torch.Generator().manual_seed(0)
    for n, a in adapters[0].items():
        assert isinstance(a.base, QuantLinear)
        a.lora_B.normal_(generator=g)
        adapters[1][n].lora_A.copy_(a.lora_A)
        adapters[1][n].lora_B.copy_(a.lora_B)
    x = torch.randint(0, q.config.vocab_size, (2, 9))
    torch.testing.assert_close(models[1](x), models[0](x), atol=1e-6, rtol=0)


def test_formats_refuse_what_they_cannot_hold():
    with pytest.raises(UserError, match="int8 goes to --format compressed-tensors"):
        _quantized("int8", "gptq")
    with pytest.raises(UserError, match="Conv1D"):
        _quantized("int4", "awq", family="gpt2")
    with pytest.raises(UserError, match="--format"):
        _quantized("int4", "safetensors")
    q = quantize_model(debug_model("llama"), "int4", 32, keep_float=("embeddings", "lm_head"), log=_quiet)
    with pytest.raises(UserError, match="asymmetric grid"):
        save_model(q, "/nonexistent/never-written", format="gptq")
