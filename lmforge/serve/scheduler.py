"""Continuous batching: one background thread owns the engines and runs the decode loop.

    sched = Scheduler({"base": Engine(model, tok, max_batch=8)}, max_queue=64, metrics=Metrics())
    sched.start()
    req = Request("base", [ids] * n, [params_0, ..., params_n-1], loop=asyncio.get_running_loop())
    sched.submit(req)                      # QueueFull -> 429, NotAccepting -> 503
    async for events in req:               # lists of Event, as the tokens come
        ...
    req.cancel()                           # client gone: its rows are freed at the next step

Every iteration of the loop (1) drops cancelled requests, (2) admits waiting requests, oldest first,
into free rows of their model's engine (`Engine.add`: prefill, first token), (3) runs one decode step
on every engine that has rows (`Engine.step`), and (4) hands each request the text its sequences
gained. A request's n sequences (n samples, or several prompts) are admitted together, so a request is
either waiting or running. Admission happens at every step, so a request joins a running batch
without waiting for it to finish, and a finished sequence frees its row for the next step.

Events cross from this thread to the asyncio loop once per iteration (`call_soon_threadsafe` with all
of the iteration's events), not once per token. Nothing here blocks on the HTTP side: a slow client
only grows its own asyncio queue.

Several models (a base and its LoRA variants) are several engines in the same thread, stepped in turn;
on a CPU this is as fast as separate threads, and it keeps one owner for all of them.

The server's engines are built with `Engine(..., skip_idle_tail=True)`: an uncompiled decode step skips
the empty rows at the end of the batch (see Engine). Empty rows' positions stay in range
(Engine._park_idle_rows).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.sequence import Sequence
from lmforge.serve.metrics import Metrics

log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    """The waiting queue holds --max-queue requests already (answered with 429)."""


class NotAccepting(Exception):
    """The server is shutting down or its engine loop died (answered with 503)."""


@dataclass
class Event:
    """What one sequence of a request gained in one iteration."""

    index: int  # which sequence of the request
    text: str  # new text (may be empty: a token that completes no character yet)
    finish_reason: str | None  # "stop" / "length" when this is its last event
    tokens: int  # tokens generated so far
    # With params.logprobs set: a TokenLogprob (sequence.py) per token generated since the last event,
    # the final stop token excepted (it is not part of the text).
    logprobs: list = field(default_factory=list)
    # With params.prompt_logprobs set, on the first event only: TokenLogprob | None per prompt token.
    prompt_logprobs: list | None = None


@dataclass
class Failure:
    """The request failed inside the engine; `internal` distinguishes engine bugs from cancellation."""

    message: str
    internal: bool = True


@dataclass(eq=False)
class Request:
    model: str
    prompts: list[list[int]]  # one per sequence
    params: list[SamplingParams]  # one per sequence
    loop: asyncio.AbstractEventLoop
    created: float = field(default_factory=time.monotonic)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    done: bool = False  # the end marker was received
    # Scheduler-side state (touched by the engine thread only).
    seqs: list[Sequence] = field(default_factory=list)
    last_token: list[float] = field(default_factory=list)
    logprobs_sent: list[int] = field(default_factory=list)  # per sequence: logprob entries handed out
    _scheduler: Scheduler | None = None

    def cancel(self) -> None:
        """Stop generating (the client went away); safe to call from any thread, any number of times."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            if self._scheduler is not None:
                self._scheduler.wake()

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[Event | Failure]:
        """The next batch of events; StopAsyncIteration after the last sequence finished."""
        items = await self.queue.get()
        if items is None:
            self.done = True
            raise StopAsyncIteration
        return items


