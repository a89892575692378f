"""POST /v1/chat/completions: messages in, an assistant message out (text, or tool calls).

The messages (roles system/developer/user/assistant/tool; assistant messages may carry tool_calls and
tool messages answer them by tool_call_id) are rendered by the model's own chat template, with `tools`
when given, so the model sees its functions as it was trained to. Its answer is parsed for tool calls in
the format the template teaches (tools.py): found ones become `message.tool_calls` with
`finish_reason: "tool_calls"`. `tool_choice`: auto (default with tools) lets the model choose, none
renders no tools, required / a named function forces one well-formed call through the grammar.
`logprobs` + `top_logprobs` give OpenAI's `choices[].logprobs.content[]`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from lmforge.serve import schema as S
from lmforge.serve import serving as V
from lmforge.serve import tools as T
from lmforge.serve.errors import ERRORS, APIError
from lmforge.utils import UserError

router = APIRouter()


async def render(
    m: V.ServedModel,
    messages: list[S.ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[S.Tool] | None = None,
    template_kwargs: dict | None = None,
) -> str:
    """The conversation as the model's chat template writes it (400 when it cannot)."""
    msgs = [x.for_template() for x in messages]
    V.check_chars(m, sum(len(x["content"]) for x in msgs), "messages")
    kw = dict(template_kwargs or {})
    if tools:
        kw["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    try:
        return m.tokenizer.apply_chat_template(msgs, add_generation_prompt, **kw)
    except UserError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    except TypeError as e:  # a tokenizer whose template function takes no tools / kwargs
        param = "tools" if tools else "chat_template_kwargs"
        raise APIError(
            400, f"{param}: this tokenizer cannot render it ({e})", param=param, code="unsupported_parameter"
        ) from None


def _tool_plan(m: V.ServedModel, body: S.ChatCompletionRequest):
    """(tools to render, format, forced prefix, forced grammar) for the request's tools / tool_choice."""
    if not body.tools or body.tool_choice == "none":
        return None, None, "", None
    tok = m.tokenizer
    # The template that renders tools (a tokenizer may keep a separate "tool_use" one).
    template = tok.template_for(body.tools)
    fmt = T.detect(template)
    if fmt is None:
        raise APIError(
            400,
            "tools: this model's chat template does not render tools (no tool-call format found in it); "
            "serve a model whose template takes tools, or leave tools out",
            param="tools",
            code="unsupported_parameter",
        )
    choice = body.tool_choice
    if choice == "required" or isinstance(choice, S.NamedToolChoice):
        name = choice.function.name if isinstance(choice, S.NamedToolChoice) else None
        prefix, schema = T.forced(fmt, body.tools, name)
        from lmforge.infer.grammar import Grammar

        try:
            grammar = Grammar.json_schema(schema, strict=True)
        except Exception as e:  # a parameters schema the grammar library refuses
            raise APIError(
                400,
                f"tools: cannot enforce this function's parameters schema: {e}",
                param="tools",
                code="invalid_value",
            ) from None
        return body.tools, fmt, prefix, grammar
    return body.tools, fmt, "", None


@router.post("/v1/chat/completions", response_model=S.ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: S.ChatCompletionRequest, http: HTTPRequest):
    arrival = time.monotonic()
    state = V.state_of(http)
    m = state.model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    tools, fmt, prefix, grammar = _tool_plan(m, body)
    text = await render(m, body.messages, True, tools, body.chat_template_kwargs)
    ids = await V.encode_text(m.tokenizer, text)
    if prefix:
        ids += m.tokenizer.encode(prefix, bos=False)
    limit, limit_name = body.max_completion_tokens, "max_completion_tokens"
    if limit is None and body.max_tokens is not None:
        limit, limit_name = body.max_tokens, "max_tokens"
    max_tokens = V.check_fits(m, [ids], limit, "messages", limit_name)
    n_lp = (body.top_logprobs or 0) if body.logprobs else None
    params = V.sampling_params(body, m, 1, max_tokens, logprobs=n_lp, grammar=grammar)
    req = V.submit(state, m, [ids] * body.n, params, arrival)
    head = V.header("chat.completion", m)
    names = V.TokenNames(m.tokenizer, body.return_tokens_as_token_ids)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        parsers = [T.StreamParser(fmt, prefix) if fmt else None for _ in range(body.n)]
        called = [0] * body.n

        def first():
            return [_delta(i, {"role": "assistant", "content": ""}) for i in range(body.n)]

        def on_events(i, evs):
            out = []
            new = "".join(e.text for e in evs)
            entries = [x for e in evs for x in e.logprobs]
            finish = next((e.finish_reason for e in evs if e.finish_reason), None)
            content = parsers[i].push(new) if parsers[i] else new
            lps = (
                {"content": [x.model_dump() for x in V.chat_logprobs(names, entries, n_lp)]}
                if entries
                else None
            )
            if content or lps:
                out.append(_delta(i, {"content": content} if content else {}, lps))
            if finish:
                if parsers[i]:
                    rest, calls = parsers[i].finish()
                    if rest:
                        out.append(_delta(i, {"content": rest}))
                    for c in calls:
                        k = called[i]
                        called[i] += 1
                        start = {
                            "index": k,
                            "id": T.new_id(fmt),
                            "type": "function",
                            "function": {"name": c.name, "arguments": ""},
                        }
                        out.append(_delta(i, {"tool_calls": [start]}))
                        out.append(
                            _delta(i, {"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]})
                        )
                    if calls:
                        finish = "tool_calls"
                out.append(_delta(i, {}, finish=finish))
            return out

        head = {**head, "object": "chat.completion.chunk"}
        return V.SSEResponse(V.stream(req, head, [ids], include_usage, first, on_events), req)

    outs = await V.collect(http, req)
    choices = []
    for i, o in enumerate(outs):
        content, calls = T.parse(fmt, prefix + o.text) if fmt else (o.text, [])
        if not calls:
            content = o.text
        msg = S.AssistantMessage(
            content=content,
            tool_calls=[
                S.ResponseToolCall(
                    id=T.new_id(fmt), function=S.ResponseFunctionCall(name=c.name, arguments=c.arguments)
                )
                for c in calls
            ]
            or None,
        )
        lps = S.ChatLogprobs(content=V.chat_logprobs(names, o.logprobs, n_lp)) if n_lp is not None else None
        finish = "tool_calls" if calls else o.finish_reason
        choices.append(S.ChatChoice(index=i, message=msg, logprobs=lps, finish_reason=finish))
    return S.ChatCompletionResponse(**head, choices=choices, usage=V.usage([ids], [o.tokens for o in outs]))


def _delta(i: int, delta: dict, lps: dict | None = None, finish: str | None = None) -> dict:
    return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": finish}
