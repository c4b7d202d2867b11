"""Operations: liveness and readiness (``/health*``), Prometheus ``/metrics``, and the admin routes
(failover, reconnect, cache invalidation, the audit log) behind the ``MARKETPIPE_ADMIN_TOKEN`` bearer
token. Every admin request — refused ones too — is written to the store's ``audit_log``."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from marketpipe import __version__
from marketpipe.api.formats import MEDIA, json_body
from marketpipe.api.middleware import client_address
from marketpipe.api.state import ADMIN_TOKEN_VAR, AppState, StateDep
from marketpipe.cache import TieredCache
from marketpipe.core.config import KNOWN_KINDS
from marketpipe.core.errors import Forbidden, InvalidArgument, MarketpipeError, PayloadTooLarge, Unauthenticated
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import AUDIT_WRITE_FAILURES, REGISTRY
from marketpipe.core.schema import normalize_symbol
from marketpipe.core.validation import validate_enum, validate_limit, validate_type

log = get_logger("marketpipe.api")


def cache_status(cache: TieredCache) -> dict[str, Any]:
    l2 = cache.l2
    return {
        "memory": {"entries": len(cache.l1), "bytes": cache.l1.bytes_used},
        "redis": None if l2 is None else ("up" if l2.available else "down (serving from memory and the store)"),
    }


def ops_router() -> APIRouter:
    r = APIRouter(tags=["operations"])

    @r.get("/health", summary="Liveness")
    async def health(st: StateDep) -> Response:
        return Response(
            json_body({"status": "ok", "uptime_seconds": round(time.time() - st.started, 3), "version": __version__}),
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
        redis_ok = True
        if st.cache.l2 is not None:  # a configured Redis that does not answer: not ready (still alive)
            redis_ok = await st.cache.l2.ping()
            checks["cache"]["redis"] = "up" if redis_ok else "down (unreachable: serving from memory and the store)"
        bus_ok = True
        if st.bus is not None:  # [bus] url: a lost NATS connection is not ready (it reconnects by itself)
            bus_ok = bool(st.bus.bus.nc.is_connected)
            checks["bus"] = "ok" if bus_ok else "down (reconnecting; events buffered within their bound)"
        ready = checks["store"] == "ok" and checks["providers"] == "ok" and redis_ok and bus_ok
        return {"ready": ready, "checks": checks}

    @r.get(
        "/health/ready",
        summary="Readiness: store reachable, at least one provider usable, the configured Redis answering and "
        "the configured bus connected (503 otherwise; /health, liveness, stays 200)",
    )
    async def ready(st: StateDep) -> Response:
        doc = await readiness(st)
        return Response(json_body(doc), status_code=200 if doc["ready"] else 503, media_type=MEDIA["json"])

    @r.get("/health/providers", summary="Every provider's health")
    async def health_providers(st: StateDep) -> Response:
        return Response(json_body(st.gateway.datasource()["providers"]), media_type=MEDIA["json"])

    @r.get("/health/datasource", summary="Router state: active provider, order, pinned, unavailable")
    async def health_datasource(st: StateDep) -> Response:
        return Response(json_body(datasource(st)), media_type=MEDIA["json"])

    @r.get("/health/stocks", summary="Readiness, router state and providers together")
    async def health_stocks(st: StateDep) -> Response:
        doc = await readiness(st)
        doc["datasource"] = datasource(st)
        doc["market_open"] = st.gateway.is_market_hours()
        return Response(json_body(doc), status_code=200 if doc["ready"] else 503, media_type=MEDIA["json"])

    @r.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
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


class AuditedRoute(APIRoute):
    """An admin route whose every request, answered or refused, is written to the audit log."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def audited(request: Request) -> Response:
            try:
                response = await handler(request)
            except MarketpipeError as exc:
                actor = "anonymous" if isinstance(exc, _AdminDenied) else "admin"
                await _audit(request, actor, exc.http_status, exc.code)
                raise
            await _audit(request, "admin", response.status_code, None)
            return response

        return audited


