"""The engine: batched == individual, cached == uncached, continuous batching, stops, streaming, limits."""

import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams, Sequence, generate, stream
from lmforge.infer.engine import _StaticStep
from lmforge.kernels import install as install_kernels
from lmforge.lm import LM, load
from lmforge.model import build
from lmforge.tokenizer import train_tokenizer
from lmforge.utils import UserError

VOCAB = 300
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [42], [3] * 20 + [17, 18], [250, 251]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _lm(family="llama", tokenizer=None, kernels=True, **kw):
    """A tiny random model with the decode kernels installed, as lmforge.load gives it (kernels=False:
    the plain modules)."""
    torch.manual_seed(0)
    vocab = tokenizer.vocab_size if tokenizer is not None else VOCAB
    eos = tokenizer.eos_id if tokenizer is not None else None
    model = build(preset(family, "debug", vocab_size=vocab, eos_token_id=eos, **kw)).eval()
    return LM(install_kernels(model) if kernels else model, tokenizer)


def _greedy(lm, prompts, n, **kw):
    return generate(lm.model, lm.tokenizer, prompts, max_new_tokens=n, temperature=0, **kw)


@pytest.fixture(scope="module")
def tok():
    docs = [
        "Hello world! Héllo wörld, ünïcödé ☃ 日本語のテキスト. def add(a, b): return a + b\n",
        "The quick brown fox jumps over the lazy dog. Ça va? 你好世界 🙂🙃",
    ] * 20
    return train_tokenizer(docs, 400)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_batch_equals_each_prompt_alone(family):
    lm = _lm(family)  # mistral debug: window 64 < 22 + 80 tokens, so the ring buffer wraps
    alone = [_greedy(lm, p, 80, ignore_eos=True) for p in PROMPTS]
    assert _greedy(lm, PROMPTS, 80, ignore_eos=True) == alone


def _record_logits(monkeypatch):
    """Capture the (B, V) logits of every prefill and decode step the engine samples from."""
    seen = []
    orig_decode, orig_sample = Engine._decode_logits, Engine._sample_into

    def decode(self, tok):
        out = orig_decode(self, tok)
        seen.append(out.clone())
        return out

    def sample_into(self, logits, rows):
        seen.append(logits.clone())
        return orig_sample(self, logits, rows)

    monkeypatch.setattr(Engine, "_decode_logits", decode)
    monkeypatch.setattr(Engine, "_sample_into", sample_into)
    return seen


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt"])
def test_cached_logits_equal_uncached(monkeypatch, family):
    lm = _lm(family)
    seen = _record_logits(monkeypatch)
    out = _greedy(lm, PROMPTS, 70, ignore_eos=True)
    steps = torch.stack(seen, 1)  # (B, 70, V): prefill, then one decode step per token
    for i, (p, o) in enumerate(zip(PROMPTS, out)):
        with torch.no_grad():
            ref = lm.model(torch.tensor([p + o]))[0, len(p) - 1 : -1]  # uncached, one pass over everything
        torch.testing.assert_close(steps[i], ref, atol=1e-4, rtol=0)


def _run_continuous(engine, reqs, admit_every=5):
    """Admit one request every `admit_every` steps while others decode; returns {id: token_ids}."""
    pending = [
        Sequence(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True), id=i)
        for i, (p, n) in enumerate(reqs)
    ]
    done, step = {}, 0
    while pending or engine.active:
        if pending and engine.free_rows and step % admit_every == 0:
            for s in engine.add([pending.pop(0)]):
                done[s.id] = s
        for s in engine.step():
            done[s.id] = s
        step += 1
    return {i: s.token_ids for i, s in done.items()}


