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


def test_long_context_model_gets_a_bounded_cache_and_serves(tmp_path, monkeypatch):
    """A tiny model with Llama 3.2's context (131072) starts with a KV cache that fits the machine, not
    max_batch x 131072 slots, and a request that cannot fit it is a 400 naming both numbers."""
    from serve_helpers import Server, build_checkpoint

    from lmforge.infer import kv_budget
    from lmforge.serve.serving import cache_bytes

    # the default budget of a small machine (the debug model's full-context cache would fit this one)
    monkeypatch.setattr(kv_budget, "DEFAULT_CAP", 64 << 20)
    ckpt, _ = build_checkpoint(tmp_path / "long", max_seq_len=131072)
    models = load_models(ckpt, device="cpu", max_batch=4)
    engine = models[0].engine
    assert models[0].model_context == 131072
    assert 1024 <= engine.max_len < 131072 and cache_bytes(engine) <= 64 << 20
    with TestClient(create_app(models)) as c:
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        too_many = engine.max_len + 10
        err = assert_error(c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": too_many}), 400,
                           "max_tokens", (str(too_many), str(engine.max_len), "131072"))  # fmt: skip
        assert err["code"] == "context_length_exceeded"
    # the CLI's sizing options, and what startup says it allocated
    with Server(
        ckpt, "--max-batch", "2", "--max-len", "512", "--kv-cache-memory", "64MiB", log_dir=tmp_path
    ) as s:
        assert "KV cache: 2 rows x 512 tokens" in s.log()
        import httpx

        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 600}, timeout=60)
        assert_error(r, 400, "max_tokens", ("600", "512"))
    from lmforge.cli import main

    assert main(["serve", str(ckpt), "--max-len", "100000", "--kv-cache-memory", "1MiB"]) == 2
