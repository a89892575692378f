"""The OpenAI-compatible API end to end: a real `lmforge serve` subprocess, the official openai client, raw
HTTP for the error cases. Greedy output over HTTP must equal lm.generate in-process."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from serve_helpers import adapter_server, assert_error, lm, metric, serve_ckpt  # noqa: F401

from lmforge.lm import LM
from lmforge.train.lora import load_lora_model

KEY = "sk-test-key"
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "How does continuous batching work?"}]


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):  # noqa: F811
    log_dir = tmp_path_factory.mktemp("serve_api")
    with adapter_server(serve_ckpt, KEY, "--max-queue", "2", "--model-name", "base", log_dir=log_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _http(server, key=KEY) -> httpx.Client:
    return httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60
    )


def test_models(client, serve_ckpt):  # noqa: F811
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"base", "ft"}
    assert client.models.retrieve("ft").model_extra["parent"] == "base"
    assert ids["base"].model_extra["max_model_len"] == 256


def test_completion_greedy_equals_generate(client, lm):  # noqa: F811
    want = lm.generate(PROMPT, max_new_tokens=24, temperature=0)
    r = client.completions.create(model="base", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == want
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(lm.tokenizer.encode(PROMPT, bos=True))
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    stream = client.completions.create(model="base", prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_chat_greedy_equals_generate_without_double_bos(client, lm, server):  # noqa: F811
    tok = lm.tokenizer
    ids = tok.encode_chat(CHAT, add_generation_prompt=True)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    out = lm.generate(ids, max_new_tokens=30, temperature=0)
    want = tok.decode(out, skip_special=True)
    r = client.chat.completions.create(model="base", messages=CHAT, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model="base", messages=CHAT, max_completion_tokens=30, temperature=0)
    assert r2.choices[0].message.content == want
    with _http(server) as h:
        t = h.post("/tokenize", json={"model": "base", "messages": CHAT}).json()
    assert t["tokens"] == ids and t["count"] == len(ids)


def test_chat_stream_shape(client, lm, server):  # noqa: F811
    """Role first, content deltas, a finish_reason chunk, the usage chunk, then [DONE]."""
    body = {
        "model": "base",
        "messages": CHAT,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    with _http(server) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "length" and finish["delta"] == {}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert all(c["usage"] is None for c in chunks[:-1])
    # the same through the openai client
    s = client.chat.completions.create(
        model="base",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    got, last = "", None
    for c in s:
        last = c
        if c.choices:
            got += c.choices[0].delta.content or ""
    assert got == text and last.usage.completion_tokens == 12


def test_n_and_seed(client):
    kw = dict(
        model="base", prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    texts = [x.text for x in sorted(a.choices, key=lambda x: x.index)]
    assert [x.index for x in sorted(a.choices, key=lambda x: x.index)] == [0, 1]
    assert texts == [x.text for x in sorted(b.choices, key=lambda x: x.index)]  # same seed, same samples
    assert texts[0] != texts[1]  # n samples differ
    assert texts != [x.text for x in sorted(c.choices, key=lambda x: x.index)]
    assert a.usage.completion_tokens == 32
    # streaming chat with n=2: every index gets its role chunk, text and finish_reason
    s = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=8, n=2, seed=3, stream=True, extra_body={"ignore_eos": True}
    )
    got, finish = {0: "", 1: ""}, {}
    for ch in s:
        for x in ch.choices:
            got[x.index] += x.delta.content or ""
            if x.finish_reason:
                finish[x.index] = x.finish_reason
    assert finish == {0: "length", 1: "length"}
    r = client.chat.completions.create(
        model="base", messages=CHAT, max_tokens=8, n=2, seed=3, extra_body={"ignore_eos": True}
    )
    assert {x.index: x.message.content for x in r.choices} == got  # streamed == not streamed, same seed


def test_stop_strings(client):
    full = (
        client.completions.create(
            model="base", prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = full[12:15]
    assert len(stop) == 3
    want = full[: full.find(stop)]
    r = client.completions.create(
        model="base",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stop=[stop, "\x00never"],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = client.completions.create(
        model="base",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stop=stop,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_lora_model(client, serve_ckpt, lm):  # noqa: F811
    ckpt, adapter = serve_ckpt
    merged = LM(load_lora_model(adapter, base=ckpt, merge=True).eval(), lm.tokenizer)
    want = merged.generate(PROMPT, max_new_tokens=20, temperature=0, ignore_eos=True)
    base = lm.generate(PROMPT, max_new_tokens=20, temperature=0, ignore_eos=True)
    assert want != base
    r = client.completions.create(
        model="ft", prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want and r.model == "ft"


def test_tokenize_detokenize(server, lm):  # noqa: F811
    with _http(server) as h:
        t = h.post("/tokenize", json={"prompt": "Hello world"}).json()
        assert t["tokens"] == lm.tokenizer.encode("Hello world", bos=True) and t["max_model_len"] == 256
        t2 = h.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
        assert t2["tokens"] == t["tokens"][1:]
        assert h.post("/detokenize", json={"tokens": t2["tokens"]}).json() == {"prompt": "Hello world"}
        assert_error(h.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
        assert_error(h.post("/tokenize", json={}), 400, "prompt")


def test_auth(server):
    with _http(server, key=None) as h:
        assert h.get("/health").status_code == 200
        assert h.get("/").status_code == 200 and "<html" in h.get("/").text
        assert h.get("/static/app.js").status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            assert_error(h.get(path), 401)
        err = assert_error(h.post("/v1/completions", json={"prompt": "x"}), 401)
        assert err["type"] == "authentication_error"
    with _http(server, key="sk-wrong") as h:
        assert_error(h.post("/v1/chat/completions", json={"messages": CHAT}), 401, in_message=("invalid",))
    with httpx.Client(base_url=server.url, headers={"Authorization": KEY}) as h:  # no "Bearer"
        assert_error(h.get("/v1/models"), 401)


def test_errors(server):
    with _http(server) as h:
        bad = [
            ({"prompt": "x", "temperature": -1}, "temperature"),
            ({"prompt": "x", "top_p": 1.5}, "top_p"),
            ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
            ({"prompt": "x", "n": 0}, "n"),
            ({"prompt": "x", "n": 5}, "n"),  # more than --max-batch 4
            ({"prompt": "x", "min_p": 2}, "min_p"),
            ({"prompt": "x", "stop": 3}, "stop"),
            ({"prompt": []}, "prompt"),
            ({"prompt": [[1, 2], []]}, "prompt"),
            ({"prompt": [10**9]}, "prompt"),
            ({"prompt": "x", "logprobs": 21}, "logprobs"),  # at most 20
            ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),  # OpenAI's [-2, 2]
            ({"prompt": "x", "logit_bias": {"7": 101}}, "logit_bias.7"),
            ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
            ({}, "prompt"),
        ]
        for body, param in bad:
            assert_error(h.post("/v1/completions", json=body), 400, param)
        chat_bad = [
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
            ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),  # no tool_call_id
            ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools.0.function"),
            ({"messages": CHAT, "tool_choice": "auto"}, "tool_choice"),  # without tools
            ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
            ({"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
        ]
        for body, param in chat_bad:
            assert_error(h.post("/v1/chat/completions", json=body), 400, param)
        assert_error(
            h.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
            400,
            None,
            ("JSON",),
        )
        assert_error(h.post("/v1/completions", json=[1, 2]), 400, None)
        # too long for the context: both numbers, never truncated
        long = "word " * 400
        n = len(h.post("/tokenize", json={"prompt": long}).json()["tokens"])
        err = assert_error(h.post("/v1/completions", json={"prompt": long}), 400, "prompt", (str(n), "256"))
        assert err["code"] == "context_length_exceeded"
        assert_error(
            h.post("/v1/completions", json={"prompt": "x", "max_tokens": 255}),
            400,
            "max_tokens",
            ("255", "256"),
        )
        msgs = [{"role": "user", "content": long}]
        n_chat = h.post("/tokenize", json={"messages": msgs}).json()["count"]
        assert_error(
            h.post("/v1/chat/completions", json={"messages": msgs}), 400, "messages", (str(n_chat), "256")
        )
        # unknown model and route
        err = assert_error(h.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}), 404, "model")
        assert err["code"] == "model_not_found"
        assert_error(h.get("/v1/models/gpt-4"), 404)
        assert_error(h.get("/v2/nothing"), 404)
        assert_error(h.delete("/v1/completions"), 405)


def test_queue_full_is_429(server):
    """--max-batch 4 --max-queue 2: of 10 simultaneous long requests, 6 are taken and the rest get 429."""

    async def one(h):
        return await h.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 250, "ignore_eos": True, "temperature": 0}
        )

    async def burst():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as h:
            return await asyncio.gather(*[one(h) for _ in range(10)])

    rs = asyncio.run(burst())
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 429} and codes.count(200) >= 6 and 429 in codes, codes
    err = assert_error(next(r for r in rs if r.status_code == 429), 429)
    assert err["code"] == "queue_full"
    assert next(r for r in rs if r.status_code == 429).headers["retry-after"] == "1"
    assert all(r.json()["usage"]["completion_tokens"] == 250 for r in rs if r.status_code == 200)
    with _http(server) as h:
        assert metric(h.get("/metrics").text, "lmforge_requests_rejected_total") == codes.count(429)


def test_health_and_metrics(server, client):
    client.completions.create(model="base", prompt=PROMPT, max_tokens=5)
    with _http(server) as h:
        health = h.get("/health").json()
        assert health["status"] == "ok" and health["models"] == ["base", "ft"]
        r = h.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "lmforge_requests_running",
        "lmforge_requests_waiting",
        "lmforge_time_to_first_token_seconds_count",
        "lmforge_inter_token_latency_seconds_count",
        "lmforge_e2e_request_latency_seconds_count",
        "lmforge_prompt_tokens_total",
        "lmforge_generation_tokens_total",
    ):
        assert f"{name}{{" in text, name
    assert metric(text, "lmforge_time_to_first_token_seconds_count", model="base") >= 1
    assert metric(text, "lmforge_inter_token_latency_seconds_count", model="base") >= 1
    assert metric(text, "lmforge_generation_tokens_total", model="base") >= 5
    assert metric(text, "lmforge_requests_running") == 0 and metric(text, "lmforge_requests_waiting") == 0


def test_chat_content_parts_and_developer_role(client, lm):  # noqa: F811
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "How does "}, {"type": "text", "text": "it work?"}],
        },
    ]
    ids = lm.tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How does it work?"}],
        add_generation_prompt=True,
    )
    r = client.chat.completions.create(model="base", messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)


def test_sse_events_stay_one_line(server):
    """Text with U+2028, U+2029 and U+0085 (line breaks to str.splitlines) still streams one event per
    line, so httpx's iter_lines and similar clients parse every event."""
    prompt = "a\u2028b\u2029c\x85d"
    body = {"prompt": prompt, "echo": True, "max_tokens": 3, "stream": True, "temperature": 0}
    with _http(server) as h, h.stream("POST", "/v1/completions", json=body) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["text"] == prompt