class Scheduler:
    """The engine loop; see the module docstring.

    engines: model id -> Engine (each with its own rows and KV cache).
    max_queue: most requests waiting for rows (beyond those the free rows take); one more is refused.
    prefill_budget: prompt tokens admitted per iteration (at least one request is), so that a burst of
        long prompts does not stall the running rows for long.
    stall_timeout: seconds without progress, while there is work, after which `stalled` is True.
    """

    def __init__(
        self,
        engines: dict[str, Engine],
        max_queue: int = 256,
        metrics: Metrics | None = None,
        prefill_budget: int = 4096,
        stall_timeout: float = 120.0,
    ):
        self.engines = engines
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.prefill_budget = prefill_budget
        self.stall_timeout = stall_timeout
        for m in engines:
            self.metrics.add_model(m)
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: dict[str, list[Request]] = {m: [] for m in engines}
        self._owner: dict[Sequence, tuple[Request, int]] = {}
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # set when the loop died
        self.heartbeat = time.monotonic()

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        if req.model not in self.engines:
            raise KeyError(req.model)
        with self._cv:
            if not self._accepting or not self.alive:
                raise NotAccepting(
                    "the server is shutting down"
                    if not self._accepting
                    else f"the engine loop is not running ({self.error})"
                )
            queued = self._queued()
            if queued >= self.max_queue:
                self.metrics.rejected.labels(req.model).inc()
                raise QueueFull(
                    f"{queued} requests are waiting for a free row already (--max-queue "
                    f"{self.max_queue}); retry later"
                )
            req._scheduler = self
            self._waiting.append(req)
            self.metrics.waiting.labels(req.model).inc()
            self._cv.notify()

    def _queued(self) -> int:
        """Waiting requests that the free rows cannot take at the next step (the engine thread admits
        between steps, so a burst of requests may wait a moment for rows that are free)."""
        free = {m: len(e.free_rows) for m, e in self.engines.items()}
        queued = 0
        for r in self._waiting:
            if free[r.model] >= len(r.prompts):
                free[r.model] -= len(r.prompts)
            else:
                queued += 1
        return queued

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def stalled(self) -> bool:
        """Work to do but no iteration finished for stall_timeout seconds (a hung step)."""
        busy = bool(self._waiting) or any(self._running.values())
        return busy and time.monotonic() - self.heartbeat > self.stall_timeout

    @property
    def accepting(self) -> bool:
        return self._accepting

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cv:
            return sum(len(r) for r in self._running.values()), len(self._waiting)

    def begin_drain(self) -> None:
        """Refuse new requests (503); the running and waiting ones still finish."""
        with self._cv:
            self._accepting = False

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the admitted work (at most `timeout` seconds), cancel whatever is left, end the thread."""
        self.begin_drain()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive and (deadline is None or time.monotonic() < deadline):
            running, waiting = self.counts()
            if not running and not waiting:
                break
            time.sleep(0.05)
        with self._cv:
            for req in [*self._waiting, *(r for rs in self._running.values() for r in rs)]:
                req.cancelled = True
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._waiting and not any(self._running.values()):
                        self._cv.wait(timeout=1.0)
                        self.heartbeat = time.monotonic()
                    if self._stop:
                        break
                try:
                    self._iteration()
                except Exception as e:  # an engine bug: fail what is in flight, keep serving
                    log.exception("engine step failed")
                    self._reset(f"internal error in the engine: {type(e).__name__}: {e}")
                self.heartbeat = time.monotonic()
        except BaseException as e:  # pragma: no cover - the loop itself broke; /health reports it
            self.error = f"{type(e).__name__}: {e}"
            log.exception("engine loop died")
        finally:
            self._cancel_everything()

    def _iteration(self) -> None:
        out: dict[Request, list] = {}
        self._drop_cancelled(out)
        self._admit(out)
        for engine in self.engines.values():
            if engine.active:
                now_seqs = engine.step()
                now = time.monotonic()
                for seq in now_seqs:
                    self._emit(seq, now, out)
        self._retire_finished(out)
        self._deliver(out)

    def _drop_cancelled(self, out) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
                self.metrics.waiting.labels(r.model).dec()
                self.metrics.requests.labels(r.model, "cancelled").inc()
                out.setdefault(r, []).append(None)
        for model, reqs in self._running.items():
            engine = self.engines[model]
            for req in [r for r in reqs if r.cancelled]:
                for seq in req.seqs:
                    self._free_row(engine, seq)
                self._finish(req, "cancelled", out)

    def _free_row(self, engine: Engine, seq: Sequence) -> None:
        engine.cancel(seq)
        self._owner.pop(seq, None)

    def _admit(self, out) -> None:
        with self._cv:
            free = {m: len(e.free_rows) for m, e in self.engines.items()}
            blocked: set[str] = set()  # a model whose oldest waiting request does not fit: keep FIFO order
            budget, admitted = self.prefill_budget, []
            for req in list(self._waiting):
                if req.model in blocked or req.cancelled:
                    continue
                cost = sum(len(p) for p in req.prompts)
                if len(req.prompts) > free[req.model] or (admitted and cost > budget):
                    blocked.add(req.model)
                    continue
                free[req.model] -= len(req.prompts)
                budget -= cost
                admitted.append(req)
                self._waiting.remove(req)
                self.metrics.waiting.labels(req.model).dec()
        by_model: dict[str, list[Request]] = {}
        for req in admitted:
            by_model.setdefault(req.model, []).append(req)
        for model, reqs in by_model.items():
            engine = self.engines[model]
            # An idle engine prefills all new prompts in one padded batch; a busy one row by row anyway.
            groups = [reqs] if engine.active == 0 else [[r] for r in reqs]
            for group in groups:
                seqs = []
                for req in group:
                    req.seqs = [Sequence(p, sp) for p, sp in zip(req.prompts, req.params)]
                    req.last_token = [0.0] * len(req.seqs)
                    req.logprobs_sent = [-1] * len(req.seqs)  # -1: prompt logprobs not sent yet
                    for i, s in enumerate(req.seqs):
                        self._owner[s] = (req, i)
                    seqs += req.seqs
                    self._running[model].append(req)
                    self.metrics.running.labels(model).inc()
                try:
                    engine.add(seqs)
                except Exception as e:
                    log.exception("prefill failed")
                    for req in group:
                        for s in req.seqs:
                            self._free_row(engine, s)
                        out.setdefault(req, []).append(Failure(f"prefill failed: {type(e).__name__}: {e}"))
                        self._finish(req, "error", out)
                    continue
                now = time.monotonic()
                for req in group:
                    self.metrics.prompt_tokens.labels(model).inc(sum(len(p) for p in req.prompts))
                    self.metrics.ttft.labels(model).observe(now - req.created)
                for s in seqs:
                    self._emit(s, now, out)

    def _emit(self, seq: Sequence, now: float, out) -> None:
        owner = self._owner.get(seq)
        if owner is None:
            return
        req, i = owner
        m = req.model
        self.metrics.generation_tokens.labels(m).inc()
        if req.last_token[i]:
            self.metrics.itl.labels(m).observe(now - req.last_token[i])
        req.last_token[i] = now
        text = seq.pop_text()
        new_lp, prompt_lp = _new_logprobs(req, i, seq)
        if text or seq.finish_reason or new_lp or prompt_lp is not None:
            out.setdefault(req, []).append(
                Event(i, text, seq.finish_reason, len(seq.token_ids), new_lp, prompt_lp)
            )
        if seq.finish_reason:
            self._owner.pop(seq, None)

    def _retire_finished(self, out) -> None:
        for reqs in self._running.values():
            for req in [r for r in reqs if all(s.finish_reason for s in r.seqs)]:
                reason = "length" if any(s.finish_reason == "length" for s in req.seqs) else "stop"
                self._finish(req, reason, out)

    def _finish(self, req: Request, outcome: str, out) -> None:
        reqs = self._running[req.model]
        if req in reqs:
            reqs.remove(req)
            self.metrics.running.labels(req.model).dec()
        self.metrics.requests.labels(req.model, outcome).inc()
        if outcome in ("stop", "length"):
            self.metrics.e2e.labels(req.model).observe(time.monotonic() - req.created)
        for s in req.seqs:
            self._owner.pop(s, None)
        out.setdefault(req, []).append(None)  # end of stream

    def _deliver(self, out: dict[Request, list]) -> None:
        """Hand each request its events in one call per event loop (None ends a request's stream)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req, items in out.items():
            by_loop.setdefault(req.loop, []).append((req, items))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
                pass

    def _reset(self, message: str) -> None:
        """After an engine error: fail every running request and empty every engine."""
        out: dict[Request, list] = {}
        for model, reqs in self._running.items():
            engine = self.engines[model]
            for req in list(reqs):
                out.setdefault(req, []).append(Failure(message))
                self._finish(req, "error", out)
            engine.clear()
        self._owner.clear()
        self._deliver(out)

    def _cancel_everything(self) -> None:
        out: dict[Request, list] = {}
        with self._cv:
            self._accepting = False
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            self.metrics.waiting.labels(req.model).dec()
            out.setdefault(req, []).extend([Failure("the server shut down", internal=False), None])
        for reqs in self._running.values():
            for req in list(reqs):
                out.setdefault(req, []).append(Failure("the server shut down", internal=False))
                self._finish(req, "cancelled", out)
        self._deliver(out)


def _new_logprobs(req: Request, i: int, seq: Sequence) -> tuple[list, list | None]:
    """The logprob entries of sequence i not handed out yet, and its prompt logprobs the first time."""
    p = seq.params
    prompt_lp = None
    if req.logprobs_sent[i] < 0:
        req.logprobs_sent[i] = 0
        if getattr(p, "prompt_logprobs", None) is not None:
            prompt_lp = list(getattr(seq, "prompt_logprobs", None) or [])
    if getattr(p, "logprobs", None) is None:
        return [], prompt_lp
    entries = getattr(seq, "logprobs", None) or []
    end = len(entries)
    if seq.finish_reason == "stop" and seq.token_ids and seq.token_ids[-1] in seq.stop_ids:
        end = min(end, len(seq.token_ids) - 1)  # the stop token is not part of the text
    start = req.logprobs_sent[i]
    req.logprobs_sent[i] = max(start, end)
    return list(entries[start:end]), prompt_lp


def _put_all(batch) -> None:
    """On the event loop: put each request's events on its queue (None, the end marker, separately)."""
    for req, items in batch:
        events = []
        for item in items:
            if item is None:
                if events:
                    req.queue.put_nowait(events)
                    events = []
                req.queue.put_nowait(None)
                break
            events.append(item)
        if events:
            req.queue.put_nowait(events)
