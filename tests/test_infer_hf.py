"""Greedy generation equals transformers' generate (do_sample=False) for all six families, 64 new tokens,
one prompt and a left-padded batch, on tiny random HF models (the Mistral window is 6 tokens, so the
ring-buffer cache is exercised throughout)."""

import pytest
import torch

import lmforge
from tests.hf_models import FAMILIES, V, hf_model, padded_batch

pytest.importorskip("transformers")
N = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pair(tmp_path, model_type):
    hf = hf_model(model_type)
    hf.save_pretrained(tmp_path / "hf")
    return hf, lmforge.load(tmp_path / "hf", device="cpu")


def _hf_greedy(hf, ids, mask=None):
    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=N,
            min_new_tokens=N,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_equals_transformers_generate(tmp_path, model_type):
    hf, lm = _pair(tmp_path, model_type)
    ids = torch.randint(3, V, (1, 7), generator=torch.Generator().manual_seed(0))
    ours = lm.generate(ids[0].tolist(), max_new_tokens=N, temperature=0, ignore_eos=True)
    assert ours == _hf_greedy(hf, ids)[0]

    # A left-padded batch: HF gets the attention mask (and derives positions from it, openai-gpt too);
    # ours gets the rows as they are and pads them itself.
    ids, mask = padded_batch([13, 5, 9], seed=1)
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    ours = lm.generate(rows, max_new_tokens=N, temperature=0, ignore_eos=True)
    assert ours == _hf_greedy(hf, ids, mask)
