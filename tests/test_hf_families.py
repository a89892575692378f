"""Every family against transformers, on tiny models built from the REAL hub config.json of the models
people use (tests/hub_models.py names each repo; only sizes are shrunk): fp32 logits within 1e-4 (one row
and a left-padded batch), 32 greedy tokens equal to `generate` (one row and a batch of 3), lmforge's save
loaded by AutoModelForCausalLM, bf16 and sharded safetensors. Gemma 2's soft-caps and sliding layers see
prompts longer than their window; Phi-3's LongRoPE sees positions past original_max_position_embeddings."""

import copy
import json

import pytest
import torch

import lmforge
from lmforge.checkpoint import save_model
from tests.hub_models import NEW_FAMILY_MODELS, OLD_FAMILY_MODELS, VOCAB, WINDOW, hub_model, shrunk

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)
TOL = 1e-4
MODELS = OLD_FAMILY_MODELS + NEW_FAMILY_MODELS
_cache: dict = {}


def pair(name, tmp_path_factory):
    """(HF model, its directory, lmforge's model loaded from it), built once per test session."""
    if name not in _cache:
        hf = hub_model(name)
        path = tmp_path_factory.mktemp(name.replace(".", "_")) / "hf"
        hf.save_pretrained(path)
        _cache[name] = hf, path, lmforge.load(path, device="cpu").model.eval()
    return _cache[name]


def ids_for(T, B=1, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, seed=0):
    ids = ids_for(max(lengths), len(lengths), seed)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, ids.shape[1] - n :] = 1
        ids[i, : ids.shape[1] - n] = 0
    return ids, mask


@pytest.mark.parametrize("name", MODELS)
def test_logits_match(name, tmp_path_factory):
    hf, _, ours = pair(name, tmp_path_factory)
    for T in (5, 3 * WINDOW - 1):  # longer than every sliding window, and past Phi's pretraining length
        ids = ids_for(T, 2, seed=T)
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=0)
    ids, mask = left_padded([19, 6, 11])
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # what HF generate derives from the mask
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=TOL, rtol=0)


def greedy(model, ids, n, mask=None):
    """lmforge greedy decoding on its KV cache: one prefill, then one token per step."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    out = []
    with torch.no_grad():
        logits = model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = model(nxt, cache=cache)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_matches_generate(name, tmp_path_factory):
    hf, _, ours = pair(name, tmp_path_factory)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = ids_for(5, seed=2)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)[:, 5:]
    assert greedy(ours, ids, 32).tolist() == ref.tolist()
    ids, mask = left_padded([7, 3, 12], seed=3)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
    assert greedy(ours, ids, 32, mask).tolist() == ref.tolist()


@pytest.mark.parametrize("name", MODELS)
def test_saved_by_lmforge_loads_in_transformers(name, tmp_path_factory, tmp_path):
    hf, path, ours = pair(name, tmp_path_factory)
    save_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", attn_implementation="eager"
    ).eval()
    ids = ids_for(3 * WINDOW - 1, 2, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=TOL, rtol=0)
    # every field of the hub config.json lmforge does not use is written back unchanged
    before = json.loads((path / "config.json").read_text())
    after = json.loads((tmp_path / "ours" / "config.json").read_text())
    src = shrunk(name)
    for k, v in src.items():
        if k not in ("torch_dtype", "transformers_version") and k in before and k in after:
            if before[k] == v:  # a field transformers itself kept as the hub wrote it
                assert after[k] == v, (k, after[k], v)


@pytest.mark.parametrize("name", ["qwen3-0.6b", "gemma-2-2b", "phi-4-mini", "olmo-2-1b", "gpt2"])
def test_bf16_and_sharded_safetensors_load(name, tmp_path_factory, tmp_path):
    hf, _, _ = pair(name, tmp_path_factory)
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours = lmforge.load(tmp_path / "bf16", device="cpu", dtype=torch.float32).model
    ids = ids_for(13, 2, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=TOL, rtol=0)


def test_hub_gpt2_tensor_names_load(tmp_path_factory, tmp_path):
    """The hub's GPT-2 file names tensors without `transformer.` (wte.weight, h.0.attn.c_attn.weight)."""
    from safetensors.torch import load_file, save_file

    hf, path, ours = pair("gpt2", tmp_path_factory)
    sd = load_file(path / "model.safetensors")
    hub = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    assert "wte.weight" in hub and "h.0.attn.c_attn.weight" in hub
    (tmp_path / "hub").mkdir()
    save_file(hub, str(tmp_path / "hub" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "hub" / "config.json").write_text((path / "config.json").read_text())
    loaded = lmforge.load(tmp_path / "hub", device="cpu").model
    ids = ids_for(9, 2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), hf(ids).logits, atol=TOL, rtol=0)
    save_model(loaded, tmp_path / "ours")  # and lmforge's own save still has the prefix transformers writes
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=TOL, rtol=0)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (cfg["attn_pdrop"], cfg["embd_pdrop"], cfg["resid_pdrop"]) == (0.1, 0.1, 0.1)