@pytest.mark.parametrize("kernel", [True, False])
def test_bf16_decode_path_matches_an_uncached_forward(monkeypatch, kernel):
    """bf16 on CPU decodes through lmforge's kernel (or, without it, oneDNN-packed weights) and
    few_query_attention: same logits as the plain full forward to bf16 rounding, same greedy tokens."""
    from lmforge.kernels import rows

    if kernel and not rows.available():
        pytest.skip("the kernel did not build")
    if not kernel:
        monkeypatch.setattr(rows, "available", lambda: False)
        monkeypatch.setattr(rows, "LOADED", False)
    lm = _lm(kernels=False)
    install_kernels(lm.model.to(torch.bfloat16))
    seen = _record_logits(monkeypatch)
    p = PROMPTS[0]
    out = _greedy(lm, p, 30, ignore_eos=True)
    with torch.no_grad():
        ref = lm.model(torch.tensor([p + out]))[0, len(p) - 1 : -1].float()
    got = torch.cat(seen).float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    assert got.argmax(-1).tolist() == out


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_leaves_the_model_unchanged(kernels, dtype):
    """Creating an engine and generating with it changes nothing in the caller's model: the same
    modules of the same classes, the same parameter objects at the same addresses with the same values
    (plain, or with the kernels the caller installed)."""
    lm = _lm(kernels=False)
    model = lm.model.to(dtype)
    if kernels:
        install_kernels(model)

    def snapshot():
        return (
            [(n, type(m), id(m)) for n, m in model.named_modules()],
            {n: (id(p), p.data_ptr(), p.stride(), p.detach().clone()) for n, p in model.named_parameters()},
        )

    mods, params = snapshot()
    engine = Engine(model, max_batch=2, max_len=48)
    engine.add([Sequence(p, SamplingParams(max_new_tokens=8, temperature=0)) for p in PROMPTS[:2]])
    while engine.active:
        engine.step()
    _greedy(lm, PROMPTS[0], 4)  # generate() makes its own engine
    mods2, params2 = snapshot()
    assert mods2 == mods
    assert params2.keys() == params.keys()
    for n, (i, ptr, stride, value) in params.items():
        assert params2[n][:3] == (i, ptr, stride) and torch.equal(params2[n][3], value), n


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("static", [False, True])
def test_continuous_batching_equals_each_request_alone(family, static):
    """Requests join a running batch (rows shift right for a long prompt, left when slots run out)."""
    lm = _lm(family)
    reqs = [
        (PROMPTS[0], 40),
        (PROMPTS[1], 60),
        ([9] * 30, 50),
        ([7, 1], 30),
        ([3] * 45, 20),
        (PROMPTS[3], 35),
    ]
    ref = [_greedy(lm, p, n, ignore_eos=True) for p, n in reqs]
    engine = Engine(lm.model, max_batch=3, max_len=80)  # mistral: window 64 < 80, a ring buffer
    if static:  # the fixed-shape decode step that CUDA graphs replay, run eagerly
        engine._static = _StaticStep(engine.cache)
        engine._step_fn = engine._static_logits
    shifts = []
    orig = engine._shift
    engine._shift = lambda d: (shifts.append(d), orig(d))
    got = _run_continuous(engine, reqs)
    assert [got[i] for i in range(len(reqs))] == ref
    assert any(d > 0 for d in shifts) and any(d < 0 for d in shifts)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "qwen3", "olmo2"])
def test_static_decode_step_compiles_as_one_graph(family):
    """The static decode step (CUDA graphs; inductor on CPU) traces with fullgraph=True (no graph
    breaks) and decodes the same: a ring-buffer window (mistral), sliding and full layers in one model
    with soft-caps (gemma2, gemma3), q/k norms per head (qwen3) and over all heads (olmo2)."""
    windowed = dict(mistral=1, gemma2=2, gemma3=6)  # layers; windows of 8 tokens, passed by every row
    kw = dict(n_layers=windowed[family], sliding_window=8) if family in windowed else dict(n_layers=1)
    lm = _lm(family, **kw)
    ref = _greedy(lm, PROMPTS[:2], 12, ignore_eos=True)
    engine = Engine(lm.model, max_batch=2, max_len=40)
    engine._static = _StaticStep(engine.cache)
    engine._step_fn = torch.compile(engine._static_logits, backend="eager", fullgraph=True)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    seqs = engine.add([Sequence(p, params) for p in PROMPTS[:2]])
    while engine.active:
        engine.step()
    assert [s.token_ids for s in seqs] == ref


