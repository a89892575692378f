"""Weight-only quantization: error bounds, exact save/load, kernels, GPTQ, and quantized checkpoints
running through lmforge.load, generate, evaluate, report and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compress_data import debug_model
from safetensors import safe_open
from train_data import run_lmforge

import lmforge
from lmforge.checkpoint import load_model, save_model
from lmforge.compress.qlinear import QuantEmbedding, QuantLinear, unpack_int4
from lmforge.compress.quantize import gptq, quantization_error, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "mixtral"])
@pytest.mark.parametrize("method", ["int8", "int4"])
@torch.no_grad()
def test_error_bound_and_exact_reload(family, method, tmp_path):
    ref = debug_model(family)
    q = quantize_model(debug_model(family), method, 32, log=lambda *a: None)
    # every stored weight is within half a quantization step of the original (per channel / per group)
    errs = quantization_error(q, ref)
    assert len(errs) == 4 * ref.config.n_layers - (2 * ref.config.n_layers if ref.config.n_experts else 0) + (
        0 if ref.config.tie_embeddings else 1
    )
    assert max(errs.values()) <= 0.5 + 1e-5, errs
    emb = q.tok_emb
    assert isinstance(emb, QuantEmbedding)
    e_err = (ref.tok_emb.weight - emb.dequantize()).abs() / emb.scales.float()[:, None]
    assert float(e_err.max()) <= 0.5 + 1e-5
    assert q.num_params() == ref.num_params()

    x = torch.randint(0, ref.config.vocab_size, (2, 12))
    y = q(x)
    save_model(q, tmp_path / "q")
    back = load_model(tmp_path / "q")
    assert torch.equal(back(x), y)  # the same kernels on the same stored numbers
    assert back.config.extra["quantization_config"] == q.config.extra["quantization_config"]
    rel = float((y - ref(x)).norm() / ref(x).norm())
    assert rel < (0.02 if method == "int8" else 0.15), rel

    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (
        qc["method"] == method and "quant_method" not in qc and qc["bits"] == (8 if method == "int8" else 4)
    )
    assert qc["group_size"] == (32 if method == "int4" else None) and qc["embedding"] == "int8"
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        name = next(n for n in names if n.endswith(("q_proj.qweight", "c_attn.qweight")))
        w = f.get_tensor(name)
        K = ref.config.d_model
        assert w.dtype == (torch.int8 if method == "int8" else torch.uint8)
        assert w.shape[1] == (K if method == "int8" else K // 2)  # int4: two codes per byte
        assert not any(n.endswith(".weight") and ("proj" in n or "c_attn" in n or "c_fc" in n) for n in names)


@torch.no_grad()
def test_int4_packing_and_grid():
    w = torch.randn(32, 64)
    m = QuantLinear.from_float(w, bits=4, group_size=32)
    q = unpack_int4(m.qweight)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    # the stored bytes hold column 2j in the low nibble and 2j+1 in the high nibble
    assert torch.equal(m.qweight[:, 0] & 0xF, q[:, 0]) and torch.equal(m.qweight[:, 0] >> 4, q[:, 1])
    # the grid spans each group: both ends of every group use codes near 0 and 15
    g = q.view(32, 2, 32)
    assert int(g.amin(-1).max()) <= 1 and int(g.amax(-1).min()) >= 14


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_kernel_matches_dequantized_weights(bits):
    torch.manual_seed(0)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64)
    m = QuantLinear.from_float(w, b, bits=bits, group_size=32)
    assert m.kernel == ("int8pack_cpu" if bits == 8 else "int4pack_cpu")
    for M in (1, 7):
        x = torch.randn(M, 128)
        ref = F.linear(x, m.dequantize(), b)
        out = m(x)
        # the kernels take bf16 activations (fp32 accumulation): bf16-level agreement
        assert float((out - ref).abs().max()) < 1e-2 * float(ref.abs().max()), (bits, M)
        m.kernel = "dequant"  # the fallback for devices/shapes without a kernel: exact
        assert torch.allclose(m(x), ref, atol=1e-6)
        m.kernel = "int8pack_cpu" if bits == 8 else "int4pack_cpu"
    # shapes the CPU kernels refuse fall back to dequantizing on the fly
    assert QuantLinear.from_float(torch.randn(8, 40), bits=8).kernel == "dequant"
    assert QuantLinear.from_float(torch.randn(24, 64), bits=4, group_size=32).kernel == "dequant"


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_has_lower_output_error_than_rounding(bits):
    g = torch.Generator().manual_seed(0)
    K, N, n = 128, 64, 2048
    mix = torch.randn(K, K, generator=g) / K**0.5
    X = torch.randn(n, K, generator=g) @ mix * torch.linspace(0.1, 3, K)  # correlated, uneven channels
    w = torch.randn(N, K, generator=g) * 0.05
    H = X.t() @ X / n
    rtn = QuantLinear.from_float(w, bits=bits, group_size=32)
    opt = QuantLinear.from_float(w, bits=bits, group_size=32, codes=gptq(w, H, bits, 32))
    ref = X @ w.t()
    e_rtn = float((X @ rtn.dequantize().t() - ref).norm())
    e_gptq = float((X @ opt.dequantize().t() - ref).norm())
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_quantized_checkpoint_loads_generates_and_evaluates(trained, corpus, tmp_path):  # noqa: F811
    from lmforge.compress.quantize import quantize
    from lmforge.evaluate import evaluate_lm

    data = corpus["data"]
    base_lm = lmforge.load(trained, device="cpu")
    base = evaluate_lm(base_lm.model, base_lm.tokenizer, data, max_tokens=4000)["bits_per_byte"]
    for method, limit in (("int8", 0.01), ("int4", 0.05)):
        quantize(trained, tmp_path / method, method, 64, eval_data=None, log=lambda *a: None)
        ratio = (tmp_path / method / "model.safetensors").stat().st_size / (
            trained / "model.safetensors"
        ).stat().st_size
        assert ratio <= (0.3 if method == "int8" else 0.2), (method, ratio)
        lm = lmforge.load(tmp_path / method, device="cpu")
        assert isinstance(lm.model.blocks[0].attn.wqkv, QuantLinear)
        text = lm.generate("def ", max_new_tokens=8, temperature=0)
        assert isinstance(text, str)
        bpb = evaluate_lm(lm.model, lm.tokenizer, data, max_tokens=4000)["bits_per_byte"]
        assert bpb <= base * (1 + limit), (method, base, bpb)


def test_quantize_cli_with_gptq_and_report(trained, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "gptq"
    args = ["quantize", trained, "--method", "int4", "--group-size", 32, "--out", out]
    args += ["--calibration-data", corpus["data"], "--calibration-samples", 16, "--calibration-seq-len", 64]
    args += ["--eval-data", corpus["data"], "--eval-tokens", 1000]
    r = run_lmforge(*args)
    assert r.returncode == 0, r.stderr
    assert "GPTQ" in r.stdout and "bits per byte" in r.stdout and "decode tok/s" in r.stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["algorithm"] == "gptq" and qc["group_size"] == 32

    from lmforge.evaluate.report import compare_checkpoints
    from lmforge.lm import load_each

    rep = compare_checkpoints(
        load_each([trained, out], device="cpu"),
        corpus["data"],
        tmp_path / "report",
        names=["fp32", "int4"],
        max_tokens=500,
        new_tokens=4,
        prompt_len=8,
    )
    rows = {r["name"]: r for r in rep["models"]}
    assert rows["int4"]["quantization"] == "int4"
    assert rows["int4"]["params"] == rows["fp32"]["params"]
    assert rows["int4"]["size_on_disk_bytes"] < rows["fp32"]["size_on_disk_bytes"]
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_cuda_kernels_match_dequantized_weights(bits):
    w = torch.randn(256, 1024) * 0.02
    m = QuantLinear.from_float(w, bits=bits, group_size=64).to("cuda")
    assert m.kernel in ("int8pack_cuda", "int4pack_cuda", "dequant")
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), m.dequantize().to("cuda"))
    out = m(x).float()
    assert float((out - ref).abs().max()) < 2e-2 * float(ref.abs().max()), m.kernel


def test_export_of_a_quantized_checkpoint_is_a_clear_error(tmp_path):
    from lmforge.export import export
    from lmforge.utils import UserError

    save_model(quantize_model(debug_model("llama"), "int8"), tmp_path / "q")
    assert lmforge.load(tmp_path / "q", device="cpu").config.extra.get("quantization_config")
    with pytest.raises(UserError, match="quantized checkpoint"):
        export(tmp_path / "q", "gguf", out=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
