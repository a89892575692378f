"""Compression of the newer families (tiny models from real hub configs, tests/hub_models.py):
int8 / int4 (+GPTQ) quantization within the bounds of test_compress_quantize.py and an exact reload,
structured pruning that still loads in transformers with matching logits, and unstructured pruning."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.checkpoint import load_model, save_model
from lmforge.compress.prune import prune_model, sparsity_of
from lmforge.compress.qlinear import target_linears
from lmforge.compress.quantize import quantization_error, quantize_model
from tests.hub_models import VOCAB, save_hub_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)
NEW = ["qwen2.5-0.5b", "qwen3-0.6b", "gemma-2-2b", "gemma-3-1b", "phi-4-mini", "olmo-2-1b"]


def _model(name, tmp_path):
    save_hub_model(name, tmp_path / "hf")
    return lmforge.load(tmp_path / "hf", device="cpu").model.eval()


def _ids(T=20, B=2, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("method", ["int8", "int4"])
@torch.no_grad()
def test_quantize_bounds_and_reload(name, method, tmp_path):
    ref = _model(name, tmp_path)
    calib = list(_ids(32, 4, seed=1).split(2)) if method == "int4" else None  # GPTQ for int4
    q = quantize_model(_model(name, tmp_path), method, 32, calibration=calib, log=lambda *a: None)
    if calib is None:  # rounding: every stored weight within half a step of the original
        assert max(quantization_error(q, ref).values()) <= 0.5 + 1e-5
    x = _ids()
    y = q(x)
    save_model(q, tmp_path / "q")
    back = load_model(tmp_path / "q")
    assert torch.equal(back(x), y)  # same kernels on the same stored numbers
    # the quantized model computes what the float model computes with the stored (dequantized) weights
    deq = _model(name, tmp_path)
    sd = deq.state_dict()
    for n, parent, attr in target_linears(q, q.config.extra["quantization_config"]):
        sd[n + ".weight"].copy_(getattr(parent, attr).dequantize())
    sd["tok_emb.weight"].copy_(q.tok_emb.dequantize())
    assert float((y - deq(x)).norm() / deq(x).norm()) < 0.02  # bf16 activations in the kernels
    rel = float((y - ref(x)).norm() / ref(x).norm())
    # test_compress_quantize.py's bounds; norms on the sub-layer outputs (Gemma 2/3, OLMo 2) rescale each
    # sub-layer's output to the residual's size, so its relative error reaches the logits undiluted
    loose = 3 if ref.config.sublayer_norm else 1
    assert rel < (0.02 if method == "int8" else 0.15) * loose, rel


@pytest.mark.parametrize(
    "name,structure",
    [("qwen3-0.6b", "heads"), ("gemma-2-2b", "ffn"), ("olmo-2-1b", "heads"), ("qwen2.5-0.5b", "heads")],
)
def test_structured_pruning_loads_in_transformers(name, structure, tmp_path):
    m = _model(name, tmp_path)
    new, info = prune_model(m, "magnitude", 0.5, structure, log=lambda *a: None)
    assert new.num_params() < m.num_params()
    save_model(new, tmp_path / "p")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "p", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    x = _ids(24)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "p")(x), hf(x).logits, atol=1e-4, rtol=0)


def test_pruning_heads_of_phi3_is_a_clear_error(tmp_path):
    from lmforge.utils import UserError

    with pytest.raises(UserError, match="phi3"):
        prune_model(_model("phi-4-mini", tmp_path), "magnitude", 0.5, "heads", log=lambda *a: None)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "gemma-2-2b"])
def test_unstructured_pruning(name, tmp_path):
    m = _model(name, tmp_path)
    m, info = prune_model(m, "magnitude", 0.5, "unstructured", log=lambda *a: None)
    assert abs(sparsity_of(m) - 0.5) < 0.01
    save_model(m, tmp_path / "p")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "p")(x), m(x), atol=0, rtol=0)
