"""The gateway app: ``create_app()`` for tests and ``marketpipe serve``.

Reads go cache (L1 memory, L2 Redis when configured) → store → providers. What is cached is the
encoded response body plus a small header of attribution, so a hit costs a dictionary lookup and a
write. A miss is loaded once however many requests wait for it (single-flight). When every upstream
fails, a cached answer may still be served — labelled ``stale`` — and otherwise the caller gets 503
with ``Retry-After``. Nothing is ever made up."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import orjson
import polars as pl
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from marketpipe import __version__
from marketpipe.api import errors
from marketpipe.api.alpaca_stream import alpaca_stream_router
from marketpipe.api.dashboard import dashboard_router
from marketpipe.api.formats import MEDIA, bars_body, bars_json, negotiate
from marketpipe.api.live import live_router
from marketpipe.api.middleware import ClientAuth, ClientKeys, RequestContext, client_address
from marketpipe.cache import CacheHit, TieredCache, build_cache, make_key, ttl_for
from marketpipe.core import log as logging_
from marketpipe.core.config import KNOWN_KINDS, Config, load_config
from marketpipe.core.errors import (
    AllProvidersFailed,
    DeadlineExceeded,
    Forbidden,
    InvalidArgument,
    MarketpipeError,
    PayloadTooLarge,
    ProviderError,
    Unauthenticated,
)
from marketpipe.core.schema import normalize_symbol, normalize_symbols
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_range, utcnow
from marketpipe.service.data import MarketData
from marketpipe.service.gateway import Gateway
from marketpipe.service.live import LiveHub

ADMIN_TOKEN_VAR = "MARKETPIPE_ADMIN_TOKEN"
API_KEYS_VAR = "MARKETPIPE_API_KEYS"
META_SEP = b"\n"


@dataclass
class AppState:
    config: Config
    data: MarketData
    gateway: Gateway
    cache: TieredCache
    admin_token: str | None
    started: float
    keys: ClientKeys
    live: LiveHub | None = None  # created in the lifespan (it needs the running loop)


async def state(request: Request) -> AppState:
    return request.app.state.mp  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(state)]
Fmt = Annotated[str | None, Query(description="json, csv, arrow or parquet (else the Accept header)")]
Feed = Annotated[str | None, Query(description="sip or iex (default: each provider's configured feed)")]


# --- cached answers ------------------------------------------------------------------------------------


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
                raise _deadline(st) from exc
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
                raise _deadline(st) from exc
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
    body, media, headers = render(hit, stale, mark_body=not request.url.path.startswith("/v2/"))
    return Response(body, media_type=media, headers=headers)


def _deadline(st: AppState) -> DeadlineExceeded:
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


def _json(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)


# --- the app ---------------------------------------------------------------------------------------------


def cache_status(cache: TieredCache) -> dict[str, Any]:
    l2 = cache.l2
    return {
        "memory": {"entries": len(cache.l1), "bytes": cache.l1.bytes_used},
        "redis": None if l2 is None else ("up" if l2.available else "down (serving from memory and the store)"),
    }


def create_app(
    config: Config | None = None,
    *,
    data: MarketData | None = None,
    env: dict[str, str] | None = None,
    cache: TieredCache | None = None,
) -> FastAPI:
    cfg = config or load_config()
    environ = os.environ if env is None else env
    md = data or MarketData(cfg, env=env)
    keys = ClientKeys.parse(
        environ.get(API_KEYS_VAR), cfg.server.client_rate_limit_per_min, cfg.server.auth_failures_per_min
    )
    # never in a log line: the admin token, client key secrets, vendor keys, Redis credentials
    logging_.register_secrets([*logging_.secrets_from_env(environ), *keys.keys.values()])
    st = AppState(
        config=cfg,
        data=md,
        gateway=Gateway(md),
        cache=cache or build_cache(cfg.cache),
        admin_token=environ.get(ADMIN_TOKEN_VAR) or None,
        started=time.time(),
        keys=keys,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logging_.guard_stdlib()  # the server's own loggers (configured by now) redact too
        with contextlib.suppress(MarketpipeError):  # no usable provider: readiness says so
            st.gateway.start_probes()
        if cfg.stream.enabled:
            st.live = LiveHub(cfg, st.gateway, env=env)
            await st.live.start()
        yield
        if st.live is not None:
            await st.live.close()
        await st.cache.aclose()
        await md.aclose()

    app = FastAPI(
        title="marketpipe gateway",
        version=__version__,
        description="Market data with attribution, checks, caching and failover. Errors are "
        '`{"error": {"code", "message", "details", "request_id"}}` with stable codes.',
        lifespan=lifespan,
    )
    app.state.mp = st
    errors.install(app)
    app.add_middleware(HitPath, cache=st.cache)
    app.add_middleware(ClientAuth, keys=keys)
    app.add_middleware(
        RequestContext, request_timeout=cfg.server.request_timeout, max_header_bytes=cfg.server.max_header_bytes
    )
    app.include_router(v1_router())
    app.include_router(ops_router())
    app.include_router(admin_router())
    from marketpipe.api.alpaca import router as alpaca_router

    app.include_router(alpaca_router())
    app.include_router(live_router())
    app.include_router(alpaca_stream_router())
    app.include_router(dashboard_router())
    return app


def create_app_from_env() -> FastAPI:
    """``uvicorn --factory marketpipe.api.app:create_app_from_env`` (config from MARKETPIPE_CONFIG)."""
    return create_app()


# --- v1 ----------------------------------------------------------------------------------------------------


def v1_router() -> Any:
    from fastapi import APIRouter

    r = APIRouter(prefix="/v1", tags=["v1"])

    async def bars(
        request: Request,
        st: AppState,
        symbols: list[str],
        single: str | None,
        timeframe: str,
        start: str,
        end: str | None,
        source: str,
        feed: str | None,
        adjustment: str,
        limit: int,
        page_token: str | None,
        sort: str,
        fmt: str | None,
        accept: str | None,
    ) -> Response:
        tf = Timeframe.parse(timeframe)
        s, e = parse_range(start, end)
        if adjustment != "raw":
            raise InvalidArgument(
                "only adjustment=raw is served: marketpipe stores bars as the vendor sent them and does not adjust "
                "them for corporate actions yet",
                details={"parameter": "adjustment"},
            )
        out = negotiate(fmt, accept)
        now = utcnow()
        closed = e <= st.gateway.last_close(now)
        key = make_key(
            "bars",
            single or "_multi",
            ",".join(symbols),
            str(tf),
            s.isoformat(),
            e.isoformat() if end else "",  # open-ended: "until now", one entry for its TTL
            source,
            feed or "",
            str(limit),
            page_token or "",
            sort,
            out,
        )

        async def load() -> Loaded:
            page = await st.gateway.bars(
                symbols, tf, s, e, source=source, feed=feed, limit=limit, page_token=page_token, sort=sort
            )
            t = utcnow()
            meta = {sym: m.to_dict(t) for sym, m in page.meta.items()}
            headers = _meta_headers(page.meta, t)
            if page.next_page_token:
                headers["X-Marketpipe-Next-Page-Token"] = page.next_page_token
            if out == "json":
                body = bars_json(
                    page.frame, single=single, timeframe=str(tf), next_token=page.next_page_token, meta=meta
                )
            else:
                body = bars_body(page.frame, out)
            ttl = ttl_for(
                "bars", market_open=st.gateway.is_market_hours(t), range_closed=closed, config=st.config.cache
            )
            return body, MEDIA[out], headers, 0.0 if page.partial else ttl  # never keep a partial answer

        return await answer(request, st, key, "bars", load)

    @r.get("/bars/{symbol}", summary="Bars for one symbol")
    async def bars_one(
        request: Request,
        st: StateDep,
        symbol: Annotated[str, Path(description="e.g. AAPL, BRK.B")],
        start: Annotated[str, Query(description="YYYY-MM-DD (New York day) or RFC-3339")],
        end: Annotated[str | None, Query()] = None,
        timeframe: Annotated[str, Query(description="1Min, 5Min, 1Hour, 1Day, …")] = "1Min",
        source: Annotated[str, Query(description="auto or a provider name")] = "auto",
        feed: Feed = None,
        adjustment: Annotated[str, Query()] = "raw",
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        page_token: Annotated[str | None, Query()] = None,
        sort: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
        format: Fmt = None,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        sym = normalize_symbol(symbol)
        return await bars(
            request,
            st,
            [sym],
            sym,
            timeframe,
            start,
            end,
            source,
            feed,
            adjustment,
            limit,
            page_token,
            sort,
            format,
            accept,
        )

    @r.get("/bars", summary="Bars for several symbols (paged across symbols, symbol then time)")
    async def bars_multi(
        request: Request,
        st: StateDep,
        symbols: Annotated[str, Query(description="comma-separated, e.g. AAPL,MSFT")],
        start: Annotated[str, Query()],
        end: Annotated[str | None, Query()] = None,
        timeframe: Annotated[str, Query()] = "1Min",
        source: Annotated[str, Query()] = "auto",
        feed: Feed = None,
        adjustment: Annotated[str, Query()] = "raw",
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        page_token: Annotated[str | None, Query()] = None,
        sort: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
        format: Fmt = None,
        accept: Annotated[str | None, Header()] = None,
    ) -> Response:
        return await bars(
            request,
            st,
            normalize_symbols(symbols),
            None,
            timeframe,
            start,
            end,
            source,
            feed,
            adjustment,
            limit,
            page_token,
            sort,
            format,
            accept,
        )

    async def latest(request: Request, st: AppState, kind: str, symbol: str, feed: str | None) -> Response:
        sym = normalize_symbol(symbol)
        key = make_key(f"latest_{kind}", sym, feed or "")

        async def load() -> Loaded:
            got = await st.gateway.latest(kind, [sym], feed=feed)  # type: ignore[arg-type]
            rec = got.get(sym)
            t = utcnow()
            if rec is None:
                view: dict[str, Any] = {"symbol": sym, kind: None, "stale": False}
            else:
                view = (st.gateway.quote_view if kind == "quote" else st.gateway.trade_view)(rec, t)
                view["stale"] = False
            headers = {
                "X-Marketpipe-Source": str(view.get("source") or ""),
                "X-Marketpipe-Fetched-At": str(view.get("fetched_at") or ""),
                "X-Marketpipe-Data-Age": str(view.get("data_age_seconds") or ""),
                "X-Marketpipe-Quality-Score": str(view.get("quality_score") or ""),
            }
            ttl = ttl_for(
                f"latest_{kind}", market_open=st.gateway.is_market_hours(t), range_closed=False, config=st.config.cache
            )
            return _json(view), MEDIA["json"], headers, ttl

        return await answer(request, st, key, f"latest_{kind}", load)

    @r.get("/quotes/{symbol}/latest", summary="Latest quote with spread, mid, market hours and data age")
    async def latest_quote(request: Request, st: StateDep, symbol: str, feed: Feed = None) -> Response:
        return await latest(request, st, "quote", symbol, feed)

    @r.get("/trades/{symbol}/latest", summary="Latest trade")
    async def latest_trade(request: Request, st: StateDep, symbol: str, feed: Feed = None) -> Response:
        return await latest(request, st, "trade", symbol, feed)

    @r.get("/snapshots", summary="Snapshots: latest trade and quote, minute, daily and previous daily bar")
    async def snapshots(
        request: Request, st: StateDep, symbols: Annotated[str, Query(description="comma-separated")], feed: Feed = None
    ) -> Response:
        syms = normalize_symbols(symbols)
        key = make_key("snapshot", syms[0] if len(syms) == 1 else "_multi", ",".join(syms), feed or "")

        async def load() -> Loaded:
            snaps = await st.gateway.snapshots(syms, feed=feed)
            t = utcnow()
            doc = {
                "snapshots": {s: st.gateway.snapshot_view(v, t) | {"stale": False} for s, v in snaps.items()},
                "missing": [s for s in syms if s not in snaps],
            }
            ttl = ttl_for(
                "snapshot", market_open=st.gateway.is_market_hours(t), range_closed=False, config=st.config.cache
            )
            return _json(doc), MEDIA["json"], {}, ttl

        return await answer(request, st, key, "snapshot", load)

    @r.get("/quality/{symbol}", summary="Completeness, anomalies and quality score of stored bars")
    async def quality(
        st: StateDep,
        symbol: str,
        start: Annotated[str, Query()],
        end: Annotated[str | None, Query()] = None,
        timeframe: Annotated[str, Query()] = "1Min",
    ) -> Response:
        sym = normalize_symbol(symbol)
        (res,) = await st.data.quality([sym], start, end, timeframe=timeframe)
        doc = {
            "symbol": sym,
            "timeframe": res.timeframe,
            "start": res.start.isoformat(),
            "end": res.end.isoformat(),
            "summary": res.summary,
            "days": res.days.with_columns(res.days["day"].cast(str)).to_dicts(),
            # at most 500 of each (the counts are in the summary); expressions, so the head is what is formatted
            "missing": res.completeness.ranges.head(500)
            .with_columns(pl.col("start", "end").dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
            .to_dicts()
            if res.completeness.ranges.height
            else [],
            "anomalies": res.findings.head(500)
            .with_columns(pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
            .drop("symbol")
            .to_dicts()
            if res.findings.height
            else [],
        }
        return Response(_json(doc), media_type=MEDIA["json"])

    @r.get("/providers", summary="Provider health: state, circuit, latency, errors, rate-limit headroom")
    async def providers(st: StateDep) -> Response:
        return Response(_json(st.gateway.datasource()["providers"]), media_type=MEDIA["json"])

    return r


def _meta_headers(meta: dict[str, Any], now: datetime) -> dict[str, str]:
    ms = list(meta.values())
    sources = sorted({s for m in ms for s in m.sources})
    fetched = max((m.fetched_at for m in ms if m.fetched_at), default=None)
    ages = [a for a in (m.data_age(now) for m in ms) if a is not None]
    scores = [m.quality_score for m in ms if m.quality_score is not None]
    return {
        "X-Marketpipe-Source": ",".join(sources),
        "X-Marketpipe-Fetched-At": fetched.isoformat() if fetched else "",
        "X-Marketpipe-Data-Age": f"{max(ages):.3f}" if ages else "",
        "X-Marketpipe-Quality-Score": f"{min(scores):.4f}" if scores else "",
        **({"X-Marketpipe-Stale": "true"} if any(m.stale for m in ms) else {}),
    }


# --- health, metrics, admin ------------------------------------------------------------------------------


def ops_router() -> Any:
    from fastapi import APIRouter

    r = APIRouter(tags=["operations"])

    @r.get("/health", summary="Liveness")
    async def health(st: StateDep) -> Response:
        return Response(
            _json({"status": "ok", "uptime_seconds": round(time.time() - st.started, 3), "version": __version__}),
            media_type=MEDIA["json"],
        )

    async def readiness(st: AppState) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            await asyncio.to_thread(st.data.store.counts)
            checks["store"] = "ok"
        except MarketpipeError as exc:
            checks["store"] = f"{exc.code}: {exc.message}"
        try:
            usable, _ = st.gateway.candidates("bars")
            checks["providers"] = "ok" if usable else "none usable"
        except MarketpipeError as exc:
            checks["providers"] = f"{exc.code}: {exc.message}"
        checks["cache"] = cache_status(st.cache)
        ready = checks["store"] == "ok" and checks["providers"] == "ok"
        return {"ready": ready, "checks": checks}

    @r.get("/health/ready", summary="Readiness: store open and at least one provider usable")
    async def ready(st: StateDep) -> Response:
        doc = await readiness(st)
        return Response(_json(doc), status_code=200 if doc["ready"] else 503, media_type=MEDIA["json"])

    @r.get("/health/providers", summary="Every provider's health")
    async def health_providers(st: StateDep) -> Response:
        return Response(_json(st.gateway.datasource()["providers"]), media_type=MEDIA["json"])

    @r.get("/health/datasource", summary="Router state: active provider, order, pinned, unavailable")
    async def health_datasource(st: StateDep) -> Response:
        return Response(_json(datasource(st)), media_type=MEDIA["json"])

    @r.get("/health/stocks", summary="Readiness, router state and providers together")
    async def health_stocks(st: StateDep) -> Response:
        doc = await readiness(st)
        doc["datasource"] = datasource(st)
        doc["market_open"] = st.gateway.is_market_hours()
        return Response(_json(doc), status_code=200 if doc["ready"] else 503, media_type=MEDIA["json"])

    @r.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        from marketpipe.core.metrics import REGISTRY

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return r


def datasource(st: AppState) -> dict[str, Any]:
    """``/health/datasource``: the REST provider order and, when streaming is on, the live router."""
    doc = st.gateway.datasource()
    doc["live"] = st.live.datasource() if st.live is not None else None
    return doc


async def admin(request: Request, st: StateDep, authorization: Annotated[str | None, Header()] = None) -> AppState:
    if not st.admin_token:
        raise _AdminDenied(403, f"admin endpoints are off: set {ADMIN_TOKEN_VAR} to enable them")
    if not authorization or not authorization.lower().startswith("bearer "):
        raise _AdminDenied(401, "admin bearer token required")
    # wrong admin tokens count toward the same per-address bound as wrong client keys
    throttle, addr, now = st.keys.throttle, client_address(request.scope), time.monotonic()
    wait = throttle.blocked(addr, now)
    if wait:
        raise throttle.refuse(wait)
    if not hmac.compare_digest(authorization[7:].strip().encode(), st.admin_token.encode()):
        throttle.fail(addr, now)
        raise _AdminDenied(403, "wrong admin token")
    return st


AdminDep = Annotated[AppState, Depends(admin)]


def admin_router() -> Any:
    from fastapi import APIRouter

    r = APIRouter(tags=["admin"])

    @r.post(
        "/admin/failover",
        summary='Pin a provider as first choice ({"provider": "polygon"}; null: health order). A provider other '
        'than alpaca also moves live data to the fallback until released; {"live": "fallback"|"auto"} drives '
        "the live router alone",
    )
    async def admin_failover(st: AdminDep, request: Request) -> Response:
        body = await _body(request)
        provider, live = body.get("provider"), body.get("live")
        if provider is not None and not isinstance(provider, str):
            raise InvalidArgument("provider must be a string or null", details={"parameter": "provider"})
        if live not in (None, "fallback", "auto"):
            raise InvalidArgument('live must be "fallback" or "auto"', details={"parameter": "live"})
        if "provider" in body or live is None:
            st.gateway.failover(provider)
            await st.cache.invalidate(kind="latest_quote")
            await st.cache.invalidate(kind="latest_trade")
        if st.live is not None:
            if live == "fallback" or (live is None and provider not in (None, "alpaca")):
                st.live.force_failover(f"admin:{provider or 'fallback'}")
            elif live == "auto" or (live is None and provider in (None, "alpaca")):
                st.live.release("admin")
        return Response(_json(datasource(st)), media_type=MEDIA["json"])

    @r.post("/admin/reconnect", summary="Rebuild every provider client and reconnect the live stream")
    async def admin_reconnect(st: AdminDep) -> Response:
        await st.gateway.reconnect()
        if st.live is not None:
            st.live.request_reconnect("admin")
        return Response(_json(datasource(st)), media_type=MEDIA["json"])

    @r.post("/admin/cache/invalidate", summary='Drop cached answers: {"symbol": "AAPL", "kind": "bars"}, both optional')
    async def admin_invalidate(st: AdminDep, request: Request) -> Response:
        body = await _body(request)
        symbol, kind = body.get("symbol"), body.get("kind")
        if symbol is not None:
            symbol = normalize_symbol(str(symbol))
        if kind is not None and (not isinstance(kind, str) or kind not in KNOWN_KINDS):
            raise InvalidArgument(
                f"kind must be one of {', '.join(sorted(KNOWN_KINDS))}", details={"parameter": "kind"}
            )
        n = await st.cache.invalidate(kind=kind, symbol=symbol)
        if symbol is not None:  # multi-symbol answers may hold this symbol too
            n += await st.cache.invalidate(kind=kind, symbol="_multi")
        return Response(_json({"invalidated": n, "symbol": symbol, "kind": kind}), media_type=MEDIA["json"])

    return r


class _AdminDenied(MarketpipeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = Unauthenticated.code if status == 401 else Forbidden.code


async def _body(request: Request) -> dict[str, Any]:
    """An admin route's JSON object body, read up to ``[server] max_body_bytes`` (413 beyond: the
    rest is not read, and nothing of it is echoed)."""
    limit = request.app.state.mp.config.server.max_body_bytes
    too_large = PayloadTooLarge(f"the body is limited to {limit} bytes", details={"parameter": "body"})
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {str(exc)[:80]}", details={"parameter": "body"}) from exc
    if not isinstance(doc, dict):
        raise InvalidArgument("the body must be a JSON object", details={"parameter": "body"})
    return doc
