"""Parity with transformers, both directions, for all six families (fp32, 1e-4)."""

import pytest
import torch

import lmforge
from lmforge.checkpoint import save_model
from tests.hf_models import FAMILIES, V, hf_model, padded_batch

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _load_pair(tmp_path, model_type, **kw):
    hf = hf_model(model_type, **kw)
    hf.save_pretrained(tmp_path / "hf")
    return hf, lmforge.load(tmp_path / "hf", device="cpu").model


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logits_match_transformers(tmp_path, model_type):
    hf, ours = _load_pair(tmp_path, model_type)
    for T in (1, 7, 23):  # 23 > the Mistral window of 6
        ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            ref, got = hf(ids).logits, ours(ids)
        torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_left_padded_batch_matches_transformers_and_single_rows(tmp_path, model_type):
    hf, ours = _load_pair(tmp_path, model_type)
    ids, mask = padded_batch([13, 5, 9])
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # what HF generate derives from the mask
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=TOL, rtol=0)
    for i in range(3):  # each row alone, unpadded, gives the same logits as in the batch
        row = ids[i][real[i]][None]
        with torch.no_grad():
            alone = ours(row)[0]
        torch.testing.assert_close(got[i][real[i]], alone, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "model_type,kw",
    [
        ("llama", dict(gqa=False)),
        ("llama", dict(tied=True)),
        ("gpt2", dict(tied=False)),
        ("gemma", dict(tied=False)),
        ("gemma", dict(gqa=False)),
        ("mistral", dict(window=3)),
        ("mistral", dict(window=None)),
    ],
)
def test_variants_match_transformers(tmp_path, model_type, kw):
    hf, ours = _load_pair(tmp_path, model_type, **kw)
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=0)


def _greedy_with_cache(model, ids, n):
    """Greedy decoding on the static KV cache: prefill once, then one token per step."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    out = []
    with torch.no_grad():
        logits = model(ids, cache=cache, logits_to_keep=1)
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = model(nxt, cache=cache)
    return torch.cat(out, 1)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generation_matches_transformers(tmp_path, model_type):
    hf, ours = _load_pair(tmp_path, model_type)
    ids = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(
            ids, max_new_tokens=32, do_sample=False, min_new_tokens=32, eos_token_id=None, pad_token_id=0
        )[:, 5:]
    got = _greedy_with_cache(ours, ids, 32)
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_saved_by_lmforge_loads_in_transformers(tmp_path, model_type):
    _, ours = _load_pair(tmp_path, model_type)
    save_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt", "gpt2", "llama", "mistral", "mixtral", "gemma"])
def test_lmforge_native_model_loads_in_transformers(tmp_path, family):
    """A model born in lmforge (our init, our presets) round-trips through transformers."""
    from lmforge.config import preset
    from lmforge.model import build

    torch.manual_seed(0)
    ours = build(preset(family, "debug", vocab_size=101, max_seq_len=64)).eval()
    save_model(ours, tmp_path / "m")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=TOL, rtol=0)
