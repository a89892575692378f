"""The ASGI app in-process (Starlette's TestClient, no subprocess): /health follows the engine loop, an
engine bug becomes a 500 in the error shape and the server keeps serving, CORS, body limit, schema."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import assert_error, serve_ckpt  # noqa: F401

from lmforge.serve import create_app, load_models


@pytest.fixture(scope="module")
def models(serve_ckpt):  # noqa: F811
    torch.set_num_threads(1)
    return load_models(serve_ckpt[0], device="cpu", max_batch=2, model_name="m")


def test_health_follows_the_engine_loop(models):
    app = create_app(models)
    with TestClient(app) as c:
        assert c.get("/health").json()["status"] == "ok"
        app.state.lmforge.scheduler.stop(timeout=5)  # the engine loop is gone
        err = assert_error(c.get("/health"), 503)
        assert "engine loop" in err["message"]
        assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503)


def test_engine_bug_is_a_500_and_the_server_goes_on(models, monkeypatch):
    app = create_app(models)
    engine = models[0].engine
    calls = {"n": 0}
    real_step = type(engine).step

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(type(engine), "step", flaky)
    body = {"prompt": "Hello", "max_tokens": 10, "ignore_eos": True}
    with TestClient(app) as c:
        err = assert_error(c.post("/v1/completions", json=body), 500)
        assert err["type"] == "server_error" and "boom" in err["message"]
        # the engine was emptied and keeps serving
        r = c.post("/v1/completions", json={**body, "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert c.get("/health").status_code == 200 and engine.active == 0
        # streaming: the error arrives as an SSE event in the same shape, and the stream ends
        calls["n"] = 0
        lines = [x for x in c.post("/v1/completions", json={**body, "stream": True}).iter_lines() if x]
        assert lines[-1].startswith("data: {") and '"error"' in lines[-1] and "boom" in lines[-1]
        assert "[DONE]" not in "".join(lines)


def test_cors_body_limit_and_schema(models):
    app = create_app(models, api_key="k", cors_origins=["http://example.com"], max_body_bytes=1000)
    with TestClient(app) as c:
        pre = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": "http://example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
        r = c.get("/v1/models", headers={"Origin": "http://example.com"})
        assert_error(r, 401)
        assert r.headers["access-control-allow-origin"] == "http://example.com"  # the page can read the 401
        big = {"prompt": "x" * 2000}
        err = assert_error(c.post("/v1/completions", json=big, headers={"Authorization": "Bearer k"}), 413)
        assert err["code"] == "request_too_large"
        schema = c.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
        ops = [op for path in schema["paths"].values() for op in path.values()]
        assert ops and all("422" not in op["responses"] for op in ops)
        assert "400" in schema["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_cli_user_errors(serve_ckpt, capsys):  # noqa: F811
    from lmforge.cli import main

    ckpt = str(serve_ckpt[0])
    for argv, msg in [
        (["--lora", "no-equals-sign"], "expected NAME=DIR"),
        (["--lora", f"x={ckpt}"], "not a LoRA adapter directory"),
        (["--max-batch", "0"], "--max-batch 0"),
        (["--max-queue", "0"], "--max-queue 0"),
        (["--port", "70000"], "--port 70000"),
    ]:
        assert main(["serve", ckpt, *argv]) == 2
        assert msg in capsys.readouterr().err
