"""Alpaca-compatible options stream on the gateway: ``/v1beta1/indicative`` and ``/v1beta1/opra``, so
alpaca-py's ``OptionDataStream(key, secret, url_override="ws://GATEWAY/v1beta1/opra")`` works unchanged.

As the vendor: MessagePack only — an upgrade without ``Content-Type: application/msgpack`` gets the
vendor's ``412 option messages are only available in MsgPack format`` (as JSON, the one thing such a
client reads) and is closed; ``connected``, then auth by message or ``APCA-API-*`` headers (402 when
gateway client keys are configured and the pair is not one of them; 404 no auth in time); channels
``trades`` and ``quotes`` only (400 otherwise, and for a symbol that is not an OCC contract); ``"*"`` in
``quotes`` is ``413 star subscription is not allowed for option quotes``. The path's feed is the
upstream's: the gateway keeps one vendor connection per feed (:class:`~marketpipe.service.live.options.
OptionsLive`) whatever the number of clients. Data: ``t`` ``{T,S,t,x,p,s,c}`` and ``q``
``{T,S,t,bx,bp,bs,ax,ap,as,c}``, timestamps as msgpack Timestamp ext; a client that lets
``[stream] client_queue`` messages pile up gets 407 and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from marketpipe.api.state import AppState
from marketpipe.core.errors import InvalidOptionSymbol, MarketpipeError, NotEntitled
from marketpipe.core.log import get_logger
from marketpipe.core.options import parse_occ
from marketpipe.service.live.fanout import FanoutClient, Item
from marketpipe.service.live.options import OptionsLive
from marketpipe.wire.alpaca_options import FEEDS, JSON_REFUSED, STAR_QUOTES_REFUSED, STREAM_CHANNELS, stream_path
from marketpipe.wire.alpaca_stream import AUTHENTICATED, CONNECTED, ERROR_MESSAGES, MSGPACK_CONTENT_TYPE

log = get_logger("marketpipe.api.options_stream")
AUTH_TIMEOUT_SECONDS = 10.0
_MSGPACK = msgspec.msgpack.Encoder()
QUOTE_KEYS = (("bx", "bid_exchange"), ("bp", "bid_price"), ("bs", "bid_size"), ("ax", "ask_exchange"),
              ("ap", "ask_price"), ("as", "ask_size"), ("c", "condition"))  # fmt: skip
TRADE_KEYS = (("x", "exchange"), ("p", "price"), ("s", "size"), ("c", "condition"))


def _error(code: int, msg: str | None = None) -> dict[str, Any]:
    return {"T": "error", "code": code, "msg": msg or ERROR_MESSAGES[code]}


def wire_tick(item: Item) -> dict[str, Any]:
    tick: Any = item.record
    quote = tick["type"] == "quote"
    msg = {"T": "q" if quote else "t", "S": tick["contract"], "t": tick["ts"]}
    for letter, key in QUOTE_KEYS if quote else TRADE_KEYS:
        msg[letter] = tick[key]
    return msg


def _live(st: AppState) -> OptionsLive:
    live: OptionsLive = st.options_upstream()  # shared with the live hub's options lane (/v1/stream)
    return live


class _Session:
    def __init__(self, ws: WebSocket, st: AppState, feed: str) -> None:
        self.ws, self.st, self.feed = ws, st, feed
        self.live = _live(st)
        self.client: FanoutClient | None = None
        self.subs: dict[str, dict[str, None]] = {c: {} for c in STREAM_CHANNELS}
        self.lock = asyncio.Lock()
        self.authed = False

    async def send(self, msgs: list[Any]) -> None:
        async with self.lock:
            await self.ws.send_bytes(_MSGPACK.encode(msgs))

    async def run(self) -> None:
        await self.send([CONNECTED])
        headers = self.ws.headers
        if headers.get("apca-api-key-id") is not None:
            await self.auth(headers.get("apca-api-key-id"), headers.get("apca-api-secret-key"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AUTH_TIMEOUT_SECONDS
        while not self.authed:
            try:
                raw = await asyncio.wait_for(self._receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await self.send([_error(404)])
                await self.ws.close(code=1008)
                return
            if raw is None:
                return
            msg = _decode(raw)
            if not isinstance(msg, dict) or msg.get("action") != "auth":
                await self.send([_error(401 if isinstance(msg, dict) else 400)])
                continue
            if not await self.auth(msg.get("key"), msg.get("secret")):
                return
        host = self.ws.client.host if self.ws.client else ""
        self.client = self.live.attach(f"options@{host}")
        writer = asyncio.create_task(self.writer(self.client))
        try:
            while True:
                raw = await self._receive()
                if raw is None:
                    return
                await self.on_message(raw)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            await self.live.detach(self.client)

    async def _receive(self) -> str | bytes | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        raw: str | bytes | None = message.get("bytes") if message.get("bytes") is not None else message.get("text")
        return raw if raw is not None else b""

    async def auth(self, key: Any, secret: Any) -> bool:
        keys = self.st.keys
        if not key or not secret or (keys.enabled and keys.identify(str(key), str(secret)) is None):
            await self.send([_error(402)])
            await self.ws.close(code=1008)
            return False
        self.authed = True
        await self.send([AUTHENTICATED])
        return True

    async def on_message(self, raw: str | bytes) -> None:
        msg = _decode(raw)
        action = msg.get("action") if isinstance(msg, dict) else None
        if action == "auth":
            await self.send([_error(403)])
            return
        if action not in ("subscribe", "unsubscribe") or not isinstance(msg, dict):
            await self.send([_error(400)])
            return
        add = action == "subscribe"
        asked: dict[str, list[str]] = {}
        for key, value in msg.items():
            if key == "action":
                continue
            if key not in STREAM_CHANNELS or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                await self.send([_error(400)])
                return
            try:
                asked[key] = [v if v == "*" else parse_occ(v).symbol for v in value]
            except InvalidOptionSymbol:
                await self.send([_error(400)])
                return
        if add and "*" in asked.get("quotes", []):
            code, text = STAR_QUOTES_REFUSED
            await self.send([_error(code, text)])
            return
        assert self.client is not None
        try:
            for channel, symbols in asked.items():
                await self.live.change(self.client, self.feed, channel, symbols, add=add)
        except MarketpipeError as exc:
            log.warning("options_stream_upstream_refused", feed=self.feed, code=exc.code, error=exc.message)
            await self.send([_error(409 if isinstance(exc, NotEntitled) else 500)])
            return
        for channel, symbols in asked.items():
            for s in symbols:
                if add:
                    self.subs[channel][s] = None
                else:
                    self.subs[channel].pop(s, None)
        await self.send([{"T": "subscription", **{c: list(self.subs[c]) for c in STREAM_CHANNELS}}])

    async def writer(self, client: FanoutClient) -> None:
        while True:
            notices, items = await client.next_batch()
            if client.closed is not None and client.closed != "closed":
                await self.send([_error(407)])
                await self.ws.close(code=1008, reason=ERROR_MESSAGES[407])
                return
            if not notices and not items:
                return
            if items:
                await self.send([wire_tick(i) for i in items])


def _decode(raw: str | bytes) -> Any:
    import msgpack

    try:
        return msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) else orjson.loads(raw)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None


def _endpoint(feed: str) -> Any:
    async def stream(ws: WebSocket) -> None:
        await ws.accept()
        content_type = ws.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != MSGPACK_CONTENT_TYPE:
            code, text = JSON_REFUSED
            with contextlib.suppress(Exception):
                await ws.send_text(orjson.dumps([_error(code, text)]).decode())
                await ws.close(code=1008)
            return
        with contextlib.suppress(WebSocketDisconnect):
            await _Session(ws, ws.app.state.mp, feed).run()

    stream.__name__ = f"options_stream_{feed}"
    return stream


def options_stream_router() -> APIRouter:
    r = APIRouter(tags=["alpaca-compatible"])
    for feed in FEEDS:
        r.add_api_websocket_route(stream_path(feed), _endpoint(feed), name=f"options_stream_{feed}")
    return r
