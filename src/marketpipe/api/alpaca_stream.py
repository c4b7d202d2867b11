"""Alpaca-compatible real-time stock stream served by the gateway: ``/v2/iex``, ``/v2/sip``, ``/v2/test``.

Speaks Alpaca's stream protocol (shared/reference/market-data-apis.md §2, as the simulator plays it in
:mod:`marketpipe.sim.stream`), so the official ``alpaca-py``
``StockDataStream(key, secret, url_override="ws://GATEWAY/v2/iex")`` works unchanged against the gateway.

One upstream feed for every path: the gateway's :class:`~marketpipe.service.live.LiveHub` owns the one
Alpaca connection (``[stream] feed``, default the Alpaca provider's feed), and ``/v2/iex``, ``/v2/sip``
and ``/v2/test`` all serve what it delivers — the path does not choose a feed (on ``/v2/test`` subscribe
``FAKEPACA`` only when the hub's own feed is ``test``). Only the stream's own messages are forwarded:
while the hub polls a fallback vendor, the Alpaca channels carry nothing (Alpaca's format has no field
to say that another vendor's data is in it).

Protocol:

* ``[{"T":"success","msg":"connected"}]`` right after the upgrade; then auth by message
  ``{"action":"auth","key":...,"secret":...}`` or by ``APCA-API-KEY-ID`` / ``APCA-API-SECRET-KEY``
  headers on the upgrade (then ``authenticated`` is pushed unprompted) →
  ``[{"T":"success","msg":"authenticated"}]``. When gateway client keys are configured
  (``MARKETPIPE_API_KEYS="id:secret,..."``) the pair must be one of them; otherwise any non-empty pair
  is accepted — but the auth step is still required, as at Alpaca.
* ``{"action":"subscribe"|"unsubscribe","trades":[...],"quotes":[...],"bars":[...],"updatedBars":[...],
  "dailyBars":[...],"statuses":[...],"lulds":[...],"imbalances":[...]}`` (symbols or ``"*"``; symbols are
  normalised, ``aapl`` → ``AAPL``) → ``[{"T":"subscription", <all eight channels>, "corrections": <trades>,
  "cancelErrors": <trades>}]``, the complete state, symbols in the order first subscribed. A failed
  subscribe changes nothing. No data of a newly subscribed symbol goes out before the reply, none of a
  removed one after it.
* Errors ``[{"T":"error","code":N,"msg":...}]``: 400 ``invalid syntax`` (not JSON/msgpack, not an
  object, unknown action, a channel value that is not a list of strings, an invalid symbol, no or an
  unknown channel key), 401 ``not authenticated`` (subscribe before auth), 402 ``auth failed``, 403
  ``already authenticated``, 404 ``auth timeout`` (no auth within ``AUTH_TIMEOUT_SECONDS``), 405
  ``symbol limit exceeded`` (over ``[stream] max_symbols_per_client`` (channel, symbol) pairs, or the
  vendor refused the symbols), 407 ``slow client`` (the client let ``[stream] client_queue`` messages
  pile up: the error, then close 1008 — it cannot arrive when the client reads nothing at all), 410
  ``invalid subscribe action for this feed`` (``orderbooks``, ``news``, ``pricing``), 500 ``internal
  error``. After 402 and 404 the socket is closed (1008); after the others it stays open.
* JSON text frames, or MessagePack binary frames when the upgrade carries ``Content-Type:
  application/msgpack`` (timestamps then msgpack Timestamp ext −1). Client messages are read as JSON
  from text frames and as msgpack from binary frames. Every frame is an array: control messages alone,
  data messages in batches (one frame per writer wake-up, up to 1,000 messages); each message is
  encoded once per wire format however many clients receive it.
* Data: ``t`` trades ``{T,S,i,x,p,s,c,t,z}``, ``q`` quotes ``{T,S,bx,bp,bs,ax,ap,as,c,t,z}``, ``b``/``u``/``d``
  bars ``{T,S,o,h,l,c,v,t,n,vw}``, ``s`` statuses, ``l`` LULD bands, ``i`` imbalances, ``c`` corrections and
  ``x`` cancel/errors (§2.8), from the hub's canonical records. Trades and quotes keep the vendor's
  nanoseconds (the records' ``ts_ns``; JSON: RFC 3339, e.g. ``2024-03-05T15:02:11.308411571Z``; msgpack:
  the Timestamp extension's nanoseconds); bars and events are stamped as the hub holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from marketpipe.api.live import batch_json, hub_of, run_connection
from marketpipe.core.errors import InvalidArgument, MarketpipeError, NotEntitled, ProviderBadRequest, SlowConsumer
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import FANOUT_LATENCY, FANOUT_MESSAGES
from marketpipe.core.schema import normalize_symbol
from marketpipe.service.live import ALPACA_PROTOCOL, WILDCARD, FanoutClient, Item, LiveHub, observe_delivery
from marketpipe.wire.alpaca_stream import (
    AUTHENTICATED,
    CHANNEL_NAMES,
    CHANNELS,
    CONNECTED,
    ERROR_MESSAGES,
    FOLLOWS_TRADES,
    FRAME_ERRORS,
    MSGPACK_CONTENT_TYPE,
    SERVED_FEEDS,
    Error,
    Subscription,
    array_header,
    control_frame,
    decode_client,
    message_of,
    parse_subscription,
)
from marketpipe.wire.alpaca_stream import encode_json as _json
from marketpipe.wire.alpaca_stream import encode_msgpack as _msgpack

log = get_logger("marketpipe.api.alpaca_stream")

FEEDS = SERVED_FEEDS
PROTOCOL = ALPACA_PROTOCOL
AUTH_TIMEOUT_SECONDS = 10.0
CLOSE_SECONDS = 2.0
MAX_MESSAGE_BYTES = 1 << 20
FATAL = frozenset({402, 404})
FOLLOWS = dict.fromkeys(FOLLOWS_TRADES, "trades")  # hub channel -> the subscription it rides on
JSON_FORMAT = "alpaca-json"
MSGPACK_FORMAT = "alpaca-msgpack"
WIRE_FORMAT = "alpaca-wire"  # the message as a struct, shared by both encodings
# --- encoding -------------------------------------------------------------------------------------------


def wire_message(item: Item) -> msgspec.Struct | None:
    """The Alpaca message of a hub item (a struct tagged with ``T``); None for what Alpaca's format
    cannot carry (unified prices, unknown upstream messages)."""
    rec = item.record
    return None if isinstance(rec, dict) else message_of(rec, item.channel, item.symbol)


def encode_json(item: Item) -> bytes | None:
    msg = item.encoded(WIRE_FORMAT, wire_message)
    return None if msg is None else _json(msg)


def encode_msgpack(item: Item) -> bytes | None:
    msg = item.encoded(WIRE_FORMAT, wire_message)
    return None if msg is None else _msgpack(msg)  # datetimes -> Timestamp ext -1


def _error(code: int) -> Error:
    return Error.of(code)


def _error_code(exc: MarketpipeError) -> int:
    if isinstance(exc, NotEntitled) or (isinstance(exc, InvalidArgument) and "limit" in (exc.details or {})):
        return 405  # the vendor's symbol limit, or the hub's per-client one
    if isinstance(exc, InvalidArgument) or exc.code == ProviderBadRequest.code:
        return 400
    return 500


# --- one connection -------------------------------------------------------------------------------------


def _symbol_or_none(raw: str) -> str | None:
    if raw == WILDCARD:
        return raw
    try:
        return normalize_symbol(raw)
    except MarketpipeError:
        return None


class _Session:
    """One client connection: auth state, the subscription the client was last told about, and the
    send lock that keeps control replies and data frames in order."""

    def __init__(self, ws: WebSocket, hub: LiveHub, feed: str) -> None:
        self.ws = ws
        self.hub = hub
        self.feed = feed
        content_type = ws.headers.get("content-type", "").split(";")[0].strip().lower()
        self.binary = content_type == MSGPACK_CONTENT_TYPE
        self.fmt = MSGPACK_FORMAT if self.binary else JSON_FORMAT
        self.encode: Callable[[Item], bytes | None] = encode_msgpack if self.binary else encode_json
        self.authed = False
        self.closing = False  # a fatal error was sent
        self.key_id = ""
        self.client: FanoutClient | None = None
        # what the client was last told, per hub channel, in first-subscribed order
        self.announced: dict[str, dict[str, None]] = {ch: {} for ch in CHANNELS}
        self.changing = False  # a subscription change is under way
        self.epoch = 0  # subscription replies sent
        self.sent_slow = False
        self.lock = asyncio.Lock()

    # --- sending ------------------------------------------------------------------------------------
    async def _send(self, frame: bytes) -> None:
        if self.binary:
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_text(frame.decode())

    async def _send_control(self, msg: Any) -> None:
        """A control message, alone in its frame (the caller holds the lock, or no writer runs yet)."""
        await self._send(control_frame(msg, self.binary))

    async def control(self, msg: Any) -> None:
        async with self.lock:
            await self._send_control(msg)

    async def error(self, code: int) -> None:
        await self.control(_error(code))
        if code in FATAL:
            self.closing = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=1008, reason=ERROR_MESSAGES[code]), CLOSE_SECONDS)

    # --- client messages ----------------------------------------------------------------------------
    async def on_message(self, raw: str | bytes) -> None:
        if len(raw) > MAX_MESSAGE_BYTES:
            await self.error(400)
            return
        try:
            obj = decode_client(raw)
        except FRAME_ERRORS:
            await self.error(400)
            return
        action = obj.get("action") if isinstance(obj, dict) else None
        if action == "auth":
            if self.authed:
                await self.error(403)
                return
            key, secret = obj.get("key"), obj.get("secret")
            await self.auth(key if isinstance(key, str) else None, secret if isinstance(secret, str) else None)
        elif action in ("subscribe", "unsubscribe"):
            if not self.authed or self.client is None:
                await self.error(401)
                return
            await self.change(obj, add=action == "subscribe")
        else:
            await self.error(400)

    async def auth(self, key: str | None, secret: str | None) -> None:
        keys = self.ws.app.state.mp.keys
        if not key or not secret or (keys.enabled and keys.identify(key, secret) is None):
            log.info("alpaca_stream_auth_failed", feed=self.feed, key=key)
            await self.error(402)
            return
        self.authed, self.key_id = True, key
        await self.control(AUTHENTICATED)

    async def change(self, obj: dict[str, Any], *, add: bool) -> None:
        """Subscribe or unsubscribe: validate the whole request first, then apply it to the hub (undone
        if the hub or the vendor refuses part of it), then tell the client the complete state."""
        client = self.client
        assert client is not None
        parsed = parse_subscription(obj, _symbol_or_none)
        if isinstance(parsed, int):
            await self.error(parsed)
            return
        changes = {CHANNEL_NAMES[key]: syms for key, syms in parsed.items()}
        hub = self.hub
        subs = client.subscriptions
        if add:
            new = sum(1 for ch, syms in changes.items() for s in syms if s not in subs.get(ch, ()))
            if sum(len(v) for v in subs.values()) + new > hub.settings.max_symbols_per_client:
                await self.error(405)
                return
        before = {ch: set(subs.get(ch, ())) for ch in changes}
        self.changing = True
        try:
            try:
                for ch, syms in changes.items():
                    if add:
                        await hub.subscribe(client, ch, syms)
                    else:
                        await hub.unsubscribe(client, ch, syms)
            except MarketpipeError as exc:
                for ch, had in before.items():  # undo: a failed subscribe changes nothing
                    extra = subs.get(ch, set()) - had
                    if extra:
                        await hub.unsubscribe(client, ch, extra)
                log.info("alpaca_stream_subscribe_refused", client=client.name, code=exc.code, error=exc.message)
                await self.error(_error_code(exc))
                return
            async with self.lock:
                for ch, syms in changes.items():
                    have = subs.get(ch, set())
                    kept = {s: None for s in self.announced[ch] if s in have}
                    kept.update((s, None) for s in syms if s in have)
                    kept.update((s, None) for s in sorted(have - kept.keys()))
                    self.announced[ch] = kept
                await self._send_control(self.subscription())
                self.epoch += 1
        finally:
            self.changing = False

    def subscription(self) -> Subscription:
        return Subscription.of(self.announced)

    def wanted(self, item: Item) -> bool:
        syms = self.announced.get(FOLLOWS.get(item.channel, item.channel))
        return syms is not None and (item.symbol in syms or WILDCARD in syms)

    # --- the two tasks ------------------------------------------------------------------------------
    async def writer(self) -> None:
        client = self.client
        assert client is not None
        fmt, encode = self.fmt, self.encode
        sent = FANOUT_MESSAGES.labels(PROTOCOL)
        latency = FANOUT_LATENCY.labels(PROTOCOL)
        seen_epoch = 0
        recheck = 0  # items still to check against the announced subscription
        while True:
            notices, items = await client.next_batch()
            if not notices and not items:
                return
            async with self.lock:
                for notice in notices:
                    msg = self.translate(notice)
                    if msg is not None:
                        await self._send_control(msg)
                if items:
                    if self.changing or self.epoch != seen_epoch:
                        # everything queued so far may predate the reply: check it against what was announced
                        seen_epoch = self.epoch
                        recheck = len(items) + len(client.queue)
                    parts: list[bytes] = []
                    for it in items:
                        if recheck:
                            recheck -= 1
                            if not self.wanted(it):
                                continue
                        part = it.encoded(fmt, encode)
                        if part is not None:
                            parts.append(part)
                    if parts:
                        if self.binary:
                            await self.ws.send_bytes(array_header(len(parts)) + b"".join(parts))
                        else:
                            await self.ws.send_text(batch_json([], parts))
                        sent.inc(len(parts))
                        observe_delivery(latency, items)
            if client.closed is not None and not client.queue and not client.notices:
                return

    def translate(self, notice: dict[str, Any]) -> Error | None:
        """A hub notice in Alpaca's terms: the slow-consumer error is 407; warnings and status changes
        have no Alpaca message (clients would not know them) and are only logged."""
        if notice.get("type") == "error":
            if notice.get("code") == SlowConsumer.code:
                self.sent_slow = True
                return _error(407)
            return _error(500)
        log.debug("alpaca_stream_notice", client=self.client.name if self.client else "", notice=notice.get("code"))
        return None

    async def reader(self) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while not self.closing:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                if raw is not None:
                    await self.on_message(raw)

    # --- the connection -----------------------------------------------------------------------------
    async def authenticate(self) -> bool:
        """Welcome, then wait for a successful auth (headers or message) until the auth timeout."""
        await self.control(CONNECTED)
        headers = self.ws.headers
        key, secret = headers.get("apca-api-key-id"), headers.get("apca-api-secret-key")
        if key is not None or secret is not None:
            await self.auth(key, secret)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AUTH_TIMEOUT_SECONDS
        while not self.authed and not self.closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                await self.error(404)
                break
            try:
                message = await asyncio.wait_for(self.ws.receive(), remaining)
            except TimeoutError:
                continue  # the deadline check above answers it
            if message["type"] == "websocket.disconnect":
                return False
            raw = message.get("text") if message.get("text") is not None else message.get("bytes")
            if raw is not None:
                await self.on_message(raw)
        return self.authed and not self.closing

    async def run(self) -> None:
        ws, hub = self.ws, self.hub
        with contextlib.suppress(WebSocketDisconnect):
            if not await self.authenticate():
                return
        try:
            host = ws.client.host if ws.client else ""
            client = self.client = hub.attach(PROTOCOL, f"{self.key_id}@{host}")
        except MarketpipeError:
            with contextlib.suppress(Exception):
                await self.control(_error(500))
                await asyncio.wait_for(ws.close(code=1011, reason=ERROR_MESSAGES[500]), CLOSE_SECONDS)
            return
        await run_connection(hub, client, self.writer(), self.reader())
        slow = client.closed == "slow_consumer" or self.sent_slow
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_SECONDS):
                if slow and not self.sent_slow:  # the writer was stuck on a client that reads nothing
                    self.sent_slow = True
                    await self.control(_error(407))
                await ws.close(code=1008 if slow else 1000, reason=ERROR_MESSAGES[407] if slow else "")


async def _serve(ws: WebSocket, feed: str) -> None:
    try:
        hub = hub_of(ws.app)
    except MarketpipeError as exc:
        await ws.close(code=1013, reason=exc.message[:120])
        return
    await ws.accept()
    await _Session(ws, hub, feed).run()


def _endpoint(feed: str) -> Callable[[WebSocket], Any]:
    async def stream(ws: WebSocket) -> None:
        await _serve(ws, feed)

    stream.__name__ = f"alpaca_stream_{feed}"
    return stream


def alpaca_stream_router() -> APIRouter:
    """The Alpaca-compatible stream endpoints (``/v2/iex``, ``/v2/sip``, ``/v2/test``); see the module
    docstring."""
    r = APIRouter(tags=["alpaca-compatible"])
    for feed in FEEDS:
        r.add_api_websocket_route(f"/v2/{feed}", _endpoint(feed), name=f"alpaca_stream_{feed}")
    return r
