"""Speculative decoding: greedy output identical to plain greedy, acceptance reported, cache rollback."""

import pytest
import torch

from lmforge.config import preset
from lmforge.infer import SamplingParams, generate
from lmforge.infer.sampling import Sampler
from lmforge.infer.speculative import accept_proposals
from lmforge.lm import LM
from lmforge.model import build
from lmforge.utils import UserError

V = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [42, 43]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(family, seed=0, **kw):
    torch.manual_seed(seed)
    return build(preset(family, "debug", vocab_size=V, **kw)).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_greedy_speculative_equals_plain_greedy(family):
    target = LM(_model(family))  # mistral debug: window 64 < 7 + 90 tokens
    # Drafts: an unrelated random model (rejects nearly everything: the rollback path) and the target's
    # own first layer with its head (accepts often: the bonus-token path).
    unrelated = _model(family, seed=1, n_layers=1)
    shallow = _model(family, n_layers=1)
    shallow.load_state_dict(
        {k: v for k, v in target.model.state_dict().items() if not k.startswith("blocks.1.")}
    )
    plain = generate(
        target.model, target.tokenizer, PROMPTS, max_new_tokens=90, temperature=0, ignore_eos=True
    )
    for draft in (unrelated, shallow):
        for k in (1, 4):
            out = generate(
                target.model,
                target.tokenizer,
                PROMPTS,
                max_new_tokens=90,
                temperature=0,
                ignore_eos=True,
                draft=draft,
                draft_tokens=k,
                details=True,
            )
            assert [o.token_ids for o in out] == plain
            rate = out[0].stats["acceptance_rate"]
            assert 0.0 <= rate <= 1.0


def test_self_draft_accepts_everything_greedy_and_sampled():
    m = _model("llama")
    lm = LM(m)
    for kw in (
        dict(temperature=0),
        dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=3),
    ):
        out = generate(
            lm.model,
            lm.tokenizer,
            PROMPTS[0],
            max_new_tokens=40,
            ignore_eos=True,
            draft=m,
            details=True,
            **kw,
        )
        assert out.stats["acceptance_rate"] == 1.0 and len(out.token_ids) == 40


def test_rejection_sampling_leaves_the_target_distribution():
    """Draft a token from q, accept or resample: the emitted token is distributed as p (many draws)."""
    p = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])  # (k + 1, V) with k = 1
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])  # very unlike p: many rejections
    s = Sampler(1, 5, "cpu")
    s.set_row(0, SamplingParams(), generator=torch.Generator().manual_seed(0))
    n, counts, accepted = 6000, torch.zeros(5), 0
    for _ in range(n):
        d = s.draw(q, [0])
        k_ok, t = accept_proposals(p, q, d, s, 1)
        counts[int(d) if k_ok else t] += 1
        accepted += k_ok
    assert (counts / n - p[0]).abs().max() < 0.025  # ~4 standard errors
    expected = torch.minimum(p[0], q[0]).sum()  # P(accept) = sum_x min(p, q)
    assert abs(accepted / n - float(expected)) < 0.03


def test_kv_cache_rollback_forgets_the_rejected_tokens():
    m = _model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = m.new_cache(1, 32)
        m(ids, cache=a)
        ref = m(torch.tensor([[9]]), cache=a)
        b = m.new_cache(1, 32)
        m(ids, cache=b)
        m(torch.tensor([[100, 101, 102]]), cache=b)  # three tokens that get rejected
        b.rollback(3)
        got = m(torch.tensor([[9]]), cache=b)
    assert b.length == a.length and torch.equal(b.next_pos, a.next_pos)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_draft_with_another_vocabulary_is_refused():
    with pytest.raises(UserError, match="vocabulary"):
        generate(_model("llama"), None, PROMPTS[0], draft=build(preset("llama", "debug", vocab_size=V + 1)))
