"""Tiny random Hugging Face models of the six families, built locally (no downloads)."""

from __future__ import annotations

import torch

V = 97  # vocabulary of the tiny models (odd on purpose: no accidental power-of-two alignment)
FAMILIES = ["openai-gpt", "gpt2", "llama", "mistral", "mixtral", "gemma"]


def hf_model(
    model_type: str, *, tied: bool | None = None, gqa: bool = True, window: int | None = 6, seed: int = 0
):
    """A tiny random HF causal LM of `model_type` in eval mode (fp32)."""
    import transformers as T

    torch.manual_seed(seed)
    kv = 2 if gqa else 4
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "openai-gpt":
        cfg, cls = (
            T.OpenAIGPTConfig(vocab_size=V, n_positions=128, n_embd=32, n_layer=2, n_head=4),
            T.OpenAIGPTLMHeadModel,
        )
    elif model_type == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=V,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True if tied is None else tied,
        )
        cls = T.GPT2LMHeadModel
    elif model_type == "llama":
        cfg = T.LlamaConfig(**common, tie_word_embeddings=bool(tied), rope_theta=500.0)
        cls = T.LlamaForCausalLM
    elif model_type == "mistral":
        cfg, cls = (
            T.MistralConfig(**common, sliding_window=window, tie_word_embeddings=bool(tied)),
            T.MistralForCausalLM,
        )
    elif model_type == "mixtral":
        cfg = T.MixtralConfig(
            **common,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            tie_word_embeddings=bool(tied),
        )
        cls = T.MixtralForCausalLM
    elif model_type == "gemma":
        cfg = T.GemmaConfig(
            **{**common, "num_key_value_heads": 1 if gqa else 4},
            head_dim=16,
            tie_word_embeddings=True if tied is None else tied,
        )
        cls = T.GemmaForCausalLM
    else:
        raise ValueError(model_type)
    model = cls(cfg).eval()
    # HF initialises norms to 1 (0 for Gemma) and biases to 0: randomise them so the tests see every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def padded_batch(lengths: list[int], seed: int = 0):
    """Left-padded random ids (B, T) and attention mask for rows of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1
        ids[i, : T - n] = 0
    return ids, mask
