"""Sampling: processors equal transformers' logits processors, filters never leak, seeds reproduce."""

import math
import re

import pytest
import torch

from lmforge.infer.sampling import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    Sampler,
    SamplingParams,
    min_p_filter,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from lmforge.utils import UserError

T = pytest.importorskip("transformers")
B, V = 6, 300


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _logits(seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


def _full(x, dtype=torch.float32):
    return torch.full((B,), x, dtype=dtype)


@pytest.mark.parametrize("k", [1, 7, 50, V])
def test_top_k_equals_transformers(k):
    x = _logits(k)
    ref = T.TopKLogitsWarper(top_k=k)(None, x.clone())
    assert torch.equal(top_k_filter(x, _full(k, torch.long)), ref)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_equals_transformers(p):
    x = _logits(int(p * 1000))
    ref = T.TopPLogitsWarper(top_p=p)(None, x.clone())
    assert torch.equal(top_p_filter(x, _full(p)), ref)


@pytest.mark.parametrize("p", [0.01, 0.2, 0.9])
def test_min_p_equals_transformers(p):
    x = _logits(int(p * 100))
    ref = T.MinPLogitsWarper(min_p=p)(None, x.clone())
    assert torch.equal(min_p_filter(x, _full(p)), ref)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    x = _logits(3)
    ids = torch.randint(0, V, (B, 40), generator=torch.Generator().manual_seed(4))  # prompt + output so far
    ref = T.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone())
    seen = torch.zeros(B, V, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(repetition_penalty(x, seen, _full(penalty)), ref, atol=0, rtol=0)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature_equals_transformers(t):
    x = _logits(5)
    s = Sampler(B, V, "cpu")
    for i in range(B):
        s.set_row(i, SamplingParams(temperature=t))
    torch.testing.assert_close(s.process(x), T.TemperatureLogitsWarper(t)(None, x.clone()), atol=0, rtol=0)


def test_processor_chain_equals_transformers_per_row():
    """Rows with different settings in one batch give what HF's chain (in generate's order) gives per row."""
    settings = [
        dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
        dict(temperature=1.3, top_p=0.5),
        dict(temperature=1.0, top_k=3),
        dict(temperature=0.5, min_p=0.3, repetition_penalty=0.8),
        dict(temperature=1.0),
        dict(temperature=2.0, top_k=100, top_p=0.95),
    ]
    x = _logits(6)
    ids = torch.randint(0, V, (B, 25), generator=torch.Generator().manual_seed(7))
    s = Sampler(B, V, "cpu")
    for i, kw in enumerate(settings):
        s.set_row(i, SamplingParams(**kw), prompt_ids=ids[i].tolist())
    got = s.process(x)
    for i, kw in enumerate(settings):
        chain = T.LogitsProcessorList()
        if kw.get("repetition_penalty", 1.0) != 1.0:
            chain.append(T.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
        chain.append(T.TemperatureLogitsWarper(kw["temperature"]))
        if kw.get("top_k"):
            chain.append(T.TopKLogitsWarper(kw["top_k"]))
        if kw.get("top_p", 1.0) < 1.0:
            chain.append(T.TopPLogitsWarper(kw["top_p"]))
        if kw.get("min_p"):
            chain.append(T.MinPLogitsWarper(kw["min_p"]))
        ref = chain(ids[i : i + 1], x[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], ref, atol=1e-6, rtol=1e-6)


def _draw_many(params: SamplingParams, logits_row: torch.Tensor, n=4000, seed=0) -> torch.Tensor:
    """n samples of one crafted distribution: n copies of one row's logits, one generator."""
    s = Sampler(1, logits_row.numel(), "cpu")
    s.set_row(0, params, generator=torch.Generator().manual_seed(seed))
    return s(logits_row.expand(n, -1).clone(), rows=[0] * n)


# A crafted distribution over 10 tokens: probabilities 0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.007, 0.003
PROBS = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.05, 0.04, 0.03, 0.02, 0.007, 0.003])
LOGITS = PROBS.log()[torch.tensor([3, 0, 7, 1, 9, 2, 8, 4, 6, 5])]  # shuffled so position != rank
RANK = {int(t): r for r, t in enumerate(LOGITS.argsort(descending=True))}  # token -> rank (0 = most likely)


@pytest.mark.parametrize(
    "kw,allowed_ranks",
    [
        (dict(top_k=3), {0, 1, 2}),
        (dict(top_p=0.7), {0, 1, 2}),  # 0.4 + 0.2 < 0.7: the token that crosses (0.15) is kept
        (dict(top_p=0.55), {0, 1}),
        (dict(min_p=0.2), {0, 1, 2, 3}),  # p >= 0.2 * 0.4 = 0.08
        (dict(top_k=5, min_p=0.3), {0, 1, 2}),
        (dict(top_p=0.01), {0}),
    ],
)
def test_filters_never_emit_a_token_outside_the_allowed_set(kw, allowed_ranks):
    toks = _draw_many(SamplingParams(temperature=1.0, **kw), LOGITS)
    ranks = {RANK[int(t)] for t in toks.unique()}
    assert ranks <= allowed_ranks
    assert ranks == allowed_ranks  # and every allowed token shows up in 4000 draws


def test_sampling_frequencies_follow_the_temperature_scaled_distribution():
    t = 0.7
    toks = _draw_many(SamplingParams(temperature=t), LOGITS, n=20000)
    freq = torch.bincount(toks, minlength=10).float() / toks.numel()
    expected = (LOGITS / t).softmax(-1)
    assert (freq - expected).abs().max() < 0.015  # ~3 standard errors at n = 20000