async def _audit(request: Request, actor: str, status: int, code: str | None) -> None:
    """One ``audit_log`` row. A store that cannot take it is logged and counted; the admin request's
    own answer is not changed by it."""
    st: AppState = request.app.state.mp
    raw = getattr(request.state, "admin_body", None)
    row: dict[str, object] = {
        "occurred_at": datetime.now(UTC),
        "actor": actor,
        "address": client_address(request.scope),
        "action": f"{request.method} {request.url.path}",
        "params": raw.decode("utf-8", "replace") if raw else None,
        "status": status,
        "code": code,
        "request_id": request.scope.get("state", {}).get("request_id"),
    }
    try:
        await asyncio.to_thread(st.data.store.log_admin_action, row)
    except MarketpipeError as exc:
        AUDIT_WRITE_FAILURES.inc()
        log.error("audit_write_failed", action=row["action"], actor=actor, code=exc.code, error=exc.message)
    else:
        log.info("admin_action", action=row["action"], actor=actor, status=status, code=code)


def admin_router() -> APIRouter:
    r = APIRouter(tags=["admin"], route_class=AuditedRoute)

    @r.post(
        "/admin/failover",
        summary='Pin a provider as first choice ({"provider": "polygon"}; null: health order). A provider other '
        'than alpaca also moves live data to the fallback until released; {"live": "fallback"|"auto"} drives '
        "the live router alone",
    )
    async def admin_failover(st: AdminDep, request: Request) -> Response:
        body = await _body(request)
        provider, live = body.get("provider"), body.get("live")
        validate_type(provider, (str, type(None)), "provider", message="provider must be a string or null")
        if live is not None:
            validate_enum(live, ("fallback", "auto"), "live", message='live must be "fallback" or "auto"')
        if "provider" in body or live is None:
            st.gateway.failover(provider)
            await st.cache.invalidate(kind="latest_quote")
            await st.cache.invalidate(kind="latest_trade")
        if st.live is not None:
            if live == "fallback" or (live is None and provider not in (None, "alpaca")):
                st.live.force_failover(f"admin:{provider or 'fallback'}")
            elif live == "auto" or (live is None and provider in (None, "alpaca")):
                st.live.release("admin")
        return Response(json_body(datasource(st)), media_type=MEDIA["json"])

    @r.post("/admin/reconnect", summary="Rebuild every provider client and reconnect the live stream")
    async def admin_reconnect(st: AdminDep) -> Response:
        await st.gateway.reconnect()
        if st.live is not None:
            st.live.request_reconnect("admin")
        return Response(json_body(datasource(st)), media_type=MEDIA["json"])

    @r.post("/admin/cache/invalidate", summary='Drop cached answers: {"symbol": "AAPL", "kind": "bars"}, both optional')
    async def admin_invalidate(st: AdminDep, request: Request) -> Response:
        body = await _body(request)
        symbol, kind = body.get("symbol"), body.get("kind")
        if symbol is not None:
            symbol = normalize_symbol(str(symbol))
        if kind is not None:
            validate_enum(kind, sorted(KNOWN_KINDS), "kind", message="{param} must be one of {allowed}")
        n = await st.cache.invalidate(kind=kind, symbol=symbol)
        if symbol is not None:  # multi-symbol answers may hold this symbol too
            n += await st.cache.invalidate(kind=kind, symbol="_multi")
        return Response(json_body({"invalidated": n, "symbol": symbol, "kind": kind}), media_type=MEDIA["json"])

    @r.get("/admin/audit", summary="The audit log: every admin request (who, what, when, how it ended), newest first")
    async def admin_audit(st: AdminDep, limit: Annotated[str, Query()] = "100") -> Response:
        rows = await asyncio.to_thread(st.data.store.admin_actions, validate_limit(limit, 1, 10_000))
        return Response(json_body({"actions": rows.to_dicts()}), media_type=MEDIA["json"])

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
    request.state.admin_body = raw  # what the audit log records
    if not raw.strip():
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the body is not valid JSON: {str(exc)[:80]}", details={"parameter": "body"}) from exc
    if not isinstance(doc, dict):
        raise InvalidArgument("the body must be a JSON object", details={"parameter": "body"})
    return doc
