"""Alpaca-compatible real-time crypto stream on the gateway: ``/v1beta3/crypto/{loc}``.

alpaca-py's ``CryptoDataStream(key, secret, url_override="ws://GATEWAY/v1beta3/crypto/us")`` works
unchanged. Every client of a location shares one upstream Alpaca crypto connection
(:class:`~marketpipe.service.live.crypto.CryptoHub`: reference-counted subscriptions, one hand-off
per message, late order-book subscribers get the hub's current whole book with ``"r": true``).

Protocol as the vendor's (and :mod:`marketpipe.sim.crypto_stream`'s): ``connected``; auth by
message (or headers) — with gateway client keys configured (``MARKETPIPE_API_KEYS``) the pair must
be one of them, otherwise any non-empty pair; subscribe / unsubscribe with the channels ``trades
quotes bars updatedBars dailyBars orderbooks`` and pairs (``BTC/USD``), answered with the whole state.
Errors: 400 invalid syntax (``BTCUSD``, an unknown key), 401 not authenticated, 402 auth failed (then
close), 403 already authenticated, 407 slow client (the client's queue filled: then close), 410 for a
stock-only channel, 500 internal error (the upstream failed: reconnect). JSON text frames, or msgpack
binary frames (``t`` as msgpack Timestamp) when the upgrade carries ``Content-Type: application/msgpack``.
A location outside the vendor's list closes the socket with 1008 before ``connected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import msgpack
import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from marketpipe.api.state import AppState
from marketpipe.core.errors import MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.service.live.crypto import CryptoClient, CryptoHub
from marketpipe.wire.alpaca_crypto import BASE, CHANNELS, LOCATIONS
from marketpipe.wire.alpaca_rest import one_ts_ns
from marketpipe.wire.alpaca_stream import ERROR_MESSAGES, MSGPACK_CONTENT_TYPE

log = get_logger("marketpipe.api.crypto_stream")
_PAIR = re.compile(r"^[A-Z0-9]{1,10}/[A-Z]{3,4}$")
STOCK_ONLY = frozenset({"statuses", "lulds", "imbalances", "corrections", "cancelErrors", "news", "pricing"})


class _Session:
    def __init__(self, ws: WebSocket, loc: str, hub: CryptoHub, st: AppState) -> None:
        self.ws, self.loc, self.hub, self.st = ws, loc, hub, st
        self.binary = ws.headers.get("content-type", "").split(";")[0].strip().lower() == MSGPACK_CONTENT_TYPE
        self.authed = False
        self.client: CryptoClient = hub.client()
        self.writer: asyncio.Task[None] | None = None

    async def send(self, msgs: list[dict[str, Any]]) -> None:
        if self.binary:
            await self.ws.send_bytes(msgpack.packb([_packable(m) for m in msgs]))
        else:
            await self.ws.send_text(orjson.dumps(msgs).decode())

    async def error(self, code: int, *, close: bool = False) -> None:
        await self.send([{"T": "error", "code": code, "msg": ERROR_MESSAGES[code]}])
        if close:
            await self.ws.close(code=1008)

    async def on_message(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            await self.error(400)
            return
        action = obj.get("action")
        if action == "auth":
            await self.auth(obj.get("key"), obj.get("secret"))
            return
        code = 400 if action not in ("subscribe", "unsubscribe") else None if self.authed else 401
        if code is not None:
            await self.error(code)
            return
        changes: dict[str, list[str]] = {}
        for k, v in obj.items():
            if k == "action":
                continue
            if k in STOCK_ONLY:
                await self.error(410)
                return
            if (
                k not in CHANNELS
                or not isinstance(v, list)
                or not all(isinstance(s, str) and _PAIR.match(s) for s in v)
            ):
                await self.error(400)
                return
            changes[k] = list(dict.fromkeys(v))
        if not changes:
            await self.error(400)
            return
        try:
            await self.hub.change(self.loc, self.client, changes, add=action == "subscribe")
        except MarketpipeError as exc:
            log.warning("crypto_stream_upstream_failed", location=self.loc, code=exc.code, error=exc.message)
            await self.error(500)
            return
        await self.send([{"T": "subscription", **{c: list(self.client.subs[c]) for c in CHANNELS}}])
        if self.writer is None:
            self.writer = asyncio.create_task(self.write())

    async def auth(self, key: Any, secret: Any) -> None:
        if self.authed:
            await self.error(403)
            return
        keys = self.st.keys
        if not key or not secret or (keys.enabled and keys.identify(str(key), str(secret)) is None):
            await self.error(402, close=True)
            return
        self.authed = True
        await self.send([{"T": "success", "msg": "authenticated"}])

    async def write(self) -> None:
        while True:
            msgs = await self.client.queue.get()
            if msgs is None:
                await self.error(407, close=True)
                return
            await self.send(msgs)


def _packable(msg: dict[str, Any]) -> dict[str, Any]:
    t = msg.get("t")
    if isinstance(t, str):
        return {**msg, "t": msgpack.Timestamp.from_unix_nano(one_ts_ns(t))}
    return msg


def crypto_stream_router() -> APIRouter:
    r = APIRouter()

    @r.websocket(f"{BASE}/{{loc}}")
    async def crypto_stream(ws: WebSocket, loc: str) -> None:
        if loc not in LOCATIONS:
            await ws.close(code=1008)
            return
        st: AppState = ws.app.state.mp
        session = _Session(ws, loc, st.crypto_upstream(), st)
        await ws.accept()
        try:
            await session.send([{"T": "success", "msg": "connected"}])
            key, secret = ws.headers.get("apca-api-key-id"), ws.headers.get("apca-api-secret-key")
            if key is not None or secret is not None:
                await session.auth(key, secret)
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    if message.get("bytes") is not None:
                        obj = msgpack.unpackb(message["bytes"])
                    else:
                        obj = orjson.loads(message.get("text") or "")
                except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                    await session.error(400)
                    continue
                await session.on_message(obj)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if session.writer is not None:
                session.writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await session.writer
            with contextlib.suppress(MarketpipeError):
                await session.hub.leave(loc, session.client)

    return r
