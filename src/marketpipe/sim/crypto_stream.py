"""Alpaca's real-time crypto stream (``/v1beta3/crypto/{loc}``, WebSocket) on the simulator's Alpaca face.

alpaca-py's ``CryptoDataStream(key, secret, url_override=sim.crypto_ws_url())`` works unchanged.
The protocol is the stock stream's (:mod:`marketpipe.sim.stream`): ``connected`` on upgrade, auth
by message or by headers, errors ``[{"T":"error","code","msg"}]`` with the same codes and messages
(400 invalid syntax, 401 not authenticated, 402 auth failed, 403 already authenticated, 410 for a
channel of another stream such as ``statuses``), JSON text frames or, with ``Content-Type:
application/msgpack`` on the upgrade, msgpack binary frames whose ``t`` is a msgpack Timestamp.
Channels: ``trades quotes bars updatedBars dailyBars orderbooks``; every subscribe/unsubscribe is
answered with the whole state. Symbols must be pairs (``BTC/USD``; ``BTCUSD`` is 400); ``*`` is not
served. A location outside the vendor's list, or one the simulated account lacks, is 404 on the upgrade.

Data, per connection, from :class:`marketpipe.sim.crypto.CryptoMarket`:

* trades and quotes: the subscribed pairs' trades of the last hour (and a quote derived from each),
  replayed in a loop at ``CryptoStreamConfig.rate`` messages a second, ``t`` being the time of sending
  (every other field is the REST row's);
* orderbooks: first the whole book with ``"r": true`` (the REST ``latest/orderbooks`` book), then
  every tick an update of a few levels (a size changed, a level removed with ``s: 0``, a level
  added). ``CryptoStreamConfig.reset_first = False`` sends updates before any full book (a client must
  not apply them to a book it does not have);
* bars and dailyBars: on subscribing, the last finished minute bar and today's daily bar so far; then
  again when the minute turns. updatedBars: accepted, never sent (the simulated market has no late trades).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import orjson
from aiohttp import WSMsgType, web

from marketpipe.sim.admin import SIM_HEADER
from marketpipe.sim.crypto import NS_PER_MIN, CryptoFace, pairs_at
from marketpipe.sim.data import parse_rfc3339_ns, stable_seed
from marketpipe.wire.alpaca_crypto import BASE, CHANNELS, LOCATIONS, TYPE_OF_CHANNEL
from marketpipe.wire.alpaca_stream import ERROR_MESSAGES, MSGPACK_CONTENT_TYPE, OTHER_STREAM_CHANNELS

_PATH = re.compile(rf"^{re.escape(BASE)}/([^/]+)$")
_PAIR = re.compile(r"^[A-Z0-9]{1,10}/[A-Z]{3,4}$")
STOCK_ONLY = frozenset({"statuses", "lulds", "imbalances", "corrections", "cancelErrors", "news", "pricing"})
FATAL = (402, 404, 406, 409)


@dataclass
class CryptoStreamConfig:
    rate: float = 200.0  # trade + quote messages a second per connection
    tick_s: float = 0.05
    reset_first: bool = True  # False: order-book updates before any full book


@dataclass(eq=False)
class _Conn:
    ws: web.WebSocketResponse
    loc: str
    binary: bool
    authed: bool = False
    subs: dict[str, dict[str, None]] = field(default_factory=lambda: {c: {} for c in CHANNELS})
    books: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)
    pos: int = 0
    minute: int = -1
    emitter: asyncio.Task[None] | None = None

    async def send(self, msgs: list[dict[str, Any]]) -> None:
        if self.binary:
            await self.ws.send_bytes(msgpack.packb([_packable(m) for m in msgs]))
        else:
            await self.ws.send_str(orjson.dumps(msgs).decode())


def _packable(msg: dict[str, Any]) -> dict[str, Any]:
    t = msg.get("t")
    if isinstance(t, int):
        return {**msg, "t": msgpack.Timestamp.from_unix_nano(t)}
    return msg


def _stamped(msg: dict[str, Any], binary: bool) -> dict[str, Any]:
    """``t`` (ns) as the wire carries it: RFC-3339 text in JSON, a Timestamp in msgpack (at send)."""
    t = msg.get("t")
    if isinstance(t, int) and not binary:
        from marketpipe.core.timeutil import ns_text

        return {**msg, "t": ns_text(t)}
    return msg


class CryptoStream:
    def __init__(self, face: CryptoFace, keys: dict[str, tuple[str, str]], config: CryptoStreamConfig | None = None):
        self.face = face
        self.keys = keys
        self.config = config or CryptoStreamConfig()
        self._conns: set[_Conn] = set()

    def mount(self, app: web.Application) -> None:
        @web.middleware
        async def crypto_stream_first(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            m = _PATH.match(request.path)
            if m is not None and request.headers.get("Upgrade", "").lower() == "websocket":
                return await self.handle(request, m.group(1))
            return await handler(request)

        app.middlewares.insert(0, crypto_stream_first)
        app.on_shutdown.append(self._on_shutdown)

    async def drop(self) -> int:
        """Close every crypto stream connection (going away, 1001), as a vendor restart would; returns how many."""
        conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(ConnectionError):
                await c.ws.close(code=1001)
        return len(conns)

    async def _on_shutdown(self, _: web.Application) -> None:
        for c in list(self._conns):
            if c.emitter is not None:
                c.emitter.cancel()
            with contextlib.suppress(ConnectionError):
                await c.ws.close(code=1001)

    async def handle(self, request: web.Request, loc: str) -> web.StreamResponse:
        if loc not in LOCATIONS or loc not in self.face.config.locations:
            return web.json_response({"message": "not found"}, status=404)
        ws = web.WebSocketResponse(autoping=True)
        ws.headers[SIM_HEADER] = "1"
        await ws.prepare(request)
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        conn = _Conn(ws, loc, binary=ctype == MSGPACK_CONTENT_TYPE)
        self._conns.add(conn)
        try:
            await conn.send([{"T": "success", "msg": "connected"}])
            key, secret = request.headers.get("APCA-API-KEY-ID"), request.headers.get("APCA-API-SECRET-KEY")
            if key is not None or secret is not None:
                await self._auth(conn, key, secret)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_message(conn, msg.data.encode(), binary=False)
                elif msg.type == WSMsgType.BINARY:
                    await self._on_message(conn, msg.data, binary=True)
                else:
                    break
        except ConnectionError:
            pass
        finally:
            self._conns.discard(conn)
            if conn.emitter is not None:
                conn.emitter.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await conn.emitter
        return ws

    async def _error(self, conn: _Conn, code: int) -> None:
        await conn.send([{"T": "error", "code": code, "msg": ERROR_MESSAGES[code]}])
        if code in FATAL:
            await conn.ws.close(code=1008, message=ERROR_MESSAGES[code].encode())

    async def _auth(self, conn: _Conn, key: Any, secret: Any) -> None:
        if conn.authed:
            await self._error(conn, 403)
            return
        known = self.keys.get(key) if isinstance(key, str) else None
        if known is None or known[0] != secret:
            await self._error(conn, 402)
            return
        conn.authed = True
        await conn.send([{"T": "success", "msg": "authenticated"}])

    async def _on_message(self, conn: _Conn, data: bytes, *, binary: bool) -> None:
        try:
            obj = msgpack.unpackb(data) if binary else orjson.loads(data)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            await self._error(conn, 400)
            return
        if not isinstance(obj, dict):
            await self._error(conn, 400)
            return
        action = obj.get("action")
        if action == "auth":
            await self._auth(conn, obj.get("key"), obj.get("secret"))
            return
        code = 400 if action not in ("subscribe", "unsubscribe") else None if conn.authed else 401
        if code is not None:
            await self._error(conn, code)
            return
        await self._subscribe(conn, obj, add=action == "subscribe")

    async def _subscribe(self, conn: _Conn, obj: dict[str, Any], *, add: bool) -> None:
        changes: dict[str, list[str]] = {}
        for k, v in obj.items():
            if k == "action":
                continue
            if k in STOCK_ONLY or (k in OTHER_STREAM_CHANNELS and k not in CHANNELS):
                await self._error(conn, 410)
                return
            if (
                k not in CHANNELS
                or not isinstance(v, list)
                or not all(isinstance(s, str) and _PAIR.match(s) for s in v)
            ):
                await self._error(conn, 400)
                return
            changes[k] = list(dict.fromkeys(v))
        if not changes:
            await self._error(conn, 400)
            return
        new: list[tuple[str, str]] = []
        for ch, syms in changes.items():
            for s in syms:
                if add and s not in conn.subs[ch]:
                    conn.subs[ch][s] = None
                    new.append((ch, s))
                elif not add:
                    conn.subs[ch].pop(s, None)
                    if ch == "orderbooks":
                        conn.books.pop(s, None)
        await conn.send([{"T": "subscription", **{c: list(conn.subs[c]) for c in CHANNELS}}])
        now = self.face.now_ns()
        first = [m for ch, s in new if ch in ("bars", "dailyBars") for m in self._bar_messages(ch, s, now, conn.loc)]
        if first:
            await conn.send([_stamped(m, conn.binary) for m in first])
        if conn.emitter is None:
            conn.minute = now // NS_PER_MIN
            conn.emitter = asyncio.create_task(self._emit(conn))

    def _bar_messages(self, channel: str, sym: str, now: int, loc: str) -> list[dict[str, Any]]:
        if sym not in pairs_at(loc):
            return []
        bar = self.face.minute_bar(sym, now) if channel == "bars" else self.face.daily(sym, now)[0]
        if bar is None:
            return []
        return [{"T": TYPE_OF_CHANNEL[channel], "S": sym, **bar, "t": parse_rfc3339_ns(bar["t"])[0]}]

    async def _emit(self, conn: _Conn) -> None:
        cfg = self.config
        budget = 0.0
        while not conn.ws.closed:
            await asyncio.sleep(cfg.tick_s)
            now = self.face.now_ns()
            msgs: list[dict[str, Any]] = []
            budget += cfg.rate * cfg.tick_s
            n = int(budget)
            budget -= n
            msgs += self._ticks(conn, n, now)
            msgs += self._books(conn, now)
            if now // NS_PER_MIN != conn.minute:
                conn.minute = now // NS_PER_MIN
                for ch in ("bars", "dailyBars"):
                    for s in conn.subs[ch]:
                        msgs += [_stamped(m, conn.binary) for m in self._bar_messages(ch, s, now, conn.loc)]
            if msgs:
                try:
                    await conn.send(msgs)
                except ConnectionError:
                    return

    def _ticks(self, conn: _Conn, n: int, now: int) -> list[dict[str, Any]]:
        syms = list(dict.fromkeys([*conn.subs["trades"], *conn.subs["quotes"]]))
        known = pairs_at(conn.loc)
        syms = [s for s in syms if s in known]
        if not syms or n <= 0:
            return []
        m = self.face.market
        out: list[dict[str, Any]] = []
        for j in range(n):
            k = conn.pos + j
            sym = syms[k % len(syms)]
            tr = m.trades(sym, now - 3600 * 10**9, now)
            if not len(tr.t):
                continue
            i = (k // len(syms)) % len(tr.t)
            t = now - (n - j) * 1000  # spread over the tick, increasing
            if sym in conn.subs["trades"]:
                row = m.trade_row(tr, i)
                out.append(_stamped({"T": "t", "S": sym, **row, "t": t}, conn.binary))
            if sym in conn.subs["quotes"]:
                q = m.quote_at(sym, tr, i)
                out.append(_stamped({"T": "q", "S": sym, **q, "t": t + 1}, conn.binary))
        conn.pos += n
        return out

    def _books(self, conn: _Conn, now: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sym in conn.subs["orderbooks"]:
            if sym not in pairs_at(conn.loc):
                continue
            book = conn.books.get(sym)
            if book is None and self.config.reset_first:
                full = self.face.market.orderbook(sym, now)
                if full is None:
                    continue
                conn.books[sym] = {
                    "b": {lv["p"]: lv["s"] for lv in full["b"]},
                    "a": {lv["p"]: lv["s"] for lv in full["a"]},
                }
                out.append(
                    _stamped({"T": "o", "S": sym, "t": now, "b": full["b"], "a": full["a"], "r": True}, conn.binary)
                )
                continue
            out.append(_stamped({"T": "o", "S": sym, "t": now, **self._update(sym, book, now)}, conn.binary))
        return out

    def _update(self, sym: str, book: dict[str, dict[float, float]] | None, now: int) -> dict[str, Any]:
        """A few changed levels: one size changed and one level removed per side, one level added."""
        rng = np.random.default_rng(stable_seed("book-update", sym, now // 10**7))
        out: dict[str, list[dict[str, float]]] = {"b": [], "a": []}
        if not book:  # updates before any full book (reset_first off): levels around the last trade
            full = self.face.market.orderbook(sym, now) or {"b": [], "a": []}
            return {"b": full["b"][:2], "a": full["a"][:2]}
        for side in ("b", "a"):
            levels = sorted(book[side], reverse=side == "b")
            if len(levels) < 3:
                continue
            change = levels[int(rng.integers(0, len(levels)))]
            size = float(np.round(math.exp(rng.normal(math.log(max(book[side][change], 1e-8)), 0.3)), 8))
            book[side][change] = size
            out[side].append({"p": change, "s": size})
            gone = levels[-1]
            book[side].pop(gone)
            out[side].append({"p": gone, "s": 0.0})
            step = abs(levels[0] - levels[1]) or 0.01
            added = round(levels[-2] + (-step if side == "b" else step), 8)
            book[side][added] = float(np.round(rng.uniform(0.001, 2.0), 8))
            out[side].append({"p": added, "s": book[side][added]})
        return out