def test_config_eos_lists_and_legacy_gemma_gelu(tmp_path_factory, tmp_path):
    from lmforge.hf import config_from_hf, config_to_hf

    cfg = config_from_hf(shrunk("llama-3.2-1b"))
    assert cfg.eos_token_id == shrunk("llama-3.2-1b")["eos_token_id"][0]
    assert config_to_hf(cfg)["eos_token_id"] == shrunk("llama-3.2-1b")["eos_token_id"]
    assert config_from_hf(shrunk("gemma-2b")).act == "gelu_tanh"  # hidden_act "gelu" means tanh for Gemma
    _, _, ours = pair("gemma-3-1b", tmp_path_factory)
    save_model(ours, tmp_path / "g3")
    assert json.loads((tmp_path / "g3" / "config.json").read_text())["eos_token_id"] == [1, 106]
    assert json.loads((tmp_path / "g3" / "generation_config.json").read_text())["eos_token_id"] == [1, 106]


def test_family_switches(tmp_path_factory):
    """The configs land on the switches the families are known for (what the parity tests exercise)."""
    from lmforge.hf import config_from_hf

    g2 = config_from_hf(shrunk("gemma-2-2b"))
    assert (g2.attn_softcap, g2.final_softcap, g2.sublayer_norm) == (50.0, 30.0, True)
    assert g2.layer_types == ["sliding_attention", "full_attention"] and g2.sliding_window == WINDOW
    g3 = config_from_hf(shrunk("gemma-3-1b"))
    assert g3.layer_types == ["sliding_attention"] * 5 + ["full_attention"] and g3.rope_local_theta == 1e4
    assert (
        config_from_hf(shrunk("qwen2.5-0.5b")).qkv_bias
        and config_from_hf(shrunk("qwen3-0.6b")).qk_norm == "head"
    )
    phi = config_from_hf(shrunk("phi-4-mini"))
    assert phi.partial_rotary_factor == 0.75 and phi.rope_scaling["rope_type"] == "longrope"
    assert phi.rope_scaling["original_max_position_embeddings"] < 3 * WINDOW - 1  # the tests pass it
    olmo = config_from_hf(shrunk("olmo-2-1b"))
    assert (olmo.pre_norm, olmo.sublayer_norm, olmo.qk_norm) == (False, True, "full")


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-1b", "phi-4-mini", "qwen3-0.6b", "olmo-2-1b"])
def test_engine_batched_decode_matches_generate(name, tmp_path_factory):
    """lmforge.generate (the engine: rows batched on one cache, CPU decode kernels where they apply,
    PyTorch attention for Gemma 2's soft-capped layers) gives transformers' greedy tokens."""
    from lmforge.infer import generate

    hf, path, _ = pair(name, tmp_path_factory)
    lm = lmforge.load(path, device="cpu")
    # prompts past Phi's pretraining length (8 here), so no row switches RoPE factors mid-way
    prompts = [ids_for(n, seed=10 + n)[0].tolist() for n in (12, 9, 15)]
    got = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        assert g == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("name", ["gemma-2-2b", "olmo-2-1b", "phi-4-mini"])
def test_inspect_attention_maps_match_transformers(name, tmp_path_factory):
    """`lmforge inspect`'s re-derived attention probabilities (q/k norms, soft-caps, per-layer windows,
    partial RoPE) are transformers' own."""
    from lmforge.evaluate.inspect import attention_probs

    hf, _, ours = pair(name, tmp_path_factory)
    ids = ids_for(2 * WINDOW + 3, seed=7)
    with torch.no_grad():
        ref = hf(ids, output_attentions=True).attentions
    _, probs = attention_probs(ours, ids)
    for a, b in zip(probs, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_info_lists_every_family_and_a_checkpoints_switches(tmp_path_factory, capsys):
    from lmforge.cli import main
    from lmforge.config import FAMILIES

    main(["info"])
    out = capsys.readouterr().out
    assert all(f"{f} [" in out for f in FAMILIES) and "attention soft-cap 50" in out
    _, path, _ = pair("gemma-3-1b", tmp_path_factory)
    main(["info", str(path)])
    out = capsys.readouterr().out
    assert "gemma3 (HF model_type gemma3_text)" in out and "sliding window 8 on 5 of 6 layers" in out


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("qwen2.5-0.5b", dict(use_sliding_window=True, max_window_layers=1)),  # layer 1 slides, layer 0 not
        (
            "qwen3-0.6b",
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        ),
        (
            "gemma-3-1b",
            dict(rope_scaling={"rope_type": "linear", "factor": 8.0}),
        ),  # Gemma 3 4B+: full layers only
        ("gemma-2-2b", dict(query_pre_attn_scalar=24, attn_logit_softcapping=2.0)),  # caps that bite
    ],
)
def test_config_variants_match(name, overrides, tmp_path):
    hf = hub_model(name, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    ours = lmforge.load(tmp_path / "hf", device="cpu").model
    ids = ids_for(3 * WINDOW - 1, 2, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=0)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids, mask = left_padded([11, 4], seed=9)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
    assert greedy(ours, ids, 16, mask).tolist() == ref.tolist()