def test_greedy_is_argmax_and_mixed_batches_keep_each_rows_mode():
    x = _logits(8)
    s = Sampler(B, V, "cpu")
    for i in range(B):
        s.set_row(
            i,
            SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5),
            generator=torch.Generator().manual_seed(i),
        )
    tok = s(x)
    assert tok[0::2].tolist() == x[0::2].argmax(-1).tolist()


def test_seed_reproduces_and_different_seeds_differ():
    def draw(seed):
        s = Sampler(B, V, "cpu")
        for i in range(B):
            s.set_row(i, SamplingParams(seed=seed, top_k=100))
        return [s(_logits(9)).tolist() for _ in range(5)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(temperature=100.5), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(repetition_penalty=0.005), "repetition_penalty"),
        (dict(repetition_penalty=1e4), "repetition_penalty"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_invalid_values_are_user_errors_naming_the_parameter(kw, name):
    with pytest.raises(UserError, match=name):
        SamplingParams(**kw)


# The bounds the sampler and the server's schema share: (field, lowest, highest).
BOUNDS = [
    ("temperature", 0.0, MAX_TEMPERATURE),
    ("repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
]


@pytest.mark.parametrize("name,lo,hi", BOUNDS)
def test_bounds_are_inclusive_and_the_error_gives_the_range(name, lo, hi):
    for ok in (lo, hi):
        SamplingParams(**{name: ok})
    for bad in (hi * 1.01, lo - 0.01, 1e30):
        with pytest.raises(UserError, match="^" + re.escape(f"{name}={bad!r}: must be in [{lo:g}, {hi:g}]")):
            SamplingParams(**{name: bad})


@pytest.mark.parametrize("name,lo,hi", BOUNDS)
def test_server_schema_takes_the_same_bounds(name, lo, hi):
    from pydantic import ValidationError

    from lmforge.serve.schema import ChatCompletionRequest, CompletionRequest

    for ok in (lo, hi):
        CompletionRequest(prompt="x", **{name: ok})
    for bad in (hi * 1.01, lo - 0.01):
        with pytest.raises(ValidationError, match=name):
            ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **{name: bad})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "x", "--temperature", "1000"], "temperature=1000.0: must be in [0, 100]"),
        (["chat", "--repetition-penalty", "0.001"], "repetition_penalty=0.001: must be in [0.01, 100]"),
    ],
)
def test_cli_refuses_out_of_range_sampling_before_loading(argv, message, tmp_path, capsys):
    from lmforge.cli import main

    # the checkpoint does not exist: the sampling error comes first, without loading a model
    assert main([argv[0], str(tmp_path / "no-such-checkpoint"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-checkpoint" not in err, err


# ------------------------------------------------------------------ presence / frequency penalties, bias
def test_presence_frequency_and_bias_equal_hand_computation():
    """OpenAI's formula over the generated tokens only (the prompt does not count), bias added, per row."""
    s = Sampler(3, V, "cpu")
    s.set_row(0, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[7, 7, 7])
    s.set_row(1, SamplingParams(logit_bias={"3": -100, 4: 2.5}))
    s.set_row(2, SamplingParams())  # untouched
    for toks in ([3, 4, 5], [3, 9, 5], [8, 9, 5]):
        s.observe(torch.tensor(toks))
    x = _logits()[:3]
    out = s.process(x)
    want0 = x[0].clone()
    for t, n in {3: 2, 8: 1}.items():  # row 0 generated 3 twice and 8 once; 7 is only in the prompt
        want0[t] -= n * 0.25 + 0.5
    want1 = x[1].clone()
    want1[3] -= 100
    want1[4] += 2.5
    assert torch.allclose(out[0], want0) and torch.allclose(out[1], want1) and torch.equal(out[2], x[2])
    s.set_row(0, SamplingParams(frequency_penalty=1.0))  # a new request: counts start over
    assert torch.equal(s.process(x)[0], x[0])


def test_penalised_greedy_generation_equals_hand_loop():
    """Greedy decoding with frequency/presence penalties: each token is argmax(raw - penalties) of a
    naive forward pass (both rows of the batch), and the penalty changes the output."""
    from lmforge.config import preset
    from lmforge.infer import generate
    from lmforge.model import build

    torch.manual_seed(0)
    model = build(preset("llama", "debug", vocab_size=V)).eval()
    prompt = [5, 6, 7, 8]
    kw = dict(max_new_tokens=24, temperature=0, ignore_eos=True)
    out = generate(model, None, [prompt, prompt], **kw, frequency_penalty=2.0, presence_penalty=2.0)
    ids, counts = list(prompt), torch.zeros(V)
    with torch.no_grad():
        for _ in range(24):
            x = model(torch.tensor([ids]))[0, -1] - counts * 2.0 - (counts > 0).float() * 2.0
            t = int(x.argmax())
            ids.append(t)
            counts[t] += 1
    assert out[0] == ids[len(prompt) :] == out[1]
    plain = generate(model, None, prompt, **kw)
    assert plain != out[0]  # the penalty changed something (a random model repeats itself greedily)
    mixed = generate(model, None, [prompt], **kw, logit_bias={plain[0]: -100})
    assert mixed[0][0] != plain[0]


def test_penalty_and_bias_validation_and_greedy_rule():
    for kw in (
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"presence_penalty": float("nan")},
        {"logit_bias": {1: 101}},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {-1: 1}},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
    ):
        with pytest.raises(UserError):
            SamplingParams(**kw)
    assert SamplingParams(logit_bias={"12": -100}).logit_bias == {12: -100.0}
    assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-5).greedy
    s = Sampler(2, V, "cpu")
    s.set_row(0, SamplingParams(temperature=1e-7))  # greedy: no division by a tiny temperature
    s.set_row(1, SamplingParams(temperature=0))
    x = _logits()[:2]
    assert torch.equal(s(x), x.argmax(-1))
