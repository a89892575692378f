"""POST /v1/completions: text (or token ids) in, text out; `logprobs: N` and `echo` score the tokens.

    {"prompt": "The capital of France is", "max_tokens": 8, "logprobs": 2}
    {"prompt": [[1, 523, 77]], "max_tokens": 0, "echo": true, "logprobs": 1}   # score a text (lm-eval)

With echo, the text starts with the prompt and, with logprobs, so do the logprobs: the prompt's first
token has None (nothing predicts it), every other one the model's log-probability given the tokens
before it. `max_tokens: 0` (echo only) returns the scored prompt and generates nothing.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from lmforge.serve import schema as S
from lmforge.serve import serving as V
from lmforge.serve.errors import ERRORS, APIError

router = APIRouter()


@router.post("/v1/completions", response_model=S.CompletionResponse, responses=ERRORS)
async def completions(body: S.CompletionRequest, http: HTTPRequest):
    arrival = time.monotonic()
    state = V.state_of(http)
    m = state.model(body.model)
    bad = S.unsupported(body)
    if bad:
        raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")
    tok = m.tokenizer
    p = body.prompt
    if isinstance(p, str):
        p = [p]
    if isinstance(p[0], int):
        p = [p]
    if isinstance(p[0], str):
        for x in p:
            V.check_chars(m, len(x), "prompt")
        prompts = [await V.encode_prompt(tok, x) for x in p]
        echo_texts = list(p)
    else:
        prompts = [list(x) for x in p]
        for x in prompts:
            V.check_ids(m, x, "prompt")
        echo_texts = [tok.decode(x, skip_special=True) for x in prompts]
    if not body.echo:
        echo_texts = None
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise APIError(
            400,
            "max_tokens: 0 generates nothing; it needs echo: true (to score the prompt)",
            param="max_tokens",
            code="invalid_value",
        )
    max_tokens = V.check_fits(m, prompts, 1 if score_only else body.max_tokens, "prompt", "max_tokens")
    n_lp = body.logprobs
    params = V.sampling_params(
        body,
        m,
        len(prompts),
        max_tokens,
        logprobs=n_lp,
        prompt_logprobs=n_lp if body.echo and n_lp is not None else None,
    )
    seq_prompts = [x for x in prompts for _ in range(body.n)]
    req = V.submit(state, m, seq_prompts, params, arrival)
    head = V.header("text_completion", m)
    names = V.TokenNames(tok, body.return_tokens_as_token_ids)
    n = body.n

    def echo_of(i: int) -> str:
        return echo_texts[i // n] if echo_texts else ""

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        builders = [V.CompletionLogprobBuilder(names, n_lp or 0) for _ in seq_prompts]
        echoed = [False] * len(seq_prompts)

        def first():
            if echo_texts and n_lp is None:  # with logprobs, the echo waits for the prompt's scores
                for i in range(len(seq_prompts)):
                    echoed[i] = True
                return [_choice(i, echo_of(i)) for i in range(len(seq_prompts))]
            return []

        def on_events(i, evs):
            out = []
            finish = next((e.finish_reason for e in evs if e.finish_reason), None)
            prompt_lp = next((e.prompt_logprobs for e in evs if e.prompt_logprobs is not None), None)
            text, lps = "", None
            if echo_texts and not echoed[i]:
                echoed[i] = True
                text = echo_of(i)
                if n_lp is not None:
                    lps = builders[i].build(prompt_lp or [], seq_prompts[i])
            if not score_only:
                text += "".join(e.text for e in evs)
                entries = [x for e in evs for x in e.logprobs]
                if n_lp is not None and entries:
                    more = builders[i].build(entries)
                    lps = more if lps is None else _concat(lps, more)
            if text or lps is not None:
                out.append(_choice(i, text, lps))
            if finish:
                out.append(_choice(i, "", finish="length" if score_only else finish))
            return out

        gen = V.stream(req, head, prompts, include_usage, first, on_events)
        return V.SSEResponse(gen, req)

    outs = await V.collect(http, req)
    choices = []
    for i, o in enumerate(outs):
        lps = None
        if n_lp is not None:
            b = V.CompletionLogprobBuilder(names, n_lp)
            lps = S.CompletionLogprobs()
            if echo_texts:
                lps = b.build(o.prompt_logprobs or [], seq_prompts[i])
            if not score_only:
                lps = _concat(lps, b.build(o.logprobs))
        text = echo_of(i) + ("" if score_only else o.text)
        finish = "length" if score_only else o.finish_reason
        choices.append(S.CompletionChoice(index=i, text=text, logprobs=lps, finish_reason=finish))
    tokens = [0 if score_only else o.tokens for o in outs]
    return S.CompletionResponse(**head, choices=choices, usage=V.usage(prompts, tokens))


def _choice(i: int, text: str, lps: S.CompletionLogprobs | None = None, finish: str | None = None) -> dict:
    return {
        "index": i,
        "text": text,
        "logprobs": None if lps is None else lps.model_dump(),
        "finish_reason": finish,
    }


def _concat(a: S.CompletionLogprobs, b: S.CompletionLogprobs) -> S.CompletionLogprobs:
    return S.CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )
