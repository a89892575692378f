"""The HTTP server: an OpenAI-compatible API and a web chat page over the continuous-batching engine.

    lmforge serve runs/sft/final --port 8000 --api-key "$KEY" --lora reverse=runs/sft-lora/final

    from lmforge.serve import create_app, load_models
    app = create_app(load_models("runs/sft/final"), api_key=None)   # any ASGI server can run it

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
Server-Sent Events), POST /tokenize, POST /detokenize, GET /health, GET /metrics, GET / (the page).

Every error is `{"error": {"message", "type", "param", "code"}}`: 400 for invalid input (pydantic's
validation errors included, never FastAPI's 422), 401 without the API key, 404 for an unknown model or
path, 413 for an oversized body, 429 when the queue is full, 503 while shutting down, and 500 only for
a bug. A prompt that does not fit the context is a 400 with both numbers, never truncated.

The handlers run on the asyncio loop and only tokenize, validate and wait; all model work happens in
the scheduler's thread (scheduler.py). A client that disconnects cancels its request: streaming
responses are cancelled by Starlette when the connection drops, non-streaming ones are watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.serve import schema as S
from lmforge.serve.auth import APIKeyMiddleware, BodyLimitMiddleware, _TooLarge
from lmforge.serve.metrics import Metrics
from lmforge.serve.scheduler import Event, Failure, NotAccepting, QueueFull, Request, Scheduler, ServingEngine
from lmforge.utils import UserError

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"
_LONG_TEXT = 20_000  # characters; longer texts are tokenized off the event loop


# ------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}
_UNION_TAGS |= {name for name, v in vars(S).items() if isinstance(v, type) and issubclass(v, S.BaseModel)}


def _param(loc) -> str | None:
    """'messages.0.content' from pydantic's ('body', 'messages', 0, 'content', 'str')."""
    # Union members show up as tags ('str', 'list[int]', 'constrained-str', a model's name); field names
    # never hold '[' or '-'.
    parts = [
        str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or "-" in p or p in _UNION_TAGS))
    ]
    return ".".join(parts) or None


