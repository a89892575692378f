"""Hostile and careless clients against a real server: text that is not valid Unicode (a lone surrogate)
is a 400 naming the field and the keep-alive connection stays usable; a multi-megabyte prompt does not
freeze the other streams or /health; slow clients (silent connections, headers a byte at a time, half
a body, idle keep-alive) are cut off by the documented timeouts (here set to 1 s)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import TEXT, Server, assert_error, serve_ckpt  # noqa: F401

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):  # noqa: F811
    args = ["--max-batch", "4", "--timeout-header", "1", "--timeout-body", "1", "--timeout-keep-alive", "1"]
    # a body limit above the 8 MB prompt: the tokenizer, not the limit, is what is tested
    with Server(serve_ckpt[0], *args, log_dir=tmp_path_factory.mktemp("serve_robust")) as s:
        yield s


def test_lone_surrogates_are_a_400_naming_the_field(server):
    cases = [
        ("/v1/completions", '{"prompt": "abc\\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt.1"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\ud83d"}]}]}',
            "messages.0.content.0.text",
        ),
        ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop.0"),
        ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("/tokenize", '{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages.0.content"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as h:  # one keep-alive connection for all
        for path, body, param in cases:
            r = h.post(path, content=body.encode(), headers={"content-type": "application/json"})
            err = assert_error(r, 400, param, ("surrogate",))
            assert err["code"] == "invalid_value"
            assert r.headers.get("connection") != "close"
            ok = h.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2})  # the same connection
            assert ok.status_code == 200
        # a surrogate pair is one valid character
        assert h.post("/tokenize", content=b'{"prompt": "\\ud83d\\ude42"}',
                      headers={"content-type": "application/json"}).status_code == 200  # fmt: skip


def test_a_huge_prompt_does_not_stall_other_streams(server):
    big = ("".join(TEXT) * 200)[:8_000_000]  # 8 MB
    # encoded up front: this process's own JSON work must not stall its measuring threads
    tokenize_body = json.dumps({"prompt": big, "add_special_tokens": False}).encode()
    complete_body = json.dumps({"prompt": big}).encode()
    chat_body = json.dumps({"messages": [{"role": "user", "content": big}]}).encode()
    js = {"content-type": "application/json"}
    gaps, health, done = [], [], threading.Event()

    def stream():  # streams one after another, for as long as the big prompt is in flight
        body = {
            "prompt": "The quick",
            "max_tokens": 250,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0,
        }
        with httpx.Client(base_url=server.url, timeout=120) as h:
            while not done.is_set():
                with h.stream("POST", "/v1/completions", json=body) as r:
                    last = None
                    for line in r.iter_lines():
                        now = time.monotonic()
                        if line and last is not None and not done.is_set():
                            gaps.append(now - last)
                        last = now

    def poll_health():
        with httpx.Client(base_url=server.url, timeout=60) as h:
            while not done.is_set():
                t = time.monotonic()
                assert h.get("/health").status_code == 200
                health.append(time.monotonic() - t)
                time.sleep(0.02)

    with httpx.Client(base_url=server.url, timeout=120) as h:
        threads = [threading.Thread(target=stream), threading.Thread(target=poll_health)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the stream is running
        try:
            t0 = time.monotonic()
            r = h.post("/tokenize", content=tokenize_body, headers=js)
            busy = time.monotonic() - t0
            # too long for the context whatever it tokenizes to: refused without tokenizing
            r_complete = h.post("/v1/completions", content=complete_body, headers=js)
            r_chat = h.post("/v1/chat/completions", content=chat_body, headers=js)
        finally:
            done.set()
            for t in threads:
                t.join(timeout=120)
    assert r.status_code == 200 and r.json()["count"] > 500_000
    err = assert_error(r_complete, 400, "prompt", ("characters",))
    assert err["code"] == "context_length_exceeded"
    assert_error(r_chat, 400, "messages")
    assert busy > 0.5  # the tokenizer did work for a while, during which:
    # a stalled event loop would hold a token (and /health) for the whole tokenization (`busy`); a slow
    # shared CPU alone makes a decode step ~0.3 s at worst
    assert gaps and max(gaps) < 0.5, sorted(gaps)[-5:]
    assert len(health) > 5 and max(health) < 0.5, sorted(health)[-5:]


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection, or fail if it is still open after `seconds`."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {seconds} s (got {got[:200]!r})")
    except ConnectionResetError:
        return got


def test_slow_clients_are_cut_off(server):
    host, port = "127.0.0.1", server.port
    silent = [socket.create_connection((host, port)) for _ in range(20)]
    trickle = [socket.create_connection((host, port)) for _ in range(20)]
    half = [socket.create_connection((host, port)) for _ in range(20)]
    for s in half:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
    stop = threading.Event()

    def drip():  # headers a byte every 0.2 s: never complete within the 1 s header timeout
        head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
        for i in range(len(head)):
            if stop.is_set():
                return
            for s in trickle:
                try:
                    s.send(head[i : i + 1])
                except OSError:
                    pass
            time.sleep(0.2)

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        for s in silent:
            assert _closed_within(s, 6) == b""
        for s in trickle:
            assert _closed_within(s, 6) == b""
        for s in half:
            reply = _closed_within(s, 6)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert b"request_timeout" in reply
    finally:
        stop.set()
        dripper.join()
        for s in silent + trickle + half:
            s.close()
    # an idle keep-alive connection is closed after its response (--timeout-keep-alive 1)
    with socket.create_connection((host, port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _closed_within(s, 6)
        assert reply.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in reply
    # and the server still serves
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and json.loads(r.text)["usage"]["completion_tokens"] >= 1