def test_rows_stop_on_their_own_stop_tokens_and_the_batch_ends_when_all_do():
    lm = _lm()
    free = _greedy(lm, PROMPTS, 30, ignore_eos=True)
    stops = [row[5] for row in free[:3]] + [-1]  # rows 0-2 stop at their 6th token (or earlier repeat)
    per_row = [
        generate(
            lm.model, lm.tokenizer, p, max_new_tokens=30, temperature=0, stop_token_ids=[s], details=True
        )
        for p, s in zip(PROMPTS, stops)
    ]
    for r, f, s in zip(per_row, free, stops):
        n = f.index(s) + 1 if s in f else 30
        assert r.token_ids == f[:n] and r.finish_reason == ("stop" if s in f else "length")
    # The same rows in one batch, each with its own stop token, via the engine.
    engine = Engine(lm.model, max_batch=4, max_len=60)
    seqs = [
        Sequence(p, SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=(s,)))
        for p, s in zip(PROMPTS, stops)
    ]
    engine.add(seqs)
    steps = 0
    while engine.active:
        engine.step()
        steps += 1
    assert [s.token_ids for s in seqs] == [r.token_ids for r in per_row]
    assert steps == max(len(s.token_ids) for s in seqs) - 1  # no step after the last row finished


def test_eos_from_the_config_stops_generation():
    lm = _lm()
    free = _greedy(lm, PROMPTS[0], 20, ignore_eos=True)
    lm.model.config.eos_token_id = free[3]
    try:
        out = generate(lm.model, lm.tokenizer, PROMPTS[0], max_new_tokens=20, temperature=0, details=True)
    finally:
        lm.model.config.eos_token_id = None
    assert out.token_ids == free[: free.index(free[3]) + 1] and out.finish_reason == "stop"


def test_text_streaming_equals_generate_and_is_valid_utf8(tok):
    lm = _lm(tokenizer=tok)
    for prompt in ["Hello", "日本", "def add"]:
        full = generate(
            lm.model, lm.tokenizer, prompt, max_new_tokens=40, temperature=0, ignore_eos=True, details=True
        )
        assert full.text == tok.decode(full.token_ids, skip_special=True)
        s = stream(lm.model, lm.tokenizer, prompt, max_new_tokens=40, temperature=0, ignore_eos=True)
        pieces = list(s)
        assert "".join(pieces) == full.text and s.token_ids == full.token_ids
        for piece in pieces[:-1]:  # an unfinished character is held back, never sent as U+FFFD
            assert not piece.endswith("\ufffd") or full.text.count("\ufffd") > 0


def test_stop_strings_cut_the_text_and_streaming_agrees(tok):
    lm = _lm(tokenizer=tok)
    prompt = "The quick"
    free = generate(lm.model, lm.tokenizer, prompt, max_new_tokens=60, temperature=0, ignore_eos=True)
    stop = free[25:28]
    cut = free[: free.find(stop)]
    out = generate(
        lm.model,
        lm.tokenizer,
        prompt,
        max_new_tokens=60,
        temperature=0,
        ignore_eos=True,
        stop=[stop, "never-seen"],
        details=True,
    )
    assert out.text == cut and out.finish_reason == "stop"
    assert (
        "".join(
            stream(
                lm.model, lm.tokenizer, prompt, max_new_tokens=60, temperature=0, ignore_eos=True, stop=[stop]
            )
        )
        == cut
    )
    # Batched rows with the stop: every row is cut on its own.
    outs = generate(
        lm.model,
        lm.tokenizer,
        [prompt, "Hello"],
        max_new_tokens=60,
        temperature=0,
        ignore_eos=True,
        stop=[stop],
    )
    assert outs[0] == cut and outs[1] == generate(
        lm.model, lm.tokenizer, "Hello", max_new_tokens=60, temperature=0, ignore_eos=True, stop=[stop]
    )


def test_held_back_text_is_released_when_the_stop_string_does_not_complete():
    from lmforge.infer.sequence import _held_back

    assert _held_back("abc</", ("</s>",)) == 2
    assert _held_back("abc<", ("</s>", "<|end|>")) == 1
    assert _held_back("abc", ("</s>",)) == 0
    seq = Sequence([1], SamplingParams(stop=("STOP",)))
    seq.text = "hello ST"
    assert seq.pop_text() == "hello "
    seq.text = "hello STx"
    assert seq.pop_text() == "STx"


