"""Serving: an OpenAI-compatible HTTP API and a web chat page over a continuous-batching engine loop.

    lmforge serve runs/sft/final --port 8000

    from lmforge.serve import create_app, load_models, serve
    serve("runs/sft/final", port=8000)                     # what the CLI does (uvicorn, blocking)
    app = create_app(load_models("runs/sft/final"))         # the ASGI app, for your own server

app.py wires the routes; schema.py is the protocol (requests that become SamplingParams, the typed
responses); completions.py, chat.py (+ tools.py, the tool-call formats) and info.py (models, tokenize,
health, metrics, the page) are the endpoint families; serving.py is what they share; errors.py the
error shape; scheduler.py the engine thread; metrics.py Prometheus; auth.py the API key and body
limits; connection.py the header timeout; static/ the chat page. See docs/serving.md.
"""

from lmforge.serve.app import ServedModel, create_app, load_models, serve

__all__ = ["ServedModel", "create_app", "load_models", "serve"]
