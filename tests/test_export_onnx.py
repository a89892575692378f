"""ONNX export: onnxruntime logits within 1e-4 of PyTorch (fp32) for the full model and the KV-cache
decoder step, at several lengths and with a left-padded batch; greedy generation with the runner equal
to lmforge's; bad input leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.config import preset
from lmforge.export import export
from lmforge.export.onnx_runner import OnnxLM, generate
from lmforge.model import build
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
TOL = 1e-4
TEXT = ["The quick brown fox jumps over the lazy dog. ", "def add(a, b):\n    return a + b\n"] * 30


def make_checkpoint(path, family, seed=0, tok=None, **overrides):
    torch.manual_seed(seed)
    V = tok.vocab_size if tok is not None else 97
    model = build(preset(family, "debug", vocab_size=V, **overrides)).eval()
    save_model(model, path, tokenizer=tok)
    return model


@torch.no_grad()
def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    return x[0, len(ids) :].tolist()


def padded(cfg, lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, cfg.vocab_size, (len(lengths), T), generator=g)
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])
    return ids, mask


def assert_logits_close(got, ref, mask):
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(got)[real], ref[real], atol=TOL, rtol=0)


def run_full(d, ids, mask):
    s = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def run_with_past(d, ids, mask, split: int, step: int = 1):
    """Prefill ids[:, :split] (empty past), then feed `step` tokens at a time; logits of all positions."""
    s = ort.InferenceSession(str(d / "model_with_past.onnx"), providers=["CPUExecutionProvider"])
    ins = [i.name for i in s.get_inputs()]
    outs = [o.name for o in s.get_outputs()]
    kv = s.get_inputs()[2].shape  # symbolic batch/past, concrete heads and head size
    past = {n: np.zeros((ids.shape[0], kv[1], 0, kv[3]), np.float32) for n in ins[2:]}
    logits, start = [], 0
    for end in [split, *range(split + step, ids.shape[1] + step, step)]:
        end = min(end, ids.shape[1])
        if end <= start:
            continue
        res = s.run(
            outs, {"input_ids": ids[:, start:end].numpy(), "attention_mask": mask[:, :end].numpy(), **past}
        )
        logits.append(res[0])
        past = dict(zip(ins[2:], res[1:]))
        start = end
    return np.concatenate(logits, 1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A llama checkpoint with a trained tokenizer, exported with the cache model through the CLI."""
    d = tmp_path_factory.mktemp("onnx")
    tok = train_tokenizer(TEXT, 300)
    model = make_checkpoint(d / "ckpt", "llama", tok=tok, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    assert (
        main(["export", str(d / "ckpt"), "--format", "onnx", "--with-cache", "--out", str(d / "onnx")]) == 0
    )
    return model, d / "onnx", d / "ckpt"


def test_graph_io_opset_and_manifest(llama):
    model, out, _ = llama
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.onnx", "model_with_past.onnx", "lmforge_onnx.json", "config.json", "generation_config.json",
         "tokenizer.json", "tokenizer_config.json"]
    )  # fmt: skip
    full = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert max(o.version for o in full.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in full.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in full.graph.output] == ["logits"]
    dims = full.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in dims)  # batch and sequence are dynamic
    step = onnx.load(str(out / "model_with_past.onnx"), load_external_data=False)
    L = model.config.n_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert [i.name for i in step.graph.input] == ["input_ids", "attention_mask", *past]
    assert [o.name for o in step.graph.output] == ["logits", *present]

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    cfg = model.config
    assert dims(step.graph.input[1]) == ["batch", "past_sequence + sequence"]
    assert dims(step.graph.input[2]) == ["batch", cfg.n_kv_heads, "past_sequence", cfg.head_dim]
    assert dims(step.graph.output[1]) == ["batch", cfg.n_kv_heads, "past_sequence + sequence", cfg.head_dim]
    meta = json.loads((out / "lmforge_onnx.json").read_text())
    assert meta["files"] == {"model": "model.onnx", "with_past": "model_with_past.onnx"}
    assert all(v <= TOL for v in meta["check"]["max_relative_logit_error"].values())


def test_full_model_logits_match(llama):
    model, out, _ = llama
    cfg = model.config
    for lengths in ([1], [6], [40], [17, 9], [33, 1, 20]):
        ids, mask = padded(cfg, lengths, seed=len(lengths) * 100 + lengths[0])
        with torch.no_grad():
            ref = model(ids, attention_mask=mask)
        assert_logits_close(run_full(out, ids, mask), ref, mask)


def test_cache_model_logits_match(llama):
    model, out, _ = llama
    for lengths, split, step in (([12], 5, 1), ([30, 19], 11, 1), ([25, 8], 1, 4), ([9], 9, 1)):
        ids, mask = padded(model.config, lengths, seed=split)
        with torch.no_grad():
            ref = model(ids, attention_mask=mask)
        assert_logits_close(run_with_past(out, ids, mask, split, step), ref, mask)


def test_runner_greedy_matches_lmforge(llama):
    import lmforge

    model, out, ckpt = llama
    prompt = [3, 17, 42, 5, 99, 7]
    want = torch_greedy(model, prompt, 20)
    assert generate(out, prompt, 20) == want  # cache model
    assert generate(out, prompt, 20, use_cache=False) == want  # full recompute
    lm = lmforge.load(ckpt, device="cpu")
    assert lm.generate(prompt, max_new_tokens=20, temperature=0, ignore_eos=True) == want
    # a left-padded batch gives each row what it gives alone
    rows = [prompt, [11, 12]]
    assert OnnxLM(out).generate(rows, 8) == [want[:8], torch_greedy(model, [11, 12], 8)]
    # stop tokens end a row early (the stop token is kept, as in lmforge's generate)
    assert generate(out, prompt, 20, stop_ids=[want[3]])[-1] == want[3]


