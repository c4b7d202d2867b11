"""Cached answering: a route's answer served from the cache (L1 memory, L2 Redis when configured)
or loaded once however many requests wait for it (single-flight), within the request's deadline.

What is cached is the encoded response body plus a small header of attribution, so a hit costs a
dictionary lookup and a write. When every upstream fails, a cached answer may still be served —
labelled ``stale`` — and otherwise the caller gets 503 with ``Retry-After``. Nothing is ever made up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from marketpipe.api.errors import ALPACA_PREFIX
from marketpipe.api.formats import MEDIA
from marketpipe.api.state import AppState
from marketpipe.cache import CacheHit, TieredCache
from marketpipe.core.errors import AllProvidersFailed, DeadlineExceeded, MarketpipeError, ProviderError

META_SEP = b"\n"


Loaded = tuple[bytes, str, dict[str, str], float]  # body, media type, headers, ttl


async def answer(
    request: Request, st: AppState, key: str, kind: str, load: Callable[[], Awaitable[Loaded]]
) -> Response:
    """Serve ``key`` from the cache, or load it once (single-flight) and cache it; when loading fails
    upstream or the request's deadline passes first, serve a cached copy labelled stale if there is one.

    The deadline (loop time, put in the scope by :class:`RequestContext`) bounds both the wait and
    the load itself: the load runs in the cache's single-flight task, which is cancelled when the
    deadline of the request that started it passes, so its waiters are all released with
    ``DEADLINE_EXCEEDED`` and no upstream work is left running."""
    deadline: float | None = request.scope.get("state", {}).get("deadline")

    async def loader() -> tuple[bytes, float]:
        if deadline is None:
            body, media, headers, ttl = await load()
        else:
            try:
                async with asyncio.timeout_at(deadline) as bound:
                    body, media, headers, ttl = await load()
            except TimeoutError as exc:
                if not bound.expired():
                    raise
                raise deadline_exceeded(st) from exc
        head = orjson.dumps({"m": media, "h": headers})
        return head + META_SEP + body, ttl

    try:
        if deadline is None:
            hit = await st.cache.get_or_load(key, loader, kind=kind)
        else:
            try:
                async with asyncio.timeout_at(deadline) as bound:
                    hit = await st.cache.get_or_load(key, loader, kind=kind)
            except TimeoutError as exc:
                if not bound.expired():
                    raise
                raise deadline_exceeded(st) from exc
        stale = False
    except (ProviderError, MarketpipeError) as exc:
        if not isinstance(exc, ProviderError) and exc.code not in (AllProvidersFailed.code, DeadlineExceeded.code):
            raise
        old = await st.cache.get(key, allow_stale=True)
        if old is None:
            raise
        hit, stale = old, True
    if not stale and not hit.stale:
        request.scope.setdefault("state", {})["cache_key"] = key  # lets HitPath serve repeats by URL
    # Alpaca-shaped bodies must keep the vendor's shape: their staleness is told by header only.
    body, media, headers = render(hit, stale, mark_body=not request.url.path.startswith(ALPACA_PREFIX))
    return Response(body, media_type=media, headers=headers)


def deadline_exceeded(st: AppState) -> DeadlineExceeded:
    t = st.config.server.request_timeout
    return DeadlineExceeded(f"no answer within the gateway's bound of {t:g} s", retry_after=5.0)


def render(hit: CacheHit, stale: bool = False, *, mark_body: bool = True) -> tuple[bytes, str, dict[str, str]]:
    """A cached entry as (body, media type, headers), with its ages brought up to now."""
    head, _, body = hit.value.partition(META_SEP)
    meta = orjson.loads(head)
    headers = dict(meta["h"])
    headers["X-Marketpipe-Cache"] = hit.tier
    headers["X-Marketpipe-Cache-Age"] = f"{hit.age_seconds:.3f}"
    if headers.get("X-Marketpipe-Data-Age"):
        headers["X-Marketpipe-Data-Age"] = f"{float(headers['X-Marketpipe-Data-Age']) + hit.age_seconds:.3f}"
    if stale or hit.stale:
        headers["X-Marketpipe-Stale"] = "true"
        if mark_body and meta["m"] == MEDIA["json"]:
            body = _mark_stale(body)
    return body, meta["m"], headers


class HitPath:
    """Repeat requests served straight from the cache by URL, before routing and validation.

    A route that answered from (or into) the cache leaves its key in the request scope; the next
    request with the same path, query and Accept header looks that key up and, while the entry is
    fresh, is answered here at a fraction of the cost. Expiry, invalidation and TTLs are the cache's
    own, so this changes nothing but the cost; anything else goes through the app as usual."""

    def __init__(self, app: Any, cache: TieredCache, max_urls: int = 100_000) -> None:
        self.app = app
        self.cache = cache
        self.max_urls = max_urls
        self.urls: dict[bytes, tuple[str, Any]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        accept = next((v for k, v in scope.get("headers", ()) if k == b"accept"), b"")
        url = scope["path"].encode() + b"?" + scope.get("query_string", b"") + b"|" + accept
        known = self.urls.get(url)
        if known is not None:
            hit = await self.cache.get(known[0])
            if hit is not None and not hit.stale:
                scope["route"] = known[1]
                body, media, headers = render(hit)
                await Response(body, media_type=media, headers=headers)(scope, receive, send)
                return
            self.urls.pop(url, None)
        status = 0

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        key = scope.get("state", {}).get("cache_key")
        if key is not None and status == 200:
            if len(self.urls) >= self.max_urls:
                self.urls.pop(next(iter(self.urls)))
            self.urls[url] = (key, scope.get("route"))


def _mark_stale(body: bytes) -> bytes:
    doc = orjson.loads(body)

    def mark(d: Any) -> None:
        if isinstance(d, dict):
            if "stale" in d:
                d["stale"] = True
            for v in d.values():
                if isinstance(v, dict):
                    mark(v)

    mark(doc)
    if isinstance(doc, dict):
        doc["stale"] = True
    return orjson.dumps(doc)
