"""API keys, request-size limits and the body-read timeout as plain ASGI middleware (they answer before
any route runs).

With a key, every request needs `Authorization: Bearer <key>`, except the open paths: `/health` (for
load balancers and Docker's HEALTHCHECK), the chat page `/` and its `/static/` files (the page asks for
the key and sends it itself). Keys are compared with `hmac.compare_digest`, in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import json

OPEN_PATHS = ("/", "/health", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


async def _send_json(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_open(scope["path"]):
            auth = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    auth = value.decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if not (
                scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key)
            ):
                msg = (
                    "missing API key: send the header 'Authorization: Bearer <key>'"
                    if not auth
                    else "invalid API key"
                )
                await _send_json(
                    send,
                    401,
                    error_body(msg, "authentication_error", None, "invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes with 413, by Content-Length or while they stream in, and
    bodies whose next piece takes longer than `timeout` seconds to arrive with 408 + Connection: close
    (a client that sends half a body and waits would otherwise hold its connection forever)."""

    def __init__(self, app, limit: int, timeout: float | None = 30.0):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(
            f"request body larger than {self.limit} bytes", "invalid_request_error", None, "request_too_large"
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = 0
                if size > self.limit:
                    return await _send_json(send, 413, too_big)
        seen = 0
        started = False
        body_done = False

        async def limited_receive():
            nonlocal seen, body_done
            if body_done or self.timeout is None:
                message = await receive()  # after the body: disconnect watchers wait as long as they like
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.timeout)
                except TimeoutError:
                    raise _BodyTimeout(
                        f"the request body did not arrive within {self.timeout:g} s (after {seen} bytes)"
                    ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, too_big)
        except _BodyTimeout as e:
            if not started:
                body = error_body(str(e), "invalid_request_error", None, "request_timeout")
                await _send_json(send, 408, body, [(b"connection", b"close")])


class _TooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass
