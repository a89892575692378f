"""Fine-tuning: assistant-only loss on chat data, frozen embeddings, LoRA (train, merge, load)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_data import base_model, cli_env, losses, make_config

from lmforge.checkpoint import load_model
from lmforge.train import load_lora_model, merge_lora, train
from lmforge.train.lora import LoRALinear, apply_lora, lora_state_dict


def _sft(corpus, tmp_path, name, base, **over):  # noqa: F811
    cfg = make_config(
        corpus,
        tmp_path,
        name,
        **{
            "task": "sft",
            "model.init_from": str(base),
            "data.path": str(corpus["chat"]),
            "ckpt.every": 0,
            **over,
        },
    )
    cfg.model.overrides.pop("max_seq_len")  # the shape comes from the base checkpoint
    cfg.data.tokenizer = None  # and so does the tokenizer
    return cfg


def _mean(xs):
    return sum(xs) / len(xs)


def test_frozen_embeddings_stay_bit_identical_and_loss_drops(corpus, tmp_path, one_thread):  # noqa: F811
    base = base_model(corpus, tmp_path / "base")
    s = train(
        _sft(
            corpus,
            tmp_path,
            "frozen",
            base,
            **{"train.freeze_embeddings": True, "train.max_steps": 30, "train.lr": 1e-2, "eval.every": 30},
        )
    )
    before, after = load_model(base), load_model(tmp_path / "frozen/final")
    assert torch.equal(before.tok_emb.weight, after.tok_emb.weight)
    assert not torch.equal(before.blocks[0].attn.wqkv.weight, after.blocks[0].attn.wqkv.weight)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)  # untied: trained
    ls = [v for _, v in losses(tmp_path / "frozen")]
    assert _mean(ls[-5:]) < _mean(ls[:5]) - 0.5
    assert s["val_loss"] is not None and s["val_loss"] < ls[0]
    assert (tmp_path / "frozen/final/tokenizer.json").exists()


def test_tied_embeddings_frozen_freeze_the_output_layer_too(corpus, tmp_path, one_thread):  # noqa: F811
    base = base_model(corpus, tmp_path / "gemma", family="gemma")
    train(_sft(corpus, tmp_path, "tied", base, **{"train.freeze_embeddings": True, "train.max_steps": 3}))
    before, after = load_model(base), load_model(tmp_path / "tied/final")
    assert torch.equal(before.tok_emb.weight, after.tok_emb.weight)
    assert after.lm_head.weight is after.tok_emb.weight


def test_lora_trains_only_adapters_and_merges_exactly(corpus, tmp_path, one_thread):  # noqa: F811
    base = base_model(corpus, tmp_path / "base")
    s = train(
        _sft(
            corpus,
            tmp_path,
            "lora",
            base,
            **{"lora.rank": 8, "lora.targets": ["all"], "train.lr": 1e-2, "train.max_steps": 20},
        )
    )
    assert "LoRA rank 8" in s["model"]
    ls = [v for _, v in losses(tmp_path / "lora")]
    assert _mean(ls[-5:]) < _mean(ls[:5])
    final = tmp_path / "lora/final"
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = json.loads((final / "adapter_config.json").read_text())  # the PEFT format (test_lora_peft.py)
    assert (
        cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(base.resolve())
    )
    unmerged = load_lora_model(final)
    assert sum(isinstance(m, LoRALinear) for m in unmerged.modules()) == 4 * unmerged.config.n_layers
    assert any(float(p.abs().max()) > 0 for n, p in lora_state_dict(unmerged).items() if "lora_B" in n)
    ids = torch.randint(0, unmerged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = unmerged(ids)
        merged = load_lora_model(final, merge=True)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=0)
        # the base weights themselves were never touched
        plain = load_model(base)
        for n, p in plain.named_parameters():
            torch.testing.assert_close(dict(unmerged.named_parameters())[n], p, atol=0, rtol=0)

    # `lmforge merge-lora` writes a plain HF directory that loads anywhere
    out = tmp_path / "merged"
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "merge-lora", str(final), "--out", str(out)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), want, atol=1e-5, rtol=0)


def test_merged_lora_matches_transformers(corpus, tmp_path):  # noqa: F811
    """A merged adapter is an ordinary checkpoint: transformers computes the same logits."""
    transformers = pytest.importorskip("transformers")
    base = base_model(corpus, tmp_path / "base")
    model = load_model(base)
    apply_lora(model, rank=4, alpha=8, targets=["wqkv", "w_in"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        from lmforge.checkpoint import save_model

        save_model(merge_lora(model), tmp_path / "m")
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-4, rtol=0)


def test_lora_rejects_unknown_targets(corpus, tmp_path):  # noqa: F811
    from lmforge.utils import UserError

    model = load_model(base_model(corpus, tmp_path / "base"))
    with pytest.raises(UserError, match="choose among wqkv, wo, w_in, w_out"):
        apply_lora(model, rank=4, targets=["q_proj"])


@pytest.mark.parametrize("bias,dropout", [(True, 0.0), (False, 0.3)])
def test_lora_layer_gradients_equal_autograd_of_the_formula(bias, dropout):
    """LoRALinear trains through one fused autograd node (_LoRAMatmul): its output and gradients equal
    autograd's over y = x W^T + b + s dropout(x) A^T B^T (same dropout mask), in float64."""
    base = torch.nn.Linear(7, 5, bias=bias).double()
    m = LoRALinear(base, rank=3, alpha=6.0, dropout=dropout).double()
    with torch.no_grad():
        m.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = m(x)
    assert type(y.grad_fn).__name__ == "_LoRAMatmulBackward"
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), (x, m.lora_A, m.lora_B))
    torch.manual_seed(1)
    xd = m.lora_dropout(x)
    ref = torch.nn.functional.linear(x, m.weight, m.bias) + (xd @ m.lora_A.t()) @ m.lora_B.t() * m.scale
    want = torch.autograd.grad((ref * g).sum(), (x, m.lora_A, m.lora_B))
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert m.weight.grad is None  # the base stays frozen