def test_context_limit_is_an_error_naming_both_numbers_unless_truncating_left():
    lm = _lm(max_seq_len=64)
    prompt = list(range(3, 53))  # 50 tokens
    with pytest.raises(UserError, match=r"50 tokens \+ max_new_tokens=20 = 70 .* context of 64"):
        generate(lm.model, lm.tokenizer, prompt, max_new_tokens=20, temperature=0)
    got = generate(
        lm.model, lm.tokenizer, prompt, max_new_tokens=20, temperature=0, truncate="left", ignore_eos=True
    )
    assert got == generate(
        lm.model, lm.tokenizer, prompt[-44:], max_new_tokens=20, temperature=0, ignore_eos=True
    )
    lm.model.config.bos_token_id = 3  # a leading BOS survives truncation
    try:
        got = generate(
            lm.model, lm.tokenizer, prompt, max_new_tokens=20, temperature=0, truncate="left", ignore_eos=True
        )
    finally:
        lm.model.config.bos_token_id = None
    assert got == generate(
        lm.model, lm.tokenizer, [3] + prompt[-43:], max_new_tokens=20, temperature=0, ignore_eos=True
    )
    with pytest.raises(UserError, match="max_new_tokens=64 leaves no room"):
        generate(lm.model, lm.tokenizer, prompt, max_new_tokens=64, truncate="left")


def test_num_samples_and_seed(tok):
    lm = _lm(tokenizer=tok)
    a = generate(lm.model, lm.tokenizer, ["Hello", "The"], num_samples=3, seed=0, max_new_tokens=15, top_k=50)
    b = generate(lm.model, lm.tokenizer, ["Hello", "The"], num_samples=3, seed=0, max_new_tokens=15, top_k=50)
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    assert len(set(a[0])) > 1  # independent samples
    assert a != generate(
        lm.model, lm.tokenizer, ["Hello", "The"], num_samples=3, seed=1, max_new_tokens=15, top_k=50
    )
    s = "".join(stream(lm.model, lm.tokenizer, "Hello", seed=5, max_new_tokens=15, min_p=0.1))
    assert s == generate(lm.model, lm.tokenizer, "Hello", seed=5, max_new_tokens=15, min_p=0.1)


