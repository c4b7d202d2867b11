"""Structured errors: every failure is ``{"error": {"code", "message", "details", "request_id"}}``
with the stable codes of :mod:`marketpipe.core.errors` (the Alpaca-compatible routes answer in the
vendor's own error shape instead: see :mod:`marketpipe.api.alpaca`)."""

from __future__ import annotations

import math
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from marketpipe.core.errors import (
    UPSTREAM_DOWN,
    Forbidden,
    HttpError,
    InvalidArgument,
    MarketpipeError,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import ERRORS

log = get_logger("marketpipe.api")
# the Alpaca-compatible URL space (stocks /v2, options /v1beta1, crypto /v1beta3): the vendor's error shape,
# stale in headers only
ALPACA_PREFIX = ("/v2/", "/v1beta1/", "/v1beta3/")
ALPACA_V1_PATHS = ("/v1/corporate-actions",)  # the vendor's v1 routes the compatible API also serves


def is_alpaca_path(path: str) -> bool:
    """Whether ``path`` is one of the Alpaca-compatible routes (vendor error shapes and key headers)."""
    return path.startswith(ALPACA_PREFIX) or path in ALPACA_V1_PATHS

_HTTP_CODES = {
    cls.http_status: cls.code
    for cls in (InvalidArgument, Unauthenticated, Forbidden, NotFound, MethodNotAllowed, RateLimited)
}


MAX_MESSAGE = 300  # an error message never carries more than this (client input in it is clipped)
MAX_DETAIL = 120


def clip(value: Any, limit: int = MAX_DETAIL) -> Any:
    """A string cut to ``limit`` characters (marked), so no answer echoes more than a short piece of
    what a client sent; lists and dicts clipped item by item, other values as they are."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 1] + "…"
    if isinstance(value, list):
        return [clip(v, limit) for v in value[:20]]
    if isinstance(value, dict):
        return {clip(str(k), limit): clip(v, limit) for k, v in list(value.items())[:20]}
    return value


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id") or getattr(request.state, "request_id", ""))


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    ERRORS.labels(code).inc()
    message = clip(message, MAX_MESSAGE)
    details = clip(details) if details else details
    if is_alpaca_path(request.url.path):
        body: dict[str, Any] = {"message": message}  # the vendor's own error shape
        if status in (400, 422):
            body["code"] = 42210000
    else:
        body = {
            "error": {"code": code, "message": message, "details": details or {}, "request_id": request_id(request)}
        }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def marketpipe_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MarketpipeError)
    headers = {}
    status = exc.http_status
    if exc.code in UPSTREAM_DOWN:
        status = 503  # upstream trouble is the gateway's unavailability, whatever the vendor said
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after or 5)))
    if status >= 500:
        log.warning("request_failed", path=request.url.path, code=exc.code, error=clip(exc.message, MAX_MESSAGE))
    return error_response(request, status, exc.code, exc.message, exc.details, headers)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body", "header")]
    param = ".".join(loc) or "request"
    message = f"invalid {param}: {first.get('msg', 'invalid value')}"
    return error_response(request, 400, InvalidArgument.code, message, {"parameter": param})


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, HttpError.code)
    return error_response(
        request,
        exc.status_code,
        code,
        str(exc.detail).lower() if exc.detail else code.lower(),
        headers=dict(exc.headers or {}),
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(MarketpipeError, marketpipe_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # An unhandled exception is logged and answered (500 INTERNAL) by the RequestContext middleware,
    # which does not re-raise it: a handler here would let Starlette re-raise it to the server, which
    # would log it a second time.
