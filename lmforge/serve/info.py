"""The routes around generation: GET /v1/models, POST /tokenize and /detokenize, GET /health,
GET /metrics (Prometheus), GET / (the chat page)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, Response

from lmforge.serve import schema as S
from lmforge.serve import serving as V
from lmforge.serve.chat import render
from lmforge.serve.errors import ERRORS, APIError

STATIC = Path(__file__).parent / "static"
router = APIRouter()


@router.get("/v1/models", response_model=S.ModelList, responses=ERRORS)
async def list_models(http: HTTPRequest):
    return S.ModelList(data=[m.card() for m in V.state_of(http).models.values()])


@router.get("/v1/models/{model_id:path}", response_model=S.ModelCard, responses=ERRORS)
async def get_model(model_id: str, http: HTTPRequest):
    return V.state_of(http).model(model_id).card()


@router.post("/tokenize", response_model=S.TokenizeResponse, responses=ERRORS)
async def tokenize(body: S.TokenizePrompt | S.TokenizeChat, http: HTTPRequest):
    """Token ids of a prompt (as /v1/completions encodes it) or of messages (as chat does)."""
    m = V.state_of(http).model(body.model)
    if isinstance(body, S.TokenizePrompt):
        ids = await V.encode_prompt(m.tokenizer, body.prompt, body.add_special_tokens)
    else:
        text = await render(m, body.messages, body.add_generation_prompt, body.tools)
        ids = await V.encode_text(m.tokenizer, text)
    out = {"count": len(ids), "max_model_len": m.context, "tokens": ids}
    if len(ids) < 10_000:
        return out
    # A long list: not re-validated (the ints come from the tokenizer), and serialized off the loop in
    # pieces (json.dumps of millions of ints holds the GIL for long; between pieces the loop runs).
    data = await asyncio.to_thread(_dump_ids, ids, m.context)
    return Response(data, media_type="application/json")


def _dump_ids(ids: list[int], context: int) -> bytes:
    parts = [",".join(map(str, ids[i : i + 20_000])) for i in range(0, len(ids), 20_000)]
    return f'{{"count":{len(ids)},"max_model_len":{context},"tokens":[{",".join(parts)}]}}'.encode()


@router.post("/detokenize", response_model=S.DetokenizeResponse, responses=ERRORS)
async def detokenize(body: S.DetokenizeRequest, http: HTTPRequest):
    m = V.state_of(http).model(body.model)
    V.check_ids(m, body.tokens, "tokens")
    return S.DetokenizeResponse(prompt=m.tokenizer.decode(body.tokens))


@router.get("/health", response_model=S.HealthResponse, responses={503: {"model": S.ErrorResponse}})
async def health(http: HTTPRequest):
    state = V.state_of(http)
    scheduler = state.scheduler
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
    return S.HealthResponse(status="ok", models=list(state.models), running=running, waiting=waiting)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def prometheus(http: HTTPRequest):
    data, content_type = V.state_of(http).metrics.render()
    return Response(data, media_type=content_type)


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")
