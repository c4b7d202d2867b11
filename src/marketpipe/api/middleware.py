"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): request ids, HTTP
metrics, and — when client keys are configured — authentication with per-key rate limits."""

from __future__ import annotations

import hmac
import itertools
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

from marketpipe.core.metrics import REGISTRY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HTTP_REQUESTS = Counter(
    "marketpipe_http_requests_total",
    "Gateway HTTP requests by method, route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "marketpipe_http_request_seconds",
    "Gateway HTTP request latency by method and route template",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    registry=REGISTRY,
)
CLIENT_LIMITED = Counter(
    "marketpipe_client_rate_limited_total",
    "Requests refused because a client key exceeded its rate limit",
    ["key_id"],
    registry=REGISTRY,
)
_PREFIX = uuid.uuid4().hex[:8] + "-"  # unique per process; a counter after it is unique per request
_SEQ = itertools.count(1)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # metric children by labels: labels() is not free
OPEN_PATHS = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/admin", "/favicon.ico")


class RequestContext:
    """Request id in, out (``X-Request-ID``) and in the scope state; latency and status counted by
    route template (never by raw path: that would make a metric series per symbol)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                rid = v.decode("latin-1")[:64]
                break
        rid = rid or f"{_PREFIX}{next(_SEQ):x}"
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            if method not in _METHODS:
                method = "OTHER"  # a label per made-up method would grow the metrics without bound
            key = (method, template, status)
            children = _CHILDREN.get(key)
            if children is None:
                children = _CHILDREN[key] = (
                    HTTP_REQUESTS.labels(method, template, str(status)),
                    HTTP_LATENCY.labels(method, template),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class ClientKeys:
    """Gateway client keys (``MARKETPIPE_API_KEYS="id:secret,id2:secret2"``) and their rate limit."""

    keys: dict[str, str] = field(default_factory=dict)  # id -> secret
    per_min: int = 600
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None, per_min: int) -> ClientKeys:
        keys: dict[str, str] = {}
        for part in (text or "").split(","):
            if ":" in part:
                kid, secret = part.split(":", 1)
                if kid.strip() and secret.strip():
                    keys[kid.strip()] = secret.strip()
        return cls(keys, per_min)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, key_id: str | None, secret: str | None) -> str | None:
        """The key id whose secret matches (constant-time compare), or None."""
        if secret is None:
            return None
        if key_id is not None:
            want = self.keys.get(key_id)
            return key_id if want is not None and hmac.compare_digest(want.encode(), secret.encode()) else None
        for kid, want in self.keys.items():
            if hmac.compare_digest(want.encode(), secret.encode()):
                return kid
        return None

    def take(self, key_id: str, now: float) -> tuple[bool, int, float]:
        """Token bucket per key: (allowed, remaining, seconds until a token is back)."""
        rate = self.per_min / 60.0
        b = self._buckets.get(key_id)
        if b is None:
            b = self._buckets[key_id] = _Bucket(float(self.per_min), now)
        b.tokens = min(float(self.per_min), b.tokens + (now - b.updated) * rate)
        b.updated = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return True, int(b.tokens), 0.0
        return False, 0, (1.0 - b.tokens) / rate


def v1_secret(headers: Mapping[str, str]) -> str | None:
    """A v1 request's client key: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (lower-case names)."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key")


class ClientAuth:
    """When client keys are configured: v1 takes ``Authorization: Bearer <secret>`` or
    ``X-API-Key: <secret>``; the Alpaca-compatible routes take ``APCA-API-KEY-ID`` +
    ``APCA-API-SECRET-KEY`` as the vendor does (401 when missing, 403 when wrong). Each key has
    its own token bucket; over it: 429 with ``X-RateLimit-*`` headers."""

    def __init__(self, app: ASGIApp, keys: ClientKeys, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.keys = keys
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys.enabled or path == "/" or path.startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        alpaca = path.startswith("/v2/")
        if alpaca:
            key_id, secret = headers.get("apca-api-key-id"), headers.get("apca-api-secret-key")
            if not key_id or not secret:
                await _reply(send, 401, {"message": "unauthorized."})
                return
        else:
            key_id = None
            secret = v1_secret(headers)
            if not secret:
                await _reply(
                    send, 401, _err("UNAUTHENTICATED", "an API key is required (Authorization: Bearer KEY)", scope)
                )
                return
        who = self.keys.identify(key_id, secret)
        if who is None:
            await _reply(
                send, 403, {"message": "forbidden."} if alpaca else _err("FORBIDDEN", "unknown API key", scope)
            )
            return
        now = self.clock()
        ok, remaining, wait = self.keys.take(who, now)
        rl = [
            (b"x-ratelimit-limit", str(self.keys.per_min).encode()),
            (b"x-ratelimit-remaining", str(remaining).encode()),
            (b"x-ratelimit-reset", str(math.ceil(time.time() + wait)).encode()),
        ]
        if not ok:
            CLIENT_LIMITED.labels(who).inc()
            body = (
                {"message": "too many requests."}
                if alpaca
                else _err(
                    "RATE_LIMITED", f"rate limit of {self.keys.per_min} requests/min exceeded for key {who}", scope
                )
            )
            await _reply(send, 429, body, [*rl, (b"retry-after", str(max(1, math.ceil(wait))).encode())])
            return

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *rl]
            await send(message)

        await self.app(scope, receive, send_with_limits)


def _err(code: str, message: str, scope: Scope) -> dict[str, Any]:
    rid = scope.get("state", {}).get("request_id", "")
    return {"error": {"code": code, "message": message, "details": {}, "request_id": rid}}


async def _reply(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
