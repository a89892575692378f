"""The application features of the API against a real server with the official openai client: logprobs
equal a naive full forward pass (completions and chat, streamed and not, echo scoring the prompt),
grammar-constrained output validates (chat.completions.parse with a pydantic model, json_schema on both
endpoints, guided_choice / guided_regex, batched with free rows), penalties and logit_bias follow
OpenAI's formula (a hand-computed greedy loop)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from serve_helpers import Server, assert_error, lm, serve_ckpt  # noqa: F401

pytestmark = pytest.mark.timeout(600)
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "How does continuous batching work?"}]


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):  # noqa: F811
    with Server(
        serve_ckpt[0],
        "--max-batch",
        "4",
        "--model-name",
        "tiny",
        log_dir=tmp_path_factory.mktemp("serve_features"),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _ids(tokens: list[str]) -> list[int]:
    """Token ids from return_tokens_as_token_ids names ("token_id:17")."""
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.split(":", 1)[1]) for t in tokens]


def _naive(lm, ids: list[int]) -> torch.Tensor:  # noqa: F811
    """Log-softmax of one full forward pass over ids: (T, V), row t predicts token t + 1."""
    with torch.no_grad():
        return lm([ids])[0].float().log_softmax(-1)


def _sse(server, path: str, body: dict) -> list[dict]:
    with httpx.Client(base_url=server.url, timeout=120) as h, h.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(x[6:]) for x in lines[:-1]]


# ------------------------------------------------------------------------------------------- logprobs
def test_completion_logprobs_equal_a_forward_pass(client, server, lm):  # noqa: F811
    prompt_ids = lm.tokenizer.encode_prompt(PROMPT)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3, echo=True)
    extra = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    r = client.completions.create(**kw, extra_body=extra)
    lp = r.choices[0].logprobs
    ids = _ids(lp.tokens)
    P = len(prompt_ids)
    assert ids[:P] == prompt_ids and len(ids) == P + 10
    ref = _naive(lm, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    for t in range(1, len(ids)):
        assert abs(lp.token_logprobs[t] - ref[t - 1, ids[t]].item()) < 1e-4, t
        want_top = ref[t - 1].topk(3)
        top = {int(k.split(":")[1]): v for k, v in lp.top_logprobs[t].items()}
        for i, v in zip(want_top.indices.tolist(), want_top.values.tolist()):
            assert abs(top[i] - v) < 1e-4
    # greedy: each generated token is the argmax of the forward pass
    assert all(ids[t] == int(ref[t - 1].argmax()) for t in range(P, len(ids)))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # streamed: the same numbers, chunk by chunk
    body = {
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": 3,
        "echo": True,
        "stream": True,
        **extra,
    }
    chunks = _sse(server, "/v1/completions", body)
    s_tokens, s_lps = [], []
    for c in chunks:
        for ch in c["choices"]:
            if ch["logprobs"]:
                s_tokens += ch["logprobs"]["tokens"]
                s_lps += ch["logprobs"]["token_logprobs"]
    assert _ids(s_tokens) == ids
    assert s_lps[0] is None and all(abs(a - b) < 1e-5 for a, b in zip(s_lps[1:], lp.token_logprobs[1:]))
    # max_tokens 0 + echo: the scored prompt only (what lm-eval's loglikelihood asks for)
    r0 = client.completions.create(
        prompt=prompt_ids, max_tokens=0, echo=True, logprobs=1, model="tiny", extra_body=extra
    )
    lp0 = r0.choices[0].logprobs
    assert _ids(lp0.tokens) == prompt_ids and r0.usage.completion_tokens == 0
    assert all(abs(lp0.token_logprobs[t] - lp.token_logprobs[t]) < 1e-5 for t in range(1, P))
    assert r0.choices[0].text == lm.tokenizer.decode(prompt_ids, skip_special=True)


def test_chat_logprobs_equal_a_forward_pass(client, server, lm):  # noqa: F811
    ids = lm.tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    extra = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    r = client.chat.completions.create(
        messages=CHAT,
        model="tiny",
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=extra,
    )
    content = r.choices[0].logprobs.content
    gen = _ids([c.token for c in content])
    assert len(gen) == 8
    ref = _naive(lm, ids + gen)
    for j, c in enumerate(content):
        row = ref[len(ids) + j - 1]
        assert abs(c.logprob - row[gen[j]].item()) < 1e-4
        want = row.topk(2)
        assert _ids([t.token for t in c.top_logprobs]) == want.indices.tolist()
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(c.top_logprobs, want.values.tolist()))
    # bytes are the token's UTF-8 bytes (named by text here)
    r_text = client.chat.completions.create(
        messages=CHAT,
        model="tiny",
        max_tokens=8,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    pieces = r_text.choices[0].logprobs.content
    assert (
        b"".join(bytes(p.bytes) for p in pieces).decode("utf-8", "replace")
        == r_text.choices[0].message.content
    )
    # streamed
    s = client.chat.completions.create(
        messages=CHAT,
        model="tiny",
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body=extra,
    )
    streamed = [
        x for ch in s for c in ch.choices if c.logprobs and c.logprobs.content for x in c.logprobs.content
    ]
    assert [x.token for x in streamed] == [c.token for c in content]
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(streamed, content))


# ------------------------------------------------------------------------------------------- structured
class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have

    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


class Owner(BaseModel):  # nested objects
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have

    name: str = Field(max_length=12)
    pet: Pet


class Order(BaseModel):  # arrays of objects and enums
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have

    items: list[Pet] = Field(min_length=1, max_length=3)
    priority: Literal["low", "high"]


class Reading(BaseModel):  # numbers and arrays of scalars
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have

    values: list[int] = Field(max_length=4)
    unit: Literal["C", "F"]


def test_parse_with_a_pydantic_model_for_20_seeds(client):
    for seed in range(20):
        r = client.chat.completions.parse(
            messages=[{"role": "user", "content": "Describe a pet as JSON."}],
            model="tiny",
            response_format=Owner,
            seed=seed,
            max_tokens=200,
        )
        msg = r.choices[0].message
        assert isinstance(msg.parsed, Owner), (seed, msg.content)
        assert r.choices[0].finish_reason == "stop"


def test_json_schema_on_both_endpoints_batched_with_free_rows(server):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as h:
            jobs = []
            for k, schema in enumerate((Owner, Order, Reading)):
                fmt = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": schema.__name__,
                        "schema": schema.model_json_schema(),
                        "strict": True,
                    },
                }
                jobs.append(
                    h.post(
                        "/v1/chat/completions",
                        json={"messages": CHAT, "response_format": fmt, "n": 2, "seed": k, "max_tokens": 200},
                    )
                )
                jobs.append(
                    h.post(
                        "/v1/completions",
                        json={"prompt": "JSON:", "response_format": fmt, "seed": 10 + k, "max_tokens": 200},
                    )
                )
                # an unconstrained request in the same engine steps
                jobs.append(
                    h.post(
                        "/v1/completions",
                        json={"prompt": PROMPT, "max_tokens": 30, "seed": k, "ignore_eos": True},
                    )
                )
            return await asyncio.gather(*jobs)

    rs = asyncio.run(run())
    schemas = [Owner, Order, Reading]
    for j, r in enumerate(rs):
        assert r.status_code == 200, r.text
        body = r.json()
        schema = schemas[j // 3]
        if j % 3 == 0:
            texts = [c["message"]["content"] for c in body["choices"]]
        elif j % 3 == 1:
            texts = [body["choices"][0]["text"]]
        else:
            assert body["usage"]["completion_tokens"] == 30
            continue
        for t in texts:
            schema.model_validate_json(t)  # raises unless the output is valid for the schema
    # json_object: any JSON object (an untrained model may fill a string until max_tokens: every output
    # that ends by itself must parse, and some do)
    stopped = 0
    with httpx.Client(base_url=server.url, timeout=120) as h:
        for seed in range(6):
            r = h.post(
                "/v1/chat/completions",
                json={
                    "messages": CHAT,
                    "response_format": {"type": "json_object"},
                    "seed": seed,
                    "max_tokens": 60,
                },
            ).json()
            if r["choices"][0]["finish_reason"] == "stop":
                stopped += 1
                assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict)
    assert stopped >= 1


def test_guided_choice_and_regex(server):
    with httpx.Client(base_url=server.url, timeout=120) as h:
        for seed in range(4):
            r = h.post(
                "/v1/completions",
                json={
                    "prompt": PROMPT,
                    "guided_choice": ["yes", "no", "maybe"],
                    "seed": seed,
                    "max_tokens": 10,
                },
            ).json()
            assert r["choices"][0]["text"] in ("yes", "no", "maybe")
            r = h.post(
                "/v1/chat/completions",
                json={"messages": CHAT, "guided_regex": r"[0-9]{3}-[a-z]{2}", "seed": seed, "max_tokens": 20},
            ).json()
            import re

            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r["choices"][0]["message"]["content"])
        # streamed constrained output is the same text
        body = {
            "prompt": PROMPT,
            "guided_regex": r"(ab|cd){2,4}",
            "seed": 3,
            "max_tokens": 20,
            "stream": True,
        }
        text = "".join(c["choices"][0]["text"] for c in _sse(server, "/v1/completions", body) if c["choices"])
        assert __import__("re").fullmatch(r"(ab|cd){2,4}", text)
        # a bad grammar is a 400 naming the field
        assert_error(
            h.post("/v1/completions", json={"prompt": "x", "guided_regex": "(unclosed"}), 400, "guided_regex"
        )
        assert_error(
            h.post("/v1/completions", json={"prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}), 400
        )


# ------------------------------------------------------------------------------------------- penalties
def test_penalties_and_logit_bias_follow_openais_formula(client, lm):  # noqa: F811
    """Greedy decoding with presence/frequency penalties and a logit bias equals a hand-written loop:
    logit[t] + bias[t] - count[t] * frequency - (count[t] > 0) * presence, argmax."""
    prompt_ids = lm.tokenizer.encode_prompt(PROMPT)
    plain = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    first = _ids(plain.choices[0].logprobs.tokens)
    bias = {first[0]: -100.0, first[3]: 3.0}  # ban the first greedy token, push another
    for presence, frequency in ((0.8, 0.0), (0.0, 1.5), (1.0, 0.7)):
        r = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            logprobs=0,
            presence_penalty=presence,
            frequency_penalty=frequency,
            logit_bias={str(k): v for k, v in bias.items()},
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        got = _ids(r.choices[0].logprobs.tokens)
        ids, counts, want = list(prompt_ids), {}, []
        for _ in range(12):
            logits = _naive(lm, ids)[-1].clone()  # log-softmax = logits - const: the same argmax
            for t, b in bias.items():
                logits[t] += b
            for t, c in counts.items():
                logits[t] -= c * frequency + presence
            t = int(logits.argmax())
            want.append(t)
            counts[t] = counts.get(t, 0) + 1
            ids.append(t)
        assert got == want, (presence, frequency)
        assert got != first
        # logprobs stay the model's own (before penalties and bias)
        ref = _naive(lm, prompt_ids + got)
        assert abs(r.choices[0].logprobs.token_logprobs[0] - ref[len(prompt_ids) - 1, got[0]].item()) < 1e-4
