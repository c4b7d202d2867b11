"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): request ids, HTTP
metrics, the per-request deadline, the header bound, the one place an unhandled error is logged and
answered, and — when client keys are configured — authentication with per-key rate limits and a
per-address throttle on failed key attempts."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

from marketpipe.api.errors import ALPACA_PREFIX
from marketpipe.core.errors import (
    AuthThrottled,
    DeadlineExceeded,
    Forbidden,
    HeadersTooLarge,
    MarketpipeError,
    RateLimited,
    Unauthenticated,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import ERRORS, REGISTRY

log = get_logger("marketpipe.api")

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
AUTH_THROTTLED = Counter(
    "marketpipe_client_auth_throttled_total",
    "Requests refused because their address made too many failed key attempts (and failed attempts counted)",
    ["result"],  # "refused": a request refused unchecked; "failure": a wrong key counted toward the bound
    registry=REGISTRY,
)
DEADLINE_GRACE = 0.25  # the backstop fires this long after a route's own deadline (which may serve stale)
DEADLINE_RETRY_AFTER = 5.0
_PREFIX = uuid.uuid4().hex[:8] + "-"  # unique per process; a counter after it is unique per request
_SEQ = itertools.count(1)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # metric children by labels: labels() is not free
OPEN_PATHS = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/admin", "/favicon.ico")


class RequestContext:
    """Request id in, out (``X-Request-ID``) and in the scope state; latency and status counted by
    route template (never by raw path: that would make a metric series per symbol).

    Also, for every HTTP request: headers over ``max_header_bytes`` are refused (431; the server in
    front may be httptools, which has no such bound); the request's deadline (``request_timeout``
    from now, as loop time) is put in the scope state for the routes, and if no response has started
    when it (plus a short grace) passes, the work is cancelled and the answer is 503
    ``DEADLINE_EXCEEDED`` with ``Retry-After``; an unhandled exception is logged here once (no
    locals; the log redacts secrets) and answered 500 ``INTERNAL`` with the request id — it is not
    re-raised, so neither Starlette nor the server logs it again."""

    def __init__(self, app: ASGIApp, request_timeout: float = 10.0, max_header_bytes: int = 16 * 1024) -> None:
        self.app = app
        self.request_timeout = request_timeout
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        rid = ""
        size = 0
        for k, v in scope.get("headers", ()):
            size += len(k) + len(v) + 4
            if k == b"x-request-id" and not rid:
                rid = v.decode("latin-1")[:64]
        rid = rid or f"{_PREFIX}{next(_SEQ):x}"
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        if kind == "websocket":
            if size > self.max_header_bytes:
                ERRORS.labels(HeadersTooLarge.code).inc()
                await send({"type": "websocket.close", "code": 1009, "reason": HeadersTooLarge.code})
                return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        responded = False
        armed = False  # inside the deadline's scope (a reply from outside it must not touch it)
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        state["deadline"] = deadline
        cm = asyncio.timeout_at(deadline + DEADLINE_GRACE)

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
                if not responded and armed:
                    cm.reschedule(None)  # the deadline bounds the wait for an answer, not a stream's length
                responded = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if size > self.max_header_bytes:
                await _reply(
                    send_with_id,
                    431,
                    _err(HeadersTooLarge.code, f"request headers are limited to {self.max_header_bytes} bytes", scope),
                )
                ERRORS.labels(HeadersTooLarge.code).inc()
                return
            try:
                async with cm:
                    armed = True
                    try:
                        await self.app(scope, receive, send_with_id)
                    finally:
                        armed = False
            except TimeoutError:
                if not cm.expired():
                    raise  # the app's own: an unhandled error like any other
                log.warning("request_deadline_exceeded", path=scope.get("path", ""), request_id=rid)
                if not responded:
                    ERRORS.labels(DeadlineExceeded.code).inc()
                    await _reply(
                        send_with_id,
                        503,
                        _err(DeadlineExceeded.code, f"no answer within {self.request_timeout:g} s", scope),
                        [(b"retry-after", str(math.ceil(DEADLINE_RETRY_AFTER)).encode())],
                        alpaca=scope.get("path", "").startswith(ALPACA_PREFIX),
                    )
        except Exception as exc:  # the one place an unhandled error is logged and answered
            log.exception("unhandled_error", path=scope.get("path", ""), error=repr(exc)[:300], request_id=rid)
            if not responded:
                ERRORS.labels(MarketpipeError.code).inc()
                await _reply(
                    send_with_id,
                    500,
                    _err(MarketpipeError.code, "internal error; see the server log for the request id", scope),
                    alpaca=scope.get("path", "").startswith(ALPACA_PREFIX),
                )
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


class AuthThrottle:
    """Failed key attempts per client address: after ``per_min`` failures within a minute the address
    is refused (unchecked, so guessing on cannot tell a right key) until the oldest failure is a
    minute old. Bounded: at most ``max_addresses`` addresses are remembered (oldest forgotten first)."""

    WINDOW = 60.0

    def __init__(self, per_min: int = 10, max_addresses: int = 10_000) -> None:
        self.per_min = per_min
        self.max_addresses = max_addresses
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, addr: str, now: float) -> deque[float] | None:
        q = self._fails.get(addr)
        if q is None:
            return None
        while q and q[0] <= now - self.WINDOW:
            q.popleft()
        if not q:
            del self._fails[addr]
            return None
        return q

    def blocked(self, addr: str, now: float) -> float:
        """Seconds until ``addr`` may try again (0: it may now)."""
        q = self._recent(addr, now)
        if q is None or len(q) < self.per_min:
            return 0.0
        return max(0.001, q[0] + self.WINDOW - now)

    def fail(self, addr: str, now: float) -> None:
        q = self._recent(addr, now)
        if q is None:
            if len(self._fails) >= self.max_addresses:
                self._fails.pop(next(iter(self._fails)))
            q = self._fails[addr] = deque(maxlen=self.per_min)
        q.append(now)
        AUTH_THROTTLED.labels("failure").inc()

    def refuse(self, wait: float) -> AuthThrottled:
        AUTH_THROTTLED.labels("refused").inc()
        return AuthThrottled(
            f"too many failed key attempts from this address; try again in {math.ceil(wait)} s",
            retry_after=wait,
        )


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


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
    throttle: AuthThrottle = field(default_factory=AuthThrottle)

    @classmethod
    def parse(cls, text: str | None, per_min: int, failures_per_min: int = 10) -> ClientKeys:
        keys: dict[str, str] = {}
        for part in (text or "").split(","):
            if ":" in part:
                kid, secret = part.split(":", 1)
                if kid.strip() and secret.strip():
                    keys[kid.strip()] = secret.strip()
        return cls(keys, per_min, throttle=AuthThrottle(failures_per_min))

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
        alpaca = path.startswith(ALPACA_PREFIX)
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
                    send, 401, _err(Unauthenticated.code, "an API key is required (Authorization: Bearer KEY)", scope)
                )
                return
        now = self.clock()
        addr = client_address(scope)
        wait = self.keys.throttle.blocked(addr, now)
        if wait:
            exc = self.keys.throttle.refuse(wait)
            ERRORS.labels(exc.code).inc()
            body = {"message": "too many requests."} if alpaca else _err(exc.code, exc.message, scope)
            await _reply(send, 429, body, [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
            return
        who = self.keys.identify(key_id, secret)
        if who is None:
            self.keys.throttle.fail(addr, now)
            log.warning("client_key_rejected", client=addr, path=path[:200])
            await _reply(
                send, 403, {"message": "forbidden."} if alpaca else _err(Forbidden.code, "unknown API key", scope)
            )
            return
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
                    RateLimited.code, f"rate limit of {self.keys.per_min} requests/min exceeded for key {who}", scope
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
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    alpaca: bool = False,
) -> None:
    if alpaca and "error" in body:  # the Alpaca-compatible routes answer in the vendor's shape
        body = {"message": body["error"]["message"]}
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
