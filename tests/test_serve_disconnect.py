"""Clients that go away: 100 streaming requests dropped mid-stream (8 at a time) and a few non-streaming
ones that time out must all be cancelled and their rows freed; a fresh request then completes promptly.
Then graceful shutdown: SIGTERM lets running and queued requests finish, refuses new ones, and exits."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from serve_helpers import Server, metric, serve_ckpt  # noqa: F401

N_STREAMS, CONCURRENCY = 100, 8


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):  # noqa: F811
    with Server(
        serve_ckpt[0],
        "--max-batch",
        "8",
        "--drain-timeout",
        "60",
        log_dir=tmp_path_factory.mktemp("serve_disconnect"),
    ) as s:
        yield s


LONG = {"prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True, "temperature": 0.8}


async def _drop_after_first_token(h: httpx.AsyncClient, sem: asyncio.Semaphore) -> int:
    async with sem:
        async with h.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    return 1  # leaving the block closes the connection mid-stream
    return 0


async def _time_out(h: httpx.AsyncClient) -> None:
    """A non-streaming request for 8 x 250 tokens whose client gives up after 0.2 s."""
    with pytest.raises(httpx.ReadTimeout):
        await h.post("/v1/completions", json={**LONG, "max_tokens": 250, "n": 8}, timeout=0.2)


def test_disconnected_clients_free_their_rows(server):
    async def run():
        sem = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as h:
            got = await asyncio.wait_for(
                asyncio.gather(*[_drop_after_first_token(h, sem) for _ in range(N_STREAMS)]), timeout=120
            )
            for _ in range(4):
                await _time_out(h)
        return sum(got)

    assert asyncio.run(run()) == N_STREAMS
    t0 = time.monotonic()
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 16, "ignore_eos": True},
        timeout=5,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    assert time.monotonic() - t0 < 5
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "lmforge_requests_running") == 0 and metric(text, "lmforge_requests_waiting") == 0
    # every dropped stream is cancelled; a timed-out request is cancelled too, unless a fast machine
    # finished its 8 x 250 tokens within the client's 0.2 s (then it counts as "length"): none is lost
    cancelled = metric(text, "lmforge_requests_total", outcome="cancelled")
    finished = metric(text, "lmforge_requests_total", outcome="length") - 1  # the 16-token request
    assert cancelled >= N_STREAMS and cancelled + finished == N_STREAMS + 4, text
    health = httpx.get(server.url + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0


def test_sigterm_drains_running_and_queued_requests(server):
    """(Runs last: it stops the module's server.) 12 requests on 8 rows: 8 run, 4 wait. SIGTERM after the
    first tokens: all 12 still complete, new requests are refused, and the process exits."""
    results: list = [None] * 12
    started = threading.Event()

    def one(i):
        body = {**LONG, "max_tokens": 250, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
                results[i] = (r.status_code, lines)
        except httpx.HTTPError as e:
            results[i] = (None, [repr(e)])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    assert started.wait(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # all 12 accepted: 8 running, 4 waiting (or some done already)
        h = httpx.get(server.url + "/health").json()
        if h["running"] + h["waiting"] + sum(r is not None for r in results) >= 12:
            break
        time.sleep(0.02)
    pending = sum(r is None for r in results)
    server.proc.send_signal(signal.SIGTERM)
    assert pending >= 1  # the signal did arrive mid-stream
    time.sleep(0.3)
    try:  # the listening socket is closed (connection refused) or the server answers 503
        late = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
        assert late.status_code == 503, late.text
    except httpx.TransportError:
        pass
    for t in threads:
        t.join(120)
    for status, lines in results:
        assert status == 200, lines
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    server.proc.wait(60)
    assert server.proc.returncode in (0, -signal.SIGTERM), server.log()
    assert "Traceback" not in server.log(), server.log()
