"""Live endpoints of the gateway: the unified price stream over WebSocket (``/v1/stream``) and
Server-Sent Events (``/v1/stream/sse``), and the JSON the dashboard reads (``/v1/live``; ``/v1/alerts``
is in ``api/alerts.py``).

Protocol of ``/v1/stream`` (every server frame is a JSON array of messages, like Alpaca's):

* server → ``{"type": "welcome", ...}`` on connect;
* client → ``{"action": "subscribe", "symbols": ["AAPL", "MSFT"]}`` / ``"unsubscribe"`` /
  ``{"action": "ping"}``; server → ``{"type": "subscribed", "symbols": [...]}`` (the whole list), the
  last known value of each new symbol (``stale`` says whether it is), then ``price`` updates;
  crypto pairs (``BTC/USD``) are symbols like any other, served by the hub's crypto lane, and OCC
  option contracts (``SPY261218C00240000``) by its options lane;
* ``"channels": ["prices", "trades", "quotes", "bars", "updated_bars", "daily_bars", "orderbooks"]``
  in a subscribe or unsubscribe (default ``["prices"]``) adds the stream's own records
  (``fanout.v1_json``; ``orderbooks`` for pairs only); ``subscribed`` then also has ``channels``;
* ``{"type": "status", "asset_class": ..., "state": ..., "active_source": ...}`` whenever the live
  source of that asset class changes;
* ``{"type": "warning", "code": "SLOW_CONSUMER"}`` when the client falls behind, then
  ``{"type": "error", "code": "SLOW_CONSUMER"}`` and close code 1008 with reason ``SLOW_CONSUMER: …``
  if its queue fills;
* a bad message or symbol gets ``{"type": "error", "code": ..., "message": ...}`` and the
  connection stays open.

``/v1/stream/sse?symbols=AAPL,BTC/USD,SPY261218C00240000&channels=prices,quotes`` takes the same symbols
(stocks, pairs, OCC contracts) and channels (default ``prices``) and sends the same messages as
Server-Sent Events, each an event named by its ``type`` (``welcome``, ``price``, ``trade``, ``quote``,
``status``, ...); a bad symbol, contract or channel is a 400 before the stream starts.

When client keys are configured (``MARKETPIPE_API_KEYS``) the stream takes the key as
``Authorization: Bearer KEY``, ``X-API-Key`` or ``?token=KEY`` (browsers cannot set headers on a
WebSocket); a missing or wrong key refuses the upgrade (HTTP 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response, StreamingResponse

from marketpipe import __version__
from marketpipe.api.formats import MEDIA
from marketpipe.api.middleware import v1_secret
from marketpipe.core.errors import (
    FeatureDisabled,
    InvalidAction,
    InvalidArgument,
    InvalidMessage,
    InvalidSymbol,
    InvalidSymbols,
    MarketpipeError,
    MessageTooLarge,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import FANOUT_LATENCY, FANOUT_MESSAGES
from marketpipe.core.schema import normalize_symbols
from marketpipe.service.live import PRICES, FanoutClient, LiveHub, observe_delivery, v1_json
from marketpipe.service.live.fanout import V1_JSON, V1_TYPES, Item, v1_frame

log = get_logger("marketpipe.api.live")

SSE_HEARTBEAT_SECONDS = 15.0
DROP_FLUSH_SECONDS = 1.0
CLOSE_SECONDS = 2.0  # the close frame's bound: a client that never reads cannot hold the connection
MAX_MESSAGE_BYTES = 64 * 1024
V1_CHANNELS = (PRICES, "trades", "quotes", "bars", "updated_bars", "daily_bars", "orderbooks")


def hub_of(app: Any) -> LiveHub:
    hub: LiveHub | None = getattr(app.state.mp, "live", None)
    if hub is None:
        raise FeatureDisabled("live streaming is off ([stream] enabled = false)")
    return hub


def client_key_refusal(app: Any, headers: Any, query: Any, addr: str) -> str | None:
    """The v1 key rules of the HTTP middleware, for WebSocket upgrades (plus ``?token=``): None when
    the upgrade may go on, else the close reason. Wrong keys count toward the per-address throttle."""
    keys = app.state.mp.keys
    if not keys.enabled:
        return None
    now = time.monotonic()
    wait = keys.throttle.blocked(addr, now)
    if wait:
        return f"{keys.throttle.refuse(wait).code}: too many failed key attempts; retry in {math.ceil(wait)} s"
    secret = v1_secret(headers) or query.get("token")
    if not secret:
        return "an API key is required (Authorization: Bearer KEY or ?token=KEY)"
    if keys.identify(None, secret) is None:
        keys.throttle.fail(addr, now)
        return "FORBIDDEN: unknown API key"
    return None


def batch_json(notices: list[dict[str, Any]], parts: list[bytes]) -> str:
    encoded = [orjson.dumps(n) for n in notices]
    encoded += parts
    return (b"[" + b",".join(encoded) + b"]").decode()


def _error(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **({"details": details} if details else {})}


def _welcome(hub: LiveHub, client: FanoutClient) -> dict[str, Any]:
    router = hub.router
    return {
        "type": "welcome",
        "protocol": "marketpipe.v1",
        "server": f"marketpipe {__version__}",
        "client": client.name,
        "limits": {"queue": client.limit, "max_symbols": hub.settings.max_symbols_per_client},
        "state": str(router.state),
        "active_source": router.active_source,
    }


async def _apply(hub: LiveHub, client: FanoutClient, raw: str | bytes) -> None:
    """One client message: subscribe / unsubscribe / ping. Errors go back to this client only."""
    if len(raw) > MAX_MESSAGE_BYTES:
        client.notice(_error(MessageTooLarge.code, f"messages are limited to {MAX_MESSAGE_BYTES} bytes"))
        return
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        client.notice(_error(InvalidMessage.code, 'not JSON: send {"action": "subscribe", "symbols": [...]}'))
        return
    if not isinstance(msg, dict):
        client.notice(_error(InvalidMessage.code, "a message is a JSON object with an action"))
        return
    action = msg.get("action")
    if action == "ping":
        client.notice({"type": "pong"})
        return
    if action not in ("subscribe", "unsubscribe"):
        client.notice(_error(InvalidAction.code, f"unknown action {action!r}: subscribe, unsubscribe or ping"))
        return
    symbols = msg.get("symbols")
    if isinstance(symbols, str):
        symbols = [s for s in symbols.split(",") if s.strip()]
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) for s in symbols):
        client.notice(_error(InvalidSymbols.code, "symbols must be a non-empty list of strings"))
        return
    channels = msg.get("channels", [PRICES])
    if (
        not isinstance(channels, list)
        or not channels
        or not all(isinstance(c, str) and c in V1_CHANNELS for c in channels)
    ):
        client.notice(_error(InvalidArgument.code, f"channels must be a non-empty list of {', '.join(V1_CHANNELS)}"))
        return
    try:
        for channel in dict.fromkeys(channels):
            if action == "subscribe":
                await hub.subscribe(client, channel, symbols)
            else:
                await hub.unsubscribe(client, channel, symbols)
    except MarketpipeError as exc:
        client.notice(_error(exc.code, exc.message, **(exc.details or {})))
        return
    reply: dict[str, Any] = {"type": "subscribed", "symbols": sorted(client.subscriptions.get(PRICES, ()))}
    others = {ch: sorted(v) for ch, v in client.subscriptions.items() if ch != PRICES and v}
    if others or "channels" in msg:
        reply["channels"] = others
    client.notice(reply)


def live_router() -> APIRouter:
    r = APIRouter(tags=["live"])

    @r.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        app = ws.app
        refusal = client_key_refusal(app, ws.headers, ws.query_params, ws.client.host if ws.client else "")
        if refusal is not None:
            await ws.close(code=1008, reason=refusal)
            return
        try:
            hub = hub_of(app)
        except MarketpipeError as exc:
            await ws.close(code=1013, reason=exc.message[:120])
            return
        await ws.accept()
        client = hub.attach(V1_JSON, ws.client.host if ws.client else "")
        client.notice(_welcome(hub, client))
        initial = ws.query_params.get("symbols")
        if initial:
            await _apply(hub, client, orjson.dumps({"action": "subscribe", "symbols": initial}))
        sent = FANOUT_MESSAGES.labels(V1_JSON)
        latency = FANOUT_LATENCY.labels(V1_JSON)

        async def writer() -> None:
            while True:
                notices, items = await client.next_batch()
                if not notices and not items:
                    return
                await ws.send_text(v1_frame(notices, items).decode())
                sent.inc(len(items))
                observe_delivery(latency, items)
                if client.closed is not None and not client.queue and not client.notices:
                    return

        async def reader() -> None:
            with contextlib.suppress(WebSocketDisconnect):
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        return
                    raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                    if raw is not None:
                        await _apply(hub, client, raw)

        await run_connection(hub, client, writer(), reader())
        await close_with_reason(ws, client)

    @r.get(
        "/v1/stream/sse",
        summary="Unified price updates as Server-Sent Events (?symbols=AAPL,BTC/USD,SPY261218C00240000)",
    )
    async def sse(
        request: Request,
        symbols: Annotated[
            str, Query(description="comma-separated stocks, crypto pairs and OCC option contracts", min_length=1)
        ],
        channels: Annotated[
            str | None, Query(description=f"comma-separated, of {', '.join(V1_CHANNELS)} (default prices)")
        ] = None,
    ) -> Response:
        hub = hub_of(request.app)
        syms = sse_symbols(symbols)  # a bad symbol or contract is a 400 before the stream starts
        wanted = list(dict.fromkeys(c.strip() for c in (channels or PRICES).split(",") if c.strip()))
        if not wanted or any(c not in V1_CHANNELS for c in wanted):
            raise InvalidArgument(
                f"channels must be a comma-separated list of {', '.join(V1_CHANNELS)}",
                details={"parameter": "channels"},
            )
        limit = hub.settings.max_symbols_per_client
        if len(syms) * len(wanted) > limit:
            raise InvalidArgument(f"at most {limit} subscriptions per client", details={"parameter": "symbols"})
        host = request.client.host if request.client else ""
        sent = FANOUT_MESSAGES.labels("sse")
        latency = FANOUT_LATENCY.labels("sse")

        async def events() -> AsyncIterator[bytes]:
            # The client is attached here, inside the response: whatever ends it (the client leaving
            # before the first byte included) runs the finally below.
            client = hub.attach("sse", host)
            try:
                client.notice(_welcome(hub, client))
                try:
                    for channel in wanted:
                        await hub.subscribe(client, channel, syms)
                except MarketpipeError as exc:
                    client.notice(_error(exc.code, exc.message, **(exc.details or {})))
                    client.close()
                yield b"retry: 3000\n\n"
                while True:
                    try:
                        notices, items = await asyncio.wait_for(client.next_batch(), SSE_HEARTBEAT_SECONDS)
                    except TimeoutError:
                        yield b": heartbeat\n\n"
                        continue
                    if not notices and not items:
                        return
                    out = [b"event: %s\ndata: %s\n\n" % (n["type"].encode(), orjson.dumps(n)) for n in notices]
                    out += [b"event: %s\ndata: %s\n\n" % (_event(it), it.encoded(V1_JSON, v1_json)) for it in items]
                    yield b"".join(out)
                    sent.inc(len(items))
                    observe_delivery(latency, items)
                    if client.closed is not None and not client.queue:
                        return
            finally:
                await hub.detach(client)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @r.get("/v1/live", summary="Live board: prices with sparklines, data-source router, providers, alerts")
    async def live(
        request: Request, symbols: Annotated[str | None, Query(description="comma-separated; default all")] = None
    ) -> Response:
        hub = hub_of(request.app)
        st = request.app.state.mp
        ds = hub.datasource()
        history = ds.pop("history", [])
        doc = {
            "board": hub.board(normalize_symbols(symbols) if symbols else None),
            "datasource": ds,
            "history": history[-20:],
            "providers": st.gateway.provider_rows(),
            "alerts": hub.alerts(30),
            "active_alerts": st.alerts.snapshot(0)["active"] if st.alerts is not None else [],
            "default_symbols": list(hub.settings.symbols) or ["AAPL", "MSFT", "SPY"],
        }
        return Response(orjson.dumps(doc, default=str), media_type=MEDIA["json"])

    return r


def sse_symbols(raw: str) -> list[str]:
    """``/v1/stream/sse``'s ``symbols``, keyed as ``/v1/stream`` keys them (stocks, pairs, OCC contracts)."""
    syms = list(dict.fromkeys(LiveHub.stream_symbol(PRICES, s.strip()) for s in raw.split(",") if s.strip()))
    if not syms:
        raise InvalidSymbol("no symbols given")
    return syms