# Each family once (export ~10-20 s on 2 cores): what it exports and the parts of the graph that
# differ (learned positions, sliding window, dense MoE, Gemma's scaled embeddings and (1 + w) norms,
# Qwen3's q/k norms, Gemma 2's soft-caps and per-layer windows).
@pytest.mark.parametrize(
    "family, overrides",
    [
        ("gpt2", {}),
        ("mistral", {"sliding_window": 8}),
        ("gemma", {}),
        ("mixtral", {}),
        ("gpt", {}),
        ("qwen3", {}),  # per-head q/k norms
        ("gemma2", {"sliding_window": 8}),  # soft-caps, sliding and full layers, sandwich norms
    ],
)
def test_family_exports_match(tmp_path, family, overrides):
    model = make_checkpoint(tmp_path / "ckpt", family, **overrides)
    out = export(tmp_path / "ckpt", "onnx", tmp_path / "onnx", with_cache=True)
    ids, mask = padded(model.config, [21, 13], seed=7)  # 21 > the window of 8
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    assert_logits_close(run_full(out, ids, mask), ref, mask)
    assert_logits_close(run_with_past(out, ids, mask, split=10, step=3), ref, mask)
    prompt = ids[0].tolist()
    assert generate(out, prompt, 12) == torch_greedy(model, prompt, 12)


def test_a_model_used_for_generation_exports(llama, tmp_path):
    """A model with lmforge's CPU decode kernels installed (as lmforge.load gives it) and used for
    generation exports: the export traces plain modules (PyTorch's attention), matches (export checks
    the logits) and leaves the kernels installed."""
    import lmforge
    from lmforge import kernels
    from lmforge.kernels import rows
    from lmforge.kernels.decode import DecodeAttention
    from lmforge.model import Attention

    lm = lmforge.load(llama[2], device="cpu")
    kernels.install(lm.model)
    lm.generate("hello", max_new_tokens=3, temperature=0)
    kind = DecodeAttention if rows.available() else Attention
    assert all(type(m) is kind for m in lm.model.modules() if isinstance(m, Attention))
    from lmforge.export.onnx import export_onnx

    out = export_onnx(lm, tmp_path / "onnx", with_cache=True)
    ids, mask = padded(lm.config, [12, 7], seed=3)
    with torch.no_grad():
        ref = lm.model(ids, attention_mask=mask)
    assert_logits_close(run_with_past(out, ids, mask, split=4, step=2), ref, mask)
    assert all(type(m) is kind for m in lm.model.modules() if isinstance(m, Attention))


# ---------------------------------------------------------------------------------------------- errors
def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        export(tmp_path / "nope", "onnx", tmp_path / "out")
    make_checkpoint(tmp_path / "ckpt", "llama")
    with pytest.raises(UserError, match="fp32 only"):
        export(tmp_path / "ckpt", "onnx", tmp_path / "out", dtype="q8_0")
    with pytest.raises(UserError, match="opset 17"):
        export(tmp_path / "ckpt", "onnx", tmp_path / "out", opset=13)
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="is a file"):
        export(tmp_path / "ckpt", "onnx", tmp_path / "afile" / "out")
    with pytest.raises(UserError, match="is a file"):
        export(tmp_path / "ckpt", "onnx", tmp_path / "afile")
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ckpt"]


def test_failed_check_or_export_leaves_nothing(tmp_path, monkeypatch):
    import lmforge.export.onnx as m

    make_checkpoint(tmp_path / "ckpt", "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_text("previous export")  # an earlier export: replaceable

    def fake_export(module, args, f, *a, **k):  # stands in for the slow torch.onnx.export
        f.write_bytes(b"not onnx")

    def failing_check(d, model, atol):
        assert (d / "model.onnx").exists()
        raise UserError("ONNX check failed: ...")

    monkeypatch.setattr(m, "_export", fake_export)
    monkeypatch.setattr(m, "check_onnx", failing_check)
    with pytest.raises(UserError, match="check failed"):
        export(tmp_path / "ckpt", "onnx", tmp_path / "out")

    def crash(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(m, "_export", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        export(tmp_path / "ckpt", "onnx", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no temporary left
    assert (tmp_path / "out" / "model.onnx").read_text() == "previous export"  # the previous export is whole


def test_runner_errors(llama):
    _, out, ckpt = llama
    with pytest.raises(UserError, match="not an lmforge ONNX export"):
        generate(ckpt, [1, 2], 3)
    with pytest.raises(UserError, match="context"):
        generate(out, [1, 2], 10_000)


def test_longrope_phi_export_generates_like_lmforge(tmp_path):
    """Phi-4-mini (LongRoPE, partial rotary, fused files; tiny, from its hub config): the export's own
    check passes and the runner, whose prompt of 5 grows past the pretraining length of 8, gives
    lmforge's greedy tokens (both recompute the sequence with the long factors there)."""
    import lmforge
    from lmforge.infer import generate as lm_generate
    from tests.hub_models import save_hub_model

    save_hub_model("phi-4-mini", tmp_path / "hf")
    out = export(tmp_path / "hf", "onnx", tmp_path / "onnx", with_cache=True)
    assert json.loads((out / "lmforge_onnx.json").read_text())["longrope_original"] == 8
    lm = lmforge.load(tmp_path / "hf", device="cpu")
    prompt = [5, 9, 17, 33, 65]
    assert (
        generate(out, prompt, 10)
        == lm_generate(lm.model, lm.tokenizer, [prompt], max_new_tokens=10, temperature=0, ignore_eos=True)[0]
    )
