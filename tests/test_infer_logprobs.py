"""Logprobs: generated and prompt tokens' log-softmax equals a naive full forward pass (raw logits)."""

import pytest
import torch

from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams, Sequence, generate
from lmforge.model import build

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]  # one_thread: conftest.py
V = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(preset("llama", "debug", vocab_size=V)).eval()


def _naive(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax (T, V) of a plain forward pass over ids (no cache)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def _check_generated(model, seq, n_top):
    full = seq.prompt_ids + seq.token_ids
    lp = _naive(model, full[:-1])  # position i predicts token i + 1
    P = len(seq.prompt_ids)
    assert len(seq.logprobs) == len(seq.token_ids)
    for i, e in enumerate(seq.logprobs):
        row = lp[P - 1 + i]
        assert e.token_id == seq.token_ids[i]
        assert abs(e.logprob - float(row[e.token_id])) < 1e-4
        vals, ids = row.topk(n_top) if n_top else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in e.top] == ids.tolist()
        assert torch.allclose(torch.tensor([v for _, v in e.top]), vals, atol=1e-4)


def test_batched_rows_mixing_logprobs_and_not(model):
    """One engine batch: sampled rows with temperature, penalties and bias (logprobs stay the raw model's),
    a greedy row, and a row without logprobs; a late request joins the running batch (row path)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 19, 3, 11)]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.7, repetition_penalty=1.3, logprobs=3, seed=1),
        SamplingParams(max_new_tokens=12, temperature=0, logprobs=0, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=2),  # no logprobs
        SamplingParams(
            max_new_tokens=9, temperature=1.2, frequency_penalty=1.0, logit_bias={5: 3.0}, logprobs=5
        ),
    ]
    eng = Engine(model, None, max_batch=5)
    seqs = [Sequence(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    eng.add(seqs)
    eng.step()
    eng.step()
    late = Sequence(prompts[3], params[3])
    eng.add([late])
    while eng.active:
        eng.step()
    _check_generated(model, seqs[0], 3)
    _check_generated(model, seqs[1], 0)
    assert seqs[2].logprobs == [] and seqs[2].prompt_logprobs == []
    _check_generated(model, late, 5)


@pytest.mark.parametrize("busy", [False, True])
def test_prompt_logprobs_equal_naive_forward(model, busy):
    prompt = torch.randint(0, V, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    eng = Engine(model, None, max_batch=3)
    if busy:  # joins a running batch
        eng.add([Sequence([1, 2, 3], SamplingParams(max_new_tokens=20, temperature=0))])
        eng.step()
    other = Sequence([9, 8, 7, 6], SamplingParams(max_new_tokens=3, temperature=0, logprobs=1))
    seq = Sequence(prompt, SamplingParams(max_new_tokens=2, temperature=0, prompt_logprobs=4, logprobs=2))
    eng.add([seq, other])
    while eng.active:
        eng.step()
    lp = _naive(model, prompt)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        e, row = seq.prompt_logprobs[j], lp[j - 1]
        assert e.token_id == prompt[j]
        assert abs(e.logprob - float(row[prompt[j]])) < 1e-4
        assert [t for t, _ in e.top] == row.topk(4).indices.tolist()
    _check_generated(model, seq, 2)
    _check_generated(model, other, 1)
    assert other.prompt_logprobs == []


def test_generate_details_carry_logprobs(model):
    c = generate(
        model,
        None,
        [4, 5, 6, 7],
        max_new_tokens=4,
        temperature=0,
        logprobs=1,
        prompt_logprobs=0,
        details=True,
    )
    assert len(c.logprobs) == 4 and len(c.prompt_logprobs) == 4 and c.prompt_logprobs[0] is None
    lp = _naive(model, [4, 5, 6, 7] + c.token_ids[:-1])
    assert abs(c.logprobs[0].logprob - float(lp[3, c.token_ids[0]])) < 1e-4
    assert abs(c.prompt_logprobs[2].logprob - float(lp[1, 6])) < 1e-4


def test_draft_model_refuses_what_only_the_engine_does(model):
    from lmforge.utils import UserError

    for kw in ({"logprobs": 1}, {"prompt_logprobs": 0}, {"frequency_penalty": 0.5}):
        with pytest.raises(UserError, match="draft"):
            generate(model, None, [1, 2, 3], max_new_tokens=3, temperature=0, draft=model, **kw)
    biased = generate(
        model, None, [1, 2, 3], max_new_tokens=3, temperature=0, draft=model, logit_bias={9: 100}
    )
    assert biased == [9, 9, 9]  # the bias applies to both models: greedy takes the forced token