def _event(item: Item) -> bytes:
    """The SSE event name of an item: ``price``, or the stream record's type (``trade``, ``quote``, ...)."""
    return b"price" if item.channel == PRICES else V1_TYPES.get(item.channel, item.channel).encode()


async def close_with_reason(ws: WebSocket, client: FanoutClient) -> None:
    """End the connection with a close frame that says why (1008 ``SLOW_CONSUMER: …`` for a dropped
    client), after the error message if the writer could not send it. Bounded by ``CLOSE_SECONDS``:
    a client that never reads cannot hold the connection open; the frame is queued before the socket
    closes, so a client that reads again finds it after what was buffered."""
    code, reason = client.close_frame
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_SECONDS):
            if client.notices:  # the writer was stuck on a client that reads nothing: the error is still here
                notices = list(client.notices)
                client.notices.clear()
                await ws.send_text(batch_json(notices, []))
            await ws.close(code=code, reason=reason)


async def run_connection(hub: LiveHub, client: FanoutClient, *coros: Any) -> None:
    """Run the connection's writer and reader until either ends. A dropped client's writer gets
    ``DROP_FLUSH_SECONDS`` to send the error (it may be stuck on a client that does not read)."""

    async def dropped() -> None:
        await client.dropped.wait()
        await asyncio.sleep(DROP_FLUSH_SECONDS)

    tasks = [asyncio.create_task(c) for c in (*coros, dropped())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect | ConnectionError):
                log.warning("fanout_connection_error", client=client.name, error=repr(exc))
    finally:
        for t in tasks:
            t.cancel()
        await hub.detach(client)
