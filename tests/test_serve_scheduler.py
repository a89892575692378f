"""The continuous-batching scheduler in-process (no HTTP): requests join a running batch and give what
they give alone, cancellation frees rows, the queue bound holds, long runs with idle rows stay valid."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import lm, serve_ckpt  # noqa: F401

from lmforge.infer import Engine, SamplingParams, Sequence
from lmforge.serve.scheduler import Event, QueueFull, Request, Scheduler


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


async def _collect(req: Request, on_event=None) -> list[str]:
    texts = [""] * len(req.prompts)
    async for events in req:
        for ev in events:
            assert isinstance(ev, Event), ev
            texts[ev.index] += ev.text
            if on_event:
                on_event(ev)
    return texts


def _solo(lm, ids, n) -> str:  # noqa: F811
    return lm.tokenizer.decode(
        lm.generate(ids, max_new_tokens=n, temperature=0, ignore_eos=True), skip_special=True
    )


@pytest.mark.parametrize("skip_idle_tail", [False, True])
def test_requests_join_a_running_batch(lm, skip_idle_tail):  # noqa: F811
    """B arrives while A decodes, joins A's batch (B's first token comes before A's last), and each gives
    exactly what it gives alone. D and C start at different times, so D's row idles for longer than the
    context while C runs: positions of empty rows must not run past the context."""
    tok = lm.tokenizer
    a_ids, b_ids = tok.encode("The quick brown fox", bos=True), tok.encode("Hello", bos=True)

    async def run():
        engine = Engine(lm.model, tok, max_batch=4, skip_idle_tail=skip_idle_tail)
        sched = Scheduler({"m": engine}, max_queue=8)
        sched.start()
        loop = asyncio.get_running_loop()
        try:
            a = Request("m", [a_ids], [_greedy(120)], loop=loop)
            b = Request("m", [b_ids], [_greedy(30)], loop=loop)
            order = []
            sched.submit(a)

            def on_a(ev):
                order.append(("a", ev.tokens))
                if ev.tokens >= 20 and b._scheduler is None:
                    sched.submit(b)

            ta = asyncio.create_task(_collect(a, on_a))
            tb_text = None
            while tb_text is None:
                await asyncio.sleep(0.01)
                if b._scheduler is not None:
                    tb_text = await _collect(b, lambda ev: order.append(("b", ev.tokens)))
            a_text = await ta
            # D: 200 tokens from the start; C joins 100 tokens later for 250 tokens; D's row then idles
            d = Request("m", [b_ids], [_greedy(200)], loop=loop)
            c = Request("m", [a_ids], [_greedy(250)], loop=loop)
            sched.submit(d)

            def on_d(ev):
                if ev.tokens >= 100 and c._scheduler is None:
                    sched.submit(c)

            td = asyncio.create_task(_collect(d, on_d))
            while c._scheduler is None:
                await asyncio.sleep(0.01)
            c_text = await _collect(c)
            d_text = await td
            assert sched.alive and sched.counts() == (0, 0)
            return a_text[0], tb_text[0], order, c_text[0], d_text[0]
        finally:
            sched.stop(timeout=5)

    a_text, b_text, order, c_text, d_text = asyncio.run(run())
    assert a_text == _solo(lm, a_ids, 120) and b_text == _solo(lm, b_ids, 30)
    first_b = order.index(next(o for o in order if o[0] == "b"))
    assert any(o[0] == "a" for o in order[first_b:])  # A was still running when B started
    assert c_text == _solo(lm, a_ids, 250) and d_text == _solo(lm, b_ids, 200)


def test_cancel_frees_rows_and_queue_bound(lm):  # noqa: F811
    tok = lm.tokenizer
    ids = tok.encode("Hello", bos=True)

    async def run():
        engine = Engine(lm.model, tok, max_batch=2, skip_idle_tail=True)
        sched = Scheduler({"m": engine}, max_queue=1)
        sched.start()
        loop = asyncio.get_running_loop()
        try:
            reqs = [Request("m", [ids, ids], [_greedy(250), _greedy(250)], loop=loop) for _ in range(2)]
            sched.submit(reqs[0])  # takes both rows
            sched.submit(reqs[1])  # waits
            with pytest.raises(QueueFull):
                sched.submit(Request("m", [ids], [_greedy(5)], loop=loop))
            first = await reqs[0].__anext__()
            assert first and engine.active == 2
            reqs[0].cancel()
            reqs[1].cancel()  # cancelled while waiting
            for r in reqs:
                async for _ in r:
                    pass
            assert engine.active == 0 and sched.counts() == (0, 0)
            metrics = sched.metrics.requests.labels("m", "cancelled")._value.get()
            after = Request("m", [ids], [_greedy(5)], loop=loop)
            sched.submit(after)
            text = await _collect(after)
            return metrics, text
        finally:
            sched.stop(timeout=5)

    cancelled, text = asyncio.run(run())
    assert cancelled == 2 and text == [_solo(lm, ids, 5)]


def test_skipping_the_idle_tail_steps_like_engine(lm):  # noqa: F811
    """Same adds and steps on Engine and Engine(skip_idle_tail=True) (which decodes only the rows up to
    the last busy one): the same tokens for every sequence, greedy and seeded, as rows finish and
    others join."""
    tok = lm.tokenizer
    prompts = [
        tok.encode(t, bos=True) for t in ("The quick brown fox", "Hello", "def add(a, b):", "A", "xyz")
    ]

    def params(i, n):
        if i % 2:
            return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
        return SamplingParams(max_new_tokens=n, temperature=0.9, top_k=50, seed=i, ignore_eos=True)

    def run(skip_idle_tail):
        e = Engine(lm.model, tok, max_batch=4, skip_idle_tail=skip_idle_tail)
        seqs = [Sequence(prompts[0], params(0, 40)), Sequence(prompts[1], params(1, 6))]
        e.add(seqs)  # rows 0, 1; row 1 finishes early, rows 2-3 stay empty at first
        for step in range(200):
            if step == 10:
                seqs.append(Sequence(prompts[2], params(2, 30)))
                e.add(seqs[-1:])  # takes row 1
            if step == 15:
                seqs += [Sequence(prompts[3], params(3, 12)), Sequence(prompts[4], params(4, 50))]
                e.add(seqs[-2:])  # rows 2 and 3
            if not e.active and step > 15:
                break
            e.step()
        return [s.token_ids for s in seqs]

    a, b = run(False), run(True)
    assert [len(x) for x in a] == [40, 6, 30, 12, 50]
    assert a == b


def test_an_engine_error_fails_the_running_requests_and_frees_every_row(lm, monkeypatch):  # noqa: F811
    """A decode step that raises fails what is in flight (Failure, internal) and empties the engine
    through its public clear(); the scheduler keeps serving: the next request gives what it gives alone."""
    from lmforge.serve.scheduler import Failure

    tok = lm.tokenizer
    ids = tok.encode("Hello", bos=True)
    engine = Engine(lm.model, tok, max_batch=2, skip_idle_tail=True)
    real_step, calls = Engine.step, []

    def step(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)

    async def run():
        sched = Scheduler({"m": engine}, max_queue=4)
        sched.start()
        loop = asyncio.get_running_loop()
        try:
            req = Request("m", [ids, ids], [_greedy(50), _greedy(50)], loop=loop)
            sched.submit(req)
            failures = []
            async for events in req:
                failures += [e for e in events if isinstance(e, Failure)]
            active = engine.active
            after = Request("m", [ids], [_greedy(5)], loop=loop)
            sched.submit(after)
            return failures, active, await _collect(after)
        finally:
            sched.stop(timeout=5)

    failures, active, text = asyncio.run(run())
    assert len(failures) == 1 and "boom" in failures[0].message and failures[0].internal
    assert active == 0 and text == [_solo(lm, ids, 5)]
