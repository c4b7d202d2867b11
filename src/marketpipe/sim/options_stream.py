"""Alpaca's real-time options stream on the simulator: ``/v1beta1/indicative`` and ``/v1beta1/opra``.

MessagePack only, as the vendor: an upgrade without ``Content-Type: application/msgpack`` gets
``[{"T":"error","code":412,"msg":"option messages are only available in MsgPack format"}]`` (JSON, the
one thing it can read) and is closed. Otherwise the session is the stock stream's: ``connected``, auth by
message (402 wrong key, 409 ``insufficient subscription`` for ``opra`` on a free key, 404 no auth within
``auth_timeout_s``), then ``subscribe`` / ``unsubscribe`` with channels ``trades`` and ``quotes`` only
(any other channel is 400; a symbol that is not an OCC contract is 400; ``"*"`` in ``quotes`` is
``413 star subscription is not allowed for option quotes``). Each change is answered with
``{"T":"subscription","trades":[...],"quotes":[...]}``.

Data: every ``1 / rate`` seconds, for each subscribed contract, its quote (``T:"q"``) and, when it has one,
its last trade (``T:"t"``) from :class:`~marketpipe.sim.options.OptionsMarket` (so the stream agrees with
the REST snapshot), stamped with the wall clock as msgpack Timestamp extension values; ``*`` in ``trades``
streams nothing (the simulator has no universe of every contract).

Faults, as the stock stream's (:class:`~marketpipe.sim.stream.StreamControl`): ``faults`` is a
:class:`~marketpipe.sim.stream.DropFaults` — ``drop_after_s``: every authenticated connection is dropped
(TCP abort, no close frame) this many seconds after auth, before any more data, so a reconnect loop meets
the fault again on every connection. :meth:`OptionsStream.drop` (from another thread:
``SimServer.drop_option_streams``) drops the connections open now (``abrupt``: TCP abort, else a close
frame 1001). HTTP control (no auth, never faulted): ``GET /_sim/options/stream``,
``PUT``/``DELETE /_sim/options/stream/faults``, ``POST /_sim/options/stream/drop`` (optional body
``{"feed": "opra", "abrupt": true}``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
from aiohttp import WSMsgType, web

from marketpipe.core.errors import InvalidOptionSymbol
from marketpipe.core.options import OccSymbol, parse_occ
from marketpipe.sim.admin import SIM_HEADER
from marketpipe.sim.data import NS_PER_SEC
from marketpipe.sim.options import OptionsMarket
from marketpipe.sim.stream import DropFaults, StreamConn, StreamControl
from marketpipe.wire.alpaca_options import FEEDS, JSON_REFUSED, STAR_QUOTES_REFUSED, STREAM_CHANNELS, stream_path
from marketpipe.wire.alpaca_stream import AUTHENTICATED, CONNECTED, ERROR_MESSAGES, MSGPACK_CONTENT_TYPE

_MSGPACK = msgspec.msgpack.Encoder()


def _error(code: int, msg: str | None = None) -> dict[str, Any]:
    return {"T": "error", "code": code, "msg": msg or ERROR_MESSAGES[code]}


@dataclass(eq=False)
class _Conn(StreamConn):
    authed_at: float = 0.0  # loop time


class OptionsStream(StreamControl[_Conn, DropFaults]):
    """The options stream endpoints over an :class:`OptionsMarket` (one per simulator)."""

    def __init__(
        self,
        options: OptionsMarket,
        keys: dict[str, tuple[str, str]],
        *,
        rate: float = 20.0,
        auth_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(DropFaults, FEEDS)
        self.options = options
        self.keys = keys
        self.rate = rate
        self.auth_timeout_s = auth_timeout_s

    def mount(self, app: web.Application) -> None:
        paths = {stream_path(feed): feed for feed in FEEDS}

        @web.middleware
        async def options_stream_first(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            feed = paths.get(request.path)
            if feed is not None:
                return await self.handle(request, feed)
            return await handler(request)

        app.middlewares.insert(0, options_stream_first)
        self.add_control_routes(app, "/_sim/options/stream")
        app.on_shutdown.append(self._close_all)

    async def _close_all(self, _: web.Application) -> None:
        for conn in list(self._conns):
            await conn.ws.close(code=1001)

    async def handle(self, request: web.Request, feed: str) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        ws.headers[SIM_HEADER] = "1"  # like every REST answer: clients label the data sim:alpaca
        await ws.prepare(request)
        if not request.headers.get("Content-Type", "").lower().startswith(MSGPACK_CONTENT_TYPE):
            code, msg = JSON_REFUSED
            await ws.send_str(orjson.dumps([_error(code, msg)]).decode())
            await ws.close(code=1008)
            return ws
        conn = _Conn(ws, request, feed)
        self._conns.add(conn)
        subs: dict[str, dict[str, OccSymbol | None]] = {c: {} for c in STREAM_CHANNELS}
        pump: asyncio.Task[None] | None = None
        try:
            await ws.send_bytes(_MSGPACK.encode([CONNECTED]))
            if not await self._auth(ws, feed):
                return ws
            conn.authed_at = asyncio.get_running_loop().time()
            pump = asyncio.create_task(self._pump(conn, subs))
            async for frame in ws:
                if frame.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                    break
                await self._on_message(ws, frame.data, subs)
        except ConnectionError:
            pass  # dropped, or the client went away mid-send
        finally:
            self._conns.discard(conn)
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        return ws

    @staticmethod
    def _decode(data: str | bytes) -> Any:
        import msgpack

        try:
            return msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else orjson.loads(data)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return None

    async def _send(self, ws: web.WebSocketResponse, msgs: list[Any]) -> None:
        if not ws.closed:
            await ws.send_bytes(_MSGPACK.encode(msgs))

    async def _auth(self, ws: web.WebSocketResponse, feed: str) -> bool:
        while True:
            try:
                frame = await ws.receive(timeout=self.auth_timeout_s)
            except TimeoutError:
                await self._send(ws, [_error(404)])
                await ws.close(code=1008)
                return False
            if frame.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return False
            msg = self._decode(frame.data)
            if not isinstance(msg, dict) or msg.get("action") != "auth":
                await self._send(ws, [_error(401 if isinstance(msg, dict) else 400)])
                continue
            known = self.keys.get(str(msg.get("key")))
            if known is None or known[0] != msg.get("secret"):
                await self._send(ws, [_error(402)])
                await ws.close(code=1008)
                return False
            if feed == "opra" and known[1] == "free":
                await self._send(ws, [_error(409)])
                await ws.close(code=1008)
                return False
            await self._send(ws, [AUTHENTICATED])
            return True

    async def _on_message(
        self, ws: web.WebSocketResponse, data: str | bytes, subs: dict[str, dict[str, OccSymbol | None]]
    ) -> None:
        msg = self._decode(data)
        if not isinstance(msg, dict) or msg.get("action") not in ("subscribe", "unsubscribe"):
            await self._send(ws, [_error(403 if isinstance(msg, dict) and msg.get("action") == "auth" else 400)])
            return
        add = msg["action"] == "subscribe"
        asked: dict[str, list[str]] = {}
        for key, value in msg.items():
            if key == "action":
                continue
            if key not in STREAM_CHANNELS or not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                await self._send(ws, [_error(400)])
                return
            asked[key] = value
        if add and "*" in asked.get("quotes", []):
            code, text = STAR_QUOTES_REFUSED
            await self._send(ws, [_error(code, text)])
            return
        parsed: dict[str, dict[str, OccSymbol | None]] = {}
        for channel, symbols in asked.items():
            parsed[channel] = {}
            for s in symbols:
                if s == "*":
                    parsed[channel]["*"] = None
                    continue
                try:
                    occ = parse_occ(s)
                except InvalidOptionSymbol:
                    await self._send(ws, [_error(400)])
                    return
                parsed[channel][occ.symbol] = occ
        for channel, items in parsed.items():
            for sym, item in items.items():
                if add:
                    subs[channel].setdefault(sym, item)
                else:
                    subs[channel].pop(sym, None)
        await self._send(ws, [{"T": "subscription", **{c: list(subs[c]) for c in STREAM_CHANNELS}}])

    async def _pump(self, conn: _Conn, subs: dict[str, dict[str, OccSymbol | None]]) -> None:
        ws, feed = conn.ws, conn.feed
        period = 1.0 / self.rate
        loop = asyncio.get_running_loop()
        while not ws.closed:
            await asyncio.sleep(period)
            if self.faults.drop_due(conn.authed_at, loop.time()):
                conn.abort()
                return
            now = datetime.now(UTC)
            now_ns = int(now.timestamp()) * NS_PER_SEC + now.microsecond * 1000
            out: list[dict[str, Any]] = []
            for channel, letter, member in (("quotes", "q", "latestQuote"), ("trades", "t", "latestTrade")):
                for sym, occ in subs[channel].items():
                    if occ is None:
                        continue
                    snap = self.options.snapshot(occ, feed, now_ns)
                    row = snap.get(member) if snap else None
                    if row is None:
                        continue
                    out.append({"T": letter, "S": sym, **{k: v for k, v in row.items() if k != "t"}, "t": now})
            if out:
                try:
                    await self._send(ws, out)
                except ConnectionError:
                    return  # dropped, or gone
