"""ModelConfig: validation errors, presets, derived numbers, HF config mapping."""

import pytest
import torch

from lmforge.config import FAMILIES, SIZES, ModelConfig, preset
from lmforge.hf import config_from_hf, config_to_hf
from lmforge.model import build


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(d_model=100, n_heads=3), "d_model"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=60, n_heads=4, n_kv_heads=4), "head_dim"),  # head size 15 with RoPE
        (dict(n_experts=4, n_experts_per_tok=5), "n_experts_per_tok"),
        (dict(n_experts=4, n_experts_per_tok=0), "n_experts_per_tok"),
        (dict(family="bert"), "family"),
        (dict(act="tanh"), "act"),
        (dict(norm="batchnorm"), "norm"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(dropout=1.0), "dropout"),
        (dict(eos_token_id=40000), "eos_token_id"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "rope_scaling"),
    ],
)
def test_validation_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{"d_model": 64, "n_heads": 4, **kwargs})


def test_odd_head_size_is_fine_without_rope():
    ModelConfig(family="gpt2", pos_emb="learned", d_model=60, n_heads=4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_parameter_count_matches_the_built_model(family):
    for size in SIZES:
        cfg = preset(family, size)
        assert build(cfg, meta=True).num_params() == cfg.n_params(), size
    assert preset(family, "debug").n_params() < 1_000_000


def test_preset_sizes_span_debug_to_about_1b():
    assert preset("llama", "1b").n_params() == pytest.approx(1e9, rel=0.25)
    assert preset("llama", "125m").n_params() == pytest.approx(125e6, rel=0.1)
    smol = preset(size="smollm-135m")
    assert smol.n_params() == 134_515_008  # SmolLM-135M's published count


def test_kv_cache_bytes_and_flops_by_hand():
    cfg = preset("llama", "debug")  # 2 layers, 2 kv heads of 16
    assert cfg.kv_cache_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2
    n = (
        cfg.n_params(embeddings=False) - cfg.d_model + cfg.vocab_size * cfg.d_model
    )  # blocks + output projection
    assert cfg.flops_per_token(128, training=False) == 2 * n + 2 * 2 * 64 * 128
    assert cfg.flops_per_token(128) == 3 * cfg.flops_per_token(128, training=False)
    moe = preset("mixtral", "debug")
    assert moe.n_active_params() < moe.n_params(embeddings=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_config_round_trip(family):
    for size in ("debug", "125m"):
        cfg = preset(family, size, bos_token_id=1, eos_token_id=2)
        back = config_from_hf(config_to_hf(cfg))
        assert back == cfg


def test_hf_config_is_accepted_by_transformers():
    transformers = pytest.importorskip("transformers")
    for family in FAMILIES:
        d = config_to_hf(preset(family, "debug"))
        hf = transformers.AutoConfig.for_model(**d)
        assert hf.model_type == d["model_type"]


def test_unsupported_hf_options_are_errors():
    base = config_to_hf(preset("llama", "debug"))
    with pytest.raises(ValueError, match="dynamic"):
        config_from_hf(
            {**base, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_parameters": None}
        )
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**base, "model_type": "qwen2_moe"})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**base, "hidden_act": "mish"})
    with pytest.raises(ValueError, match="inverse_layer_idx"):
        config_from_hf({**config_to_hf(preset("gpt2", "debug")), "scale_attn_by_inverse_layer_idx": True})


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 16,
            "mscale": 1.0,
        },
    ],
)
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    transformers = pytest.importorskip("transformers")
    import lmforge

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        rope_parameters={**scaling, "rope_theta": 10000.0},
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    lm = lmforge.load(tmp_path, device="cpu")
    assert lm.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(0, 50, (1, 60))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), hf(ids).logits, atol=1e-4, rtol=0)
