"""Serving: an OpenAI-compatible HTTP API and a web chat page over a continuous-batching engine loop.

    lmforge serve runs/sft/final --port 8000

    from lmforge.serve import create_app, load_models, serve
    serve("runs/sft/final", port=8000)                     # what the CLI does (uvicorn, blocking)
    app = create_app(load_models("runs/sft/final"))         # the ASGI app, for your own server

app.py holds the routes, schema.py the request/response bodies, scheduler.py the engine thread,
metrics.py the Prometheus metrics, auth.py the API key, static/ the chat page. See docs/serving.md.
"""

from lmforge.serve.app import ServedModel, create_app, load_models, serve

__all__ = ["ServedModel", "create_app", "load_models", "serve"]
