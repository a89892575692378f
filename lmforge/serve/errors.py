"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

400 for invalid input (pydantic's validation errors included, never FastAPI's 422), 401 without the API
key, 404 for an unknown model or path, 408 for a body that does not arrive in time, 413 for an oversized
body, 429 when the queue is full, 503 while shutting down, and 500 only for a bug (sent with
`Connection: close`, so that a client's next keep-alive request goes on a fresh connection).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve import schema as S
from lmforge.serve.auth import _BodyTimeout, _TooLarge
from lmforge.utils import UserError

log = logging.getLogger("lmforge.serve")


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
    408: "invalid_request_error",
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
    # Within a union (prompt: text | list of texts | ids), the member whose type matched but whose
    # value failed (a lone surrogate, an out-of-range number) says what is wrong; type mismatches don't.
    errors = sorted(errors, key=lambda e: e.get("type") != "value_error")
    first = errors[0]
    param = _param(first.get("loc", ()))
    msgs = []
    for e in errors:
        p = _param(e.get("loc", ()))
        m = f"{p}: {e.get('msg')}" if p else str(e.get("msg"))
        if m not in msgs:
            msgs.append(m)
    more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
    return "; ".join(msgs[:3]) + more, param


def install_error_handlers(app: FastAPI) -> None:
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
        if isinstance(exc.__cause__, _BodyTimeout):
            return error_response(
                408,
                str(exc.__cause__),
                "invalid_request_error",
                None,
                "request_timeout",
                headers={"Connection": "close"},
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
            headers={"Connection": "close"},
        )


# The error responses every route documents in /openapi.json.
ERRORS = {
    400: {"model": S.ErrorResponse, "description": "invalid request"},
    401: {"model": S.ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": S.ErrorResponse, "description": "unknown model"},
    429: {"model": S.ErrorResponse, "description": "queue full"},
    503: {"model": S.ErrorResponse, "description": "shutting down"},
}
