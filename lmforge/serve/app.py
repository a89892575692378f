"""The HTTP server: wires the routes, the middleware and the engine loop together, and runs uvicorn.

    lmforge serve runs/sft/final --port 8000 --api-key "$KEY" --lora reverse=runs/sft-lora/final

    from lmforge.serve import create_app, load_models
    app = create_app(load_models("runs/sft/final"), api_key=None)   # any ASGI server can run it

Routes: completions.py (POST /v1/completions), chat.py (POST /v1/chat/completions), info.py
(/v1/models, /tokenize, /detokenize, /health, /metrics, the page). The protocol is schema.py, what the
two generation routes share is serving.py, errors are errors.py, the engine thread scheduler.py.

Slow clients are cut off (docs/serving.md): request headers must arrive within `header_timeout` s of
the connection opening or of the previous response (connection.py), each piece of a body within
`body_timeout` s (408), and an idle keep-alive connection is closed after `keep_alive_timeout` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from lmforge.serve import chat, completions, info
from lmforge.serve.auth import APIKeyMiddleware, BodyLimitMiddleware
from lmforge.serve.errors import APIError, install_error_handlers
from lmforge.serve.metrics import Metrics
from lmforge.serve.scheduler import Event, Scheduler
from lmforge.serve.serving import ServedModel, State, cache_bytes, load_models
from lmforge.utils import UserError

STATIC = Path(__file__).parent / "static"


def create_app(
    models: list[ServedModel],
    *,
    api_key: str | None = None,
    max_queue: int = 256,
    cors_origins: list[str] = (),
    drain_timeout: float = 30.0,
    max_body_bytes: int = 8 << 20,
    stall_timeout: float = 120.0,
    body_timeout: float | None = 30.0,
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
    app.state.lmforge = State(models, scheduler, metrics)
    install_error_handlers(app)
    for module in (info, completions, chat):
        app.include_router(module.router)
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
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes, timeout=body_timeout)
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
    loras: dict[str, str] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    model_name: str | None = None,
    drain_timeout: float = 30.0,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
    max_len: int | None = None,
    kv_cache_memory: str | None = None,
    prefix_cache: bool = True,
    keep_alive_timeout: float = 5.0,
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
) -> None:
    """`lmforge serve`: load the model(s), then run uvicorn until SIGINT/SIGTERM; on a signal, stop taking
    new requests (503, /health too), let running ones finish (at most drain_timeout s), exit.

    Args:
        checkpoint: an lmforge or Hugging Face model directory with a tokenizer
        host: address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)
        port: TCP port
        api_key: require 'Authorization: Bearer KEY' on every route but /health and the page (default: the
            LMFORGE_API_KEY environment variable; unset = no key)
        max_batch: rows decoded together per model: the most concurrent sequences
        max_queue: requests that may wait for a free row; more are refused with 429
        cors_origins: allow browser pages from this origin (comma-separated or repeated; '*' for any)
        loras: also serve a LoRA adapter of this checkpoint as model NAME (repeatable; each costs a merged
            copy of the weights and its own KV cache)
        model_name: model id of the checkpoint in the API (default: the directory's name)
        drain_timeout: seconds to let running requests finish on shutdown
        log_level: uvicorn log level
        max_len: KV-cache slots per row: the most tokens (prompt + output) one request may hold (default:
            what --kv-cache-memory allows, up to the model's context)
        kv_cache_memory: memory for the KV cache of each model: a size (2GiB, 512MB) or a fraction of the
            free memory (0.5) (default: a budget that fits the machine; startup prints what was allocated)
        prefix_cache: reuse the KV cache of prompt prefixes seen recently (shared system prompts, earlier
            turns of a conversation)
        keep_alive_timeout: seconds an idle keep-alive connection stays open
        header_timeout: seconds a client has to send a request's headers once connected
        body_timeout: seconds a client may pause while sending a request body before a 408
    """
    import uvicorn

    from lmforge.serve.connection import guarded_h11

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be in 1..65535")
    api_key = api_key or os.environ.get("LMFORGE_API_KEY") or None
    cors_origins = [o.strip() for spec in cors_origins for o in spec.split(",") if o.strip()]
    if max_queue < 1:  # checked again by create_app; here before the (slow) model loading
        raise UserError(f"--max-queue {max_queue}: must be >= 1")
    for name, v in (
        ("--timeout-keep-alive", keep_alive_timeout),
        ("--timeout-header", header_timeout),
        ("--timeout-body", body_timeout),
    ):
        if not v > 0:
            raise UserError(f"{name} {v}: must be > 0 seconds")
    models = load_models(
        checkpoint,
        device=device,
        dtype=dtype,
        max_batch=max_batch,
        model_name=model_name,
        loras=list((loras or {}).items()),
        max_len=max_len,
        kv_cache_memory=kv_cache_memory,
        prefix_cache=prefix_cache,
    )
    app = create_app(
        models,
        api_key=api_key,
        max_queue=max_queue,
        cors_origins=cors_origins,
        drain_timeout=drain_timeout,
        body_timeout=body_timeout,
    )
    scheduler: Scheduler = app.state.lmforge.scheduler

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.begin_drain()  # new requests get 503 while the running ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout,
        timeout_keep_alive=keep_alive_timeout,
        http=guarded_h11(header_timeout),
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers
    )
    m0 = models[0]
    e0 = m0.engine
    cache_mb = sum(cache_bytes(m.engine) for m in models) / 2**20
    print(
        f"serving {', '.join(m.id for m in models)} ({e0.model.num_params():,} parameters, context "
        f"{m0.model_context}) on http://{host}:{port}\n"
        f"KV cache: {len(e0.rows)} rows x {m0.context} tokens per model = {cache_mb:,.1f} MiB in all "
        f"({cache_mb / len(models):,.1f} MiB per model)",
        flush=True,
    )
    _Server(config).run()