def _validation_message(errors) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if first.get("loc") == ("body",) and first.get("type") == "missing":
        return "the request body is missing: send a JSON object", None
    if tuple(first.get("loc", ())) == ("body",):
        return f"the request body must be a JSON object: {first.get('msg')}", None
    param = _param(first.get("loc", ()))
    msgs = []
    for e in errors:
        p = _param(e.get("loc", ()))
        m = f"{p}: {e.get('msg')}" if p else str(e.get("msg"))
        if m not in msgs:
            msgs.append(m)
    more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
    return "; ".join(msgs[:3]) + more, param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, _TooLarge):
            return error_response(
                413, "request body too large", "invalid_request_error", None, "request_too_large"
            )
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if status == 404:
            detail = f"no route {request.method} {request.url.path}"
        return error_response(
            status,
            detail,
            _STATUS_TYPES.get(status, "invalid_request_error"),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(UserError)
    async def _user(request, exc: UserError):
        return error_response(400, str(exc), "invalid_request_error", None, "invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            f"internal server error ({type(exc).__name__}); see the server log",
            "server_error",
            None,
            "internal_error",
        )


# ------------------------------------------------------------------------------------------- models
@dataclass
class ServedModel:
    """One model id: its weights behind an Engine (a LoRA adapter is a merged copy of the base)."""

    id: str
    engine: Engine
    tokenizer: object
    root: str
    parent: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context(self) -> int:
        return self.engine.max_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size


def load_models(
    checkpoint,
    *,
    device: str = "auto",
    dtype=None,
    max_batch: int = 8,
    model_name: str | None = None,
    loras: list[tuple[str, str]] = (),
) -> list[ServedModel]:
    """The base checkpoint plus one merged copy per LoRA adapter, each with an Engine of max_batch rows.

    Memory: every adapter costs a full copy of the weights plus its own KV cache of
    max_batch x context slots (adapters are merged, so decoding costs the same as the base).
    """
    import lmforge
    from lmforge.train.lora import is_adapter, load_lora_model

    if max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be >= 1")
    lm = lmforge.load(checkpoint, device=device, dtype=dtype)
    if lm.tokenizer is None:
        raise UserError(f"{checkpoint}: no tokenizer.json; serving needs the model's tokenizer")
    base_id = model_name or Path(checkpoint).resolve().name
    models = [
        ServedModel(
            base_id, ServingEngine(lm.model, lm.tokenizer, max_batch=max_batch), lm.tokenizer, str(checkpoint)
        )
    ]
    for name, adapter in loras:
        if not name or name in {m.id for m in models}:
            raise UserError(f"--lora {name}={adapter}: the model id {name!r} is empty or already taken")
        if not is_adapter(adapter):
            raise UserError(f"--lora {name}={adapter}: not a LoRA adapter directory (no adapter_config.json)")
        model = load_lora_model(adapter, base=checkpoint, device=lm.device, dtype=lm.dtype, merge=True).eval()
        models.append(
            ServedModel(
                name,
                ServingEngine(model, lm.tokenizer, max_batch=max_batch),
                lm.tokenizer,
                str(adapter),
                parent=base_id,
            )
        )
    return models


# ------------------------------------------------------------------------------------------- app
class _State:
    def __init__(self, models: list[ServedModel], scheduler: Scheduler, metrics: Metrics, max_batch: int):
        self.models = {m.id: m for m in models}
        self.default = models[0].id
        self.scheduler, self.metrics, self.max_batch = scheduler, metrics, max_batch

    def model(self, name: str | None) -> ServedModel:
        if name is None or name == "":
            return self.models[self.default]
        if name not in self.models:
            raise APIError(
                404,
                f"model {name!r} not found; available: {', '.join(self.models)}",
                "not_found_error",
                "model",
                "model_not_found",
            )
        return self.models[name]


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# Line separators that JSON leaves raw but that str.splitlines() (httpx's iter_lines, many SSE clients)
# splits on: escaped, so that one event stays one line.
_SPLITLINES = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _sse(obj) -> str:
    return f"data: {_json(obj).translate(_SPLITLINES)}\n\n"


async def _encode(tok, text: str, **kw) -> list[int]:
    if len(text) > _LONG_TEXT:  # the Rust tokenizer releases the GIL; keep the loop serving streams
        return await asyncio.to_thread(tok.encode, text, **kw)
    return tok.encode(text, **kw)


async def _encode_chat(tok, messages: list[dict]) -> list[int]:
    if sum(len(m["content"]) for m in messages) > _LONG_TEXT:
        return await asyncio.to_thread(tok.encode_chat, messages, True)
    return tok.encode_chat(messages, True)


def _sampling(body: S._Sampling, max_tokens: int, index: int) -> SamplingParams:
    """Per-sequence SamplingParams; sample i of a seeded request uses seed + i (so n samples differ)."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            # Below 1e-5, logits / T overflows float32: that is greedy decoding in all but name.
            temperature=1.0
            if body.temperature is None
            else (body.temperature if body.temperature >= 1e-5 else 0.0),
            top_k=body.top_k if body.top_k and body.top_k > 0 else None,
            top_p=1.0 if body.top_p is None else body.top_p,
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=None if body.seed is None else (body.seed + index) % 2**64,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
        )
    except UserError as e:  # "name=value: why"
        name = str(e).split("=", 1)[0]
        name = {"max_new_tokens": "max_tokens", "num_samples": "n"}.get(name, name)
        raise APIError(400, str(e), param=name, code="invalid_value") from None


def _check_fits(
    m: ServedModel, prompts: list[list[int]], max_tokens: int | None, what: str, max_param: str
) -> int:
    """max_tokens, or the room the longest prompt leaves; 400 with both numbers when it does not fit."""
    longest = max(len(p) for p in prompts)
    ctx = m.context
    if longest >= ctx:
        raise APIError(
            400,
            f"{what} of {longest} tokens does not fit the model's context of {ctx} tokens "
            "(it must leave room for at least one generated token); shorten it",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        return ctx - longest
    if longest + max_tokens > ctx:
        raise APIError(
            400,
            f"{what} of {longest} tokens + {max_param}={max_tokens} = {longest + max_tokens} "
            f"tokens exceeds the model's context of {ctx} tokens; shorten the {what} or lower "
            f"{max_param} (at most {ctx - longest})",
            param=max_param,
            code="context_length_exceeded",
        )
    return max_tokens


def _check_ids(m: ServedModel, ids: list[int], param: str) -> None:
    bad = [i for i in ids if i >= m.vocab_size]
    if bad:
        raise APIError(
            400,
            f"{param}: token id {bad[0]} is outside the vocabulary (0..{m.vocab_size - 1})",
            param=param,
            code="invalid_value",
        )


def _submit(
    state: _State,
    m: ServedModel,
    prompts: list[list[int]],
    body: S._Sampling,
    max_tokens: int,
    arrival: float,
) -> Request:
    n = body.n
    seq_prompts = [p for p in prompts for _ in range(n)]
    if len(seq_prompts) > state.max_batch:
        raise APIError(
            400,
            f"n={n} x {len(prompts)} prompt(s) = {len(seq_prompts)} sequences exceeds the "
            f"server's --max-batch {state.max_batch}",
            param="n",
            code="invalid_value",
        )
    params = [_sampling(body, max_tokens, j) for _ in prompts for j in range(n)]
    req = Request(m.id, seq_prompts, params, loop=asyncio.get_running_loop(), created=arrival)
    try:
        state.scheduler.submit(req)
    except QueueFull as e:
        raise APIError(429, str(e), "rate_limit_error", None, "queue_full") from None
    except NotAccepting as e:
        raise APIError(503, str(e), "service_unavailable", None, "unavailable") from None
    return req


async def _watch_disconnect(http: HTTPRequest, req: Request) -> None:
    """Cancel `req` when the client of a non-streaming request goes away."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            req.cancel()
            return


async def _collect(http: HTTPRequest, req: Request) -> tuple[list[str], list[str | None], list[int]]:
    k = len(req.prompts)
    texts, reasons, tokens = [""] * k, [None] * k, [0] * k
    watcher = asyncio.create_task(_watch_disconnect(http, req))
    try:
        async for events in req:
            for ev in events:
                if isinstance(ev, Failure):
                    if ev.internal:
                        raise APIError(500, ev.message, "server_error", None, "internal_error")
                    raise APIError(503, ev.message, "service_unavailable", None, "unavailable")
                texts[ev.index] += ev.text
                tokens[ev.index] = ev.tokens
                reasons[ev.index] = ev.finish_reason or reasons[ev.index]
    finally:
        watcher.cancel()
        req.cancel()
    if req.cancelled and not all(reasons):
        raise APIError(503, "the request was cancelled", "service_unavailable", None, "cancelled")
    return texts, reasons, tokens


def _usage(prompts: list[list[int]], n: int, tokens: list[int]) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _stream(
    req: Request, header: dict, kind: str, prompts, n: int, include_usage: bool, echo: list[str] | None = None
):
    """SSE body: role chunks (chat), content deltas, finish_reason chunks, optional usage, [DONE]."""
    k = len(req.prompts)
    tokens = [0] * k
    with_usage = {"usage": None} if include_usage else {}

    def chunk(choices) -> str:
        return _sse({**header, "choices": choices, **with_usage})

    def choice(i, text=None, role=False, finish=None):
        if kind == "chat":
            delta = (
                {"role": "assistant", "content": ""}
                if role
                else ({"content": text} if text is not None else {})
            )
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

    try:
        if kind == "chat":
            yield "".join(chunk([choice(i, role=True)]) for i in range(k))
        elif echo:
            yield "".join(chunk([choice(i, echo[i // n])]) for i in range(k))
        async for events in req:
            parts = []
            for ev in events:
                if isinstance(ev, Failure):
                    err_type = "server_error" if ev.internal else "service_unavailable"
                    yield _sse(
                        {"error": {"message": ev.message, "type": err_type, "param": None, "code": None}}
                    )
                    return
                tokens[ev.index] = ev.tokens
                if ev.text:
                    parts.append(chunk([choice(ev.index, ev.text)]))
                if ev.finish_reason:
                    parts.append(
                        chunk([choice(ev.index, "" if kind != "chat" else None, finish=ev.finish_reason)])
                    )
            if parts:
                yield "".join(parts)
        if req.cancelled:
            return
        if include_usage:
            yield _sse({**header, "choices": [], "usage": _usage(prompts, n, tokens)})
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()  # a no-op when it finished; frees the rows when the client went away


class _SSEResponse(StreamingResponse):
    """A text/event-stream response that cancels its request however the response ends (even when the
    client goes away before the body generator ever ran, so its `finally` never does)."""

    def __init__(self, gen, req: Request):
        super().__init__(
            gen,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._req = req

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._req.cancel()


_ERRORS = {
    400: {"model": S.ErrorResponse, "description": "invalid request"},
    401: {"model": S.ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": S.ErrorResponse, "description": "unknown model"},
    429: {"model": S.ErrorResponse, "description": "queue full"},
    503: {"model": S.ErrorResponse, "description": "shutting down"},
}


def create_app(
    models: list[ServedModel],
    *,
    api_key: str | None = None,
    max_queue: int = 256,
    cors_origins: list[str] = (),
    drain_timeout: float = 30.0,
    max_body_bytes: int = 8 << 20,
    stall_timeout: float = 120.0,
) -> FastAPI:
    """The ASGI app serving `models` (the first is the default). Starts its engine loop on startup and
    drains it on shutdown (lifespan)."""
    if not models:
        raise UserError("nothing to serve")
    if max_queue < 1:
        raise UserError(f"--max-queue {max_queue}: must be >= 1")
    metrics = Metrics()
    scheduler = Scheduler(
        {m.id: m.engine for m in models}, max_queue=max_queue, metrics=metrics, stall_timeout=stall_timeout
    )
    state = _State(models, scheduler, metrics, max_batch=min(len(m.engine.rows) for m in models))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop, drain_timeout)

    app = FastAPI(
        title="lmforge",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible API of lmforge serve. See docs/serving.md.",
    )
    app.state.lmforge = state
    _install_error_handlers(app)

    # ------------------------------------------------------------------ routes
    @app.get("/v1/models", response_model=S.ModelList, responses=_ERRORS)
    async def list_models():
        return {"object": "list", "data": [_card(m) for m in state.models.values()]}

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard, responses=_ERRORS)
    async def get_model(model_id: str):
        return _card(state.model(model_id))

    def _card(m: ServedModel) -> dict:
        return {
            "id": m.id,
            "object": "model",
            "created": m.created,
            "owned_by": "lmforge",
            "root": m.root,
            "parent": m.parent,
            "max_model_len": m.context,
        }

    @app.post("/v1/completions", responses={200: {"model": S.CompletionResponse}, **_ERRORS})
    async def completions(body: S.CompletionRequest, http: HTTPRequest):
        arrival = time.monotonic()
        m = state.model(body.model)
        _reject_unsupported(body)
        tok = m.tokenizer
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        if isinstance(p[0], int):
            p = [p]
        echo_texts = None
        if isinstance(p[0], str):
            bos = tok.bos_id is not None  # as lm.generate: documents were trained as BOS + text
            prompts = [await _encode(tok, x, bos=bos) for x in p]
            echo_texts = list(p) if body.echo else None
        else:
            prompts = [list(x) for x in p]
            for x in prompts:
                _check_ids(m, x, "prompt")
            echo_texts = [tok.decode(x, skip_special=True) for x in prompts] if body.echo else None
        max_tokens = _check_fits(m, prompts, body.max_tokens, "prompt", "max_tokens")
        req = _submit(state, m, prompts, body, max_tokens, arrival)
        header = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": m.id,
        }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _SSEResponse(_stream(req, header, "text", prompts, body.n, include_usage, echo_texts), req)
        texts, reasons, tokens = await _collect(http, req)
        n = body.n
        choices = [
            {
                "index": i,
                "text": (echo_texts[i // n] if echo_texts else "") + t,
                "logprobs": None,
                "finish_reason": r,
            }
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
        return JSONResponse({**header, "choices": choices, "usage": _usage(prompts, n, tokens)})

    @app.post("/v1/chat/completions", responses={200: {"model": S.ChatCompletionResponse}, **_ERRORS})
    async def chat_completions(body: S.ChatCompletionRequest, http: HTTPRequest):
        arrival = time.monotonic()
        m = state.model(body.model)
        _reject_unsupported(body)
        ids = await _chat_ids(m, body.messages)
        limit, limit_name = body.max_completion_tokens, "max_completion_tokens"
        if limit is None and body.max_tokens is not None:
            limit, limit_name = body.max_tokens, "max_tokens"
        max_tokens = _check_fits(m, [ids], limit, "messages", limit_name)
        req = _submit(state, m, [ids], body, max_tokens, arrival)
        header = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": m.id,
        }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return _SSEResponse(_stream(req, header, "chat", [ids], body.n, include_usage), req)
        texts, reasons, tokens = await _collect(http, req)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons))
        ]
        return JSONResponse(
            {
                **header,
                "object": "chat.completion",
                "choices": choices,
                "usage": _usage([ids], body.n, tokens),
            }
        )

    async def _chat_ids(m: ServedModel, messages: list[S.ChatMessage]) -> list[int]:
        msgs = [
            {"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in messages
        ]
        try:
            return await _encode_chat(m.tokenizer, msgs)  # the template writes BOS itself: no double BOS
        except UserError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None

    def _reject_unsupported(body) -> None:
        bad = S.unsupported(body)
        if bad:
            raise APIError(400, bad[1], param=bad[0], code="unsupported_parameter")

    @app.post("/tokenize", response_model=S.TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: S.TokenizePrompt | S.TokenizeChat):
        """Token ids of a prompt (as /v1/completions encodes it) or of messages (as chat does)."""
        m = state.model(body.model)
        if isinstance(body, S.TokenizePrompt):
            bos = body.add_special_tokens and m.tokenizer.bos_id is not None
            ids = await _encode(m.tokenizer, body.prompt, bos=bos)
        else:
            msgs = [
                {"role": "system" if x.role == "developer" else x.role, "content": x.text()}
                for x in body.messages
            ]
            try:
                text = m.tokenizer.apply_chat_template(msgs, body.add_generation_prompt)
            except UserError as e:
                raise APIError(400, str(e), param="messages", code="invalid_value") from None
            ids = await _encode(m.tokenizer, text)
        return {"count": len(ids), "max_model_len": m.context, "tokens": ids}

    @app.post("/detokenize", response_model=S.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: S.DetokenizeRequest):
        m = state.model(body.model)
        _check_ids(m, body.tokens, "tokens")
        return {"prompt": m.tokenizer.decode(body.tokens)}

    @app.get("/health", response_model=S.HealthResponse, responses={503: {"model": S.ErrorResponse}})
    async def health():
        if not scheduler.alive:
            reason = scheduler.error or ("stopped" if scheduler.accepting else "shutting down")
            raise APIError(
                503, f"the engine loop is not running: {reason}", "service_unavailable", None, "unavailable"
            )
        if not scheduler.accepting:
            raise APIError(503, "shutting down", "service_unavailable", None, "unavailable")
        if scheduler.stalled:
            raise APIError(
                503,
                f"the engine loop made no progress for {scheduler.stall_timeout:.0f} s",
                "service_unavailable",
                None,
                "stalled",
            )
        running, waiting = scheduler.counts()
        return {"status": "ok", "models": list(state.models), "running": running, "waiting": waiting}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi():
        """FastAPI documents a 422 for every body; this server answers validation errors with 400."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    # Outermost last: CORS answers preflights before the key check; the body limit runs first of all.
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            max_age=600,
        )
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    return app


__all__ = ["APIError", "Event", "ServedModel", "create_app", "load_models", "serve"]


def serve(
    checkpoint,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 256,
    cors_origins: list[str] = (),
    loras: list[tuple[str, str]] = (),
    device: str = "auto",
    dtype=None,
    model_name: str | None = None,
    drain_timeout: float = 30.0,
    log_level: str = "info",
) -> None:
    """`lmforge serve`: load the model(s), then run uvicorn until SIGINT/SIGTERM; on a signal, stop taking
    new requests (503, /health too), let running ones finish (at most drain_timeout s), exit."""
    import uvicorn

    if max_queue < 1:  # checked again by create_app; here before the (slow) model loading
        raise UserError(f"--max-queue {max_queue}: must be >= 1")
    models = load_models(
        checkpoint, device=device, dtype=dtype, max_batch=max_batch, model_name=model_name, loras=loras
    )
    app = create_app(
        models, api_key=api_key, max_queue=max_queue, cors_origins=cors_origins, drain_timeout=drain_timeout
    )
    scheduler: Scheduler = app.state.lmforge.scheduler

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.begin_drain()  # new requests get 503 while the running ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout
    )
    m0 = models[0]
    print(
        f"serving {', '.join(m.id for m in models)} ({m0.engine.model.num_params():,} parameters, context "
        f"{m0.context}, {max_batch} rows per model) on http://{host}:{port}",
        flush=True,
    )
    _Server(config).run()