def test_lora_base_kept_in_bf16_trains_bit_identically_under_autocast():
    """freeze_base_dtype (what a bf16 LoRA run does): the frozen weights cast once to bf16 give the same
    loss and adapter gradients, bit for bit, as autocast casting the fp32 base at every use; outside
    autocast the model still runs, in fp32 over the bf16-rounded base."""
    from lmforge.config import preset
    from lmforge.model import build
    from lmforge.train.lora import freeze_base_dtype

    def adapted():
        torch.manual_seed(0)
        m = build(preset("llama", "debug", tie_embeddings=False))
        m.init_weights(0)
        apply_lora(m, rank=4, alpha=8.0, targets=["all"])
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
        return m

    ref, fast = adapted(), adapted()
    n_layers = fast.config.n_layers
    assert freeze_base_dtype(fast, torch.bfloat16) == 4 * n_layers  # wqkv, wo, w_in, w_out per block
    assert fast.blocks[0].attn.wqkv.weight.dtype == torch.bfloat16
    assert (
        fast.blocks[0].attn.wqkv.lora_A.dtype == torch.float32 and fast.tok_emb.weight.dtype == torch.float32
    )
    x = torch.randint(0, fast.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    out = []
    for m in (ref, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x[:, :-1], x[:, 1:])
        grads = torch.autograd.grad(loss, [p for n, p in m.named_parameters() if p.requires_grad])
        out.append((loss, grads))
    assert torch.equal(out[0][0], out[1][0])
    assert len(out[1][1]) == 2 * 4 * n_layers and all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    # outside autocast: fp32 compute over the rounded base, as the fp32 model with those weights
    rounded = adapted()
    with torch.no_grad():
        for mod in rounded.modules():
            if isinstance(mod, LoRALinear):
                mod.weight.copy_(mod.weight.to(torch.bfloat16).float())
        torch.testing.assert_close(fast(x), rounded(x), atol=1e-5, rtol=0)