def test_lm_api_and_checkpoint_round_trip(tmp_path, tok):
    lm = _lm(tokenizer=tok)
    save_model(lm.model, tmp_path / "m", tokenizer=tok)
    lm2 = load(tmp_path / "m", device="cpu")
    text = lm2.generate("Hello", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert text == generate(
        lm.model, lm.tokenizer, "Hello", max_new_tokens=10, temperature=0, ignore_eos=True
    )
    assert "".join(lm2.stream("Hello", max_new_tokens=10, temperature=0, ignore_eos=True)) == text
    with pytest.raises(UserError, match="unknown generation option"):
        lm2.generate("Hello", max_tokens=3)
    with pytest.raises(UserError, match="top_p"):
        lm2.generate("Hello", top_p=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_row_idle_for_longer_than_the_context_keeps_working(family):
    """Idle rows are decoded too; their positions must not run past the position tables (context 64)."""
    lm = _lm(family, max_seq_len=64)
    engine = Engine(lm.model, max_batch=3, max_len=64)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
    ref = _greedy(lm, PROMPTS[0], 40, ignore_eos=True)
    seqs = []
    for step in range(120):  # rows 0 and 1 take turns, so the batch never empties; row 2 stays idle
        if step % 25 == 0 and step < 125:
            seqs += engine.add([Sequence(PROMPTS[0], params)])
        engine.step()
    assert engine.rows[2] is None and engine.active == 1
    seqs += engine.add([Sequence(PROMPTS[0], params), Sequence(PROMPTS[0], params)])
    assert engine.rows[2] is seqs[-1]  # a row that was idle for 120 steps
    while engine.active:
        engine.step()
    assert all(s.token_ids == ref for s in seqs) and len(seqs) == 7
    assert engine.cancel(seqs[-1]) is False
    (s,) = engine.add([Sequence(PROMPTS[0], params)])
    assert engine.cancel(s) is True and engine.active == 0 and engine.step() == []


def test_a_rejected_request_leaves_the_running_batch_alone():
    lm = _lm()
    engine = Engine(lm.model, max_batch=3, max_len=64)
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    (running,) = engine.add([Sequence(PROMPTS[0], params)])
    engine.step()
    too_long = Sequence(list(range(3, 43)), params)  # 40 + 30 > 64 slots
    with pytest.raises(UserError, match="does not fit the engine's 64 slots"):
        engine.add([Sequence(PROMPTS[1], params), too_long])
    assert engine.active == 1 and engine.rows[1] is None
    while engine.active:
        engine.step()
    assert running.token_ids == _greedy(lm, PROMPTS[0], 30, ignore_eos=True)


def test_compiled_cpu_decode_step_equals_eager_for_each_engine():
    """Engine(compile=True) on CPU (inductor, C++ wrapper, dynamo's module guards skipped): the same
    greedy tokens as eager, for two models in one process (each engine has its own compiled step),
    and an in-place weight update is seen by the compiled step."""

    def greedy(engine):
        s = Sequence([5, 6, 7, 8], SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
        engine.add([s])
        while engine.active:
            engine.step()
        return s.token_ids

    for seed in (0, 1):
        torch.manual_seed(seed)
        model = install_kernels(build(preset(size="debug")).eval())  # as lmforge.load gives it
        compiled = Engine(model, max_batch=1, max_len=64, compile=True)
        before = greedy(compiled)
        assert before == greedy(Engine(model, max_batch=1, max_len=64))
        with torch.no_grad():
            model.blocks[0].mlp.w_out.weight.mul_(3)
        after = greedy(compiled)
        assert after == greedy(Engine(model, max_batch=1, max_len=64)) and after != before


# ------------------------------------------------------------------ prefix cache
def _run_logits(monkeypatch, eng, prompts_by_round, **kw):
    """Run each round's prompts through `eng` (a new add per round, the engine drained in between
    unless busy), recording the logits every sequence's tokens were sampled from."""
    seen = {}
    orig = Engine._deliver

    def deliver(self, logits, tok, batch_rows, live):
        for j, r in enumerate(batch_rows):
            if r in live:
                seen.setdefault(self.rows[r].id, []).append(logits[j].clone())
        return orig(self, logits, tok, batch_rows, live)

    monkeypatch.setattr(Engine, "_deliver", deliver)
    seqs = []
    for rnd in prompts_by_round:
        new = [Sequence(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)) for p, n in rnd]
        eng.add(new)
        seqs += new
        eng.step()
    while eng.active:
        eng.step()
    monkeypatch.setattr(Engine, "_deliver", orig)
    return seqs, [torch.stack(seen[s.id]) for s in seqs]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_prefix_cache_gives_identical_logits(monkeypatch, family):
    """Shared system prompt, a request joining a running batch, and the next turn of a finished
    conversation: with the prefix cache, their logits equal the uncached engine's (1e-5)."""
    lm = _lm(family)  # mistral debug: window 64; the decode runs past it (the ring wraps)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(0, VOCAB, (37,), generator=g).tolist()
    a, b, c = (torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3))
    rounds = [[(system + a, 30)], [(system + b, 40)], [(system + c, 8), (system[:20], 5)]]
    on = Engine(lm.model, None, max_batch=4, prefix_cache=True)
    s_on, l_on = _run_logits(monkeypatch, on, rounds)
    turn2 = s_on[0].prompt_ids + s_on[0].token_ids[:-1] + [7, 8]  # the conversation goes on
    s2_on, l2_on = _run_logits(monkeypatch, on, [[(turn2, 6)]])
    off = Engine(lm.model, None, max_batch=4)
    s_off, l_off = _run_logits(monkeypatch, off, rounds)
    s2_off, l2_off = _run_logits(monkeypatch, off, [[(turn2, 6)]])
    assert [s.cached_tokens for s in s_on] == [0, 32, 32, 16]
    if family == "llama":  # the finished conversation was stored, reply included
        assert s2_on[0].cached_tokens == (len(turn2) - 1) // 16 * 16 > 32
    else:  # its 71 tokens overran the 64-slot ring: only the prompt's blocks were kept
        assert s2_on[0].cached_tokens == 32
    assert on.stats["cached_prompt_tokens"] == 80 + s2_on[0].cached_tokens
    for x, y in zip(l_on + l2_on, l_off + l2_off):
        assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()
    assert [s.token_ids for s in s_on + s2_on] == [s.token_ids for s in s_off + s2_off]


def test_prefix_cache_lru_is_bounded():
    from lmforge.infer.prefix_cache import BLOCK

    lm = _lm("llama")
    eng = Engine(lm.model, None, max_batch=1, prefix_cache=3 * BLOCK)
    for seed in range(4):
        p = torch.randint(0, VOCAB, (2 * BLOCK + 1,), generator=torch.Generator().manual_seed(seed)).tolist()
        eng.add([Sequence(p, SamplingParams(max_new_tokens=1))])
        assert len(eng.prefix) <= 3 * BLOCK
    assert eng.prefix.lookup(p) and not eng.prefix.lookup([1] * 40)  # the newest prompt is still there
