"""Alpaca's real-time stock stream (WebSocket), on the simulator's Alpaca face.

Speaks shared/reference/market-data-apis.md §2 so that the official ``alpaca-py``
``StockDataStream(key, secret, url_override=server.ws_url("iex"))`` works unchanged. Paths:

``/v2/iex``   IEX feed, any plan
``/v2/sip``   SIP feed; a free-plan key gets error 409 ``insufficient subscription`` at auth
``/v2/test``  always-on test feed: only the symbol ``FAKEPACA`` has data (other valid symbols may be
              subscribed and stay silent); any valid key may use it

Protocol, as the simulator plays it:

* ``[{"T":"success","msg":"connected"}]`` right after the upgrade. Auth by message
  ``{"action":"auth","key":...,"secret":...}`` or by ``APCA-API-KEY-ID`` / ``APCA-API-SECRET-KEY``
  headers on the upgrade; with headers the simulator checks them at once and pushes
  ``authenticated`` unprompted (a later auth message then gets 403 ``already authenticated``).
* Errors (``[{"T":"error","code":N,"msg":...}]``): 400 ``invalid syntax`` (not JSON/msgpack, not an
  object, unknown action, a channel value that is not a list of strings, a symbol that is not
  ``*`` or a valid ticker, no channel key at all, an unknown channel key); 401 ``not authenticated``;
  402 ``auth failed`` (wrong key or secret, or missing ones); 403 ``already authenticated``; 404
  ``auth timeout`` (no successful auth within ``StreamConfig.auth_timeout_s``, default 10 s); 405
  ``symbol limit exceeded`` (a free-plan key with more than ``free_symbol_limit`` (30) distinct
  symbols over ``trades`` + ``quotes``, or ``*`` in either except on /v2/test, where ``*`` is
  ``FAKEPACA``; the previous subscription stays); 406 ``connection limit exceeded`` (the key
  already has an authenticated session on this path; other paths count separately); 409
  ``insufficient subscription``; 410 ``invalid subscribe action for this feed`` (a channel of another
  stream: ``orderbooks``, ``news``, ``pricing``). After 402, 404, 406 and 409 the server closes the
  socket (close code 1008).
* Channels ``trades quotes bars updatedBars dailyBars statuses lulds imbalances``; subscribe adds,
  unsubscribe subtracts, ``*`` is an entry of its own (unsubscribing ``AAPL`` leaves ``*``). Every
  subscribe/unsubscribe is answered with the complete state, all eight channels plus
  ``corrections`` and ``cancelErrors`` (both mirror ``trades``; the client cannot set them, and keys
  for them in a request are ignored). Symbols keep the order in which they were first subscribed.
  No data of a newly subscribed symbol goes out before the reply, none of a removed one after it.
* Encoding: JSON text frames, or with ``Content-Type: application/msgpack`` on the upgrade
  MessagePack binary frames whose timestamps are msgpack Timestamp extension values (type -1).
  Client messages are read as JSON from text frames and as msgpack from binary frames, whatever
  the connection's encoding. Every frame is an array; control messages travel alone, data messages
  in batches. Every message object has ``T`` first; data keys follow the reference's order.
* Pings are answered (aiohttp's autoping); permessage-deflate is negotiated when the client offers it.
  Stopping the server closes every stream with 1001 (going away).

Data (what a client sees, exactly):

* The *replay session* is the most recent regular session of ``SimMarket`` that has closed by the
  time the connection's subscription last changed (looked up again on every change). Trades and
  quotes of that session (the REST face's rows for the feed: ``iex`` trades are the IEX prints and
  quotes carry exchange ``V``; ``sip`` the full tape; ``/v2/test`` replays the SIP series of
  ``StreamConfig.test_source`` (``PACA``) under the symbol ``FAKEPACA``) are merged over all
  subscribed symbols in the session's time order and replayed in a loop, at ``StreamConfig.rate``
  messages a second per connection (default 1,000; 100,000 and more are fine on loopback), sent every
  ``tick_s`` (10 ms) in frames of at most ``max_batch`` (1,000) messages. A changed subscription
  resumes the replay at the same point of the session's clock. Each (feed, symbol, session,
  encoding) is encoded once (off the event loop) into per-message byte pieces; a frame is then one
  join of those pieces with vectorised timestamps, so one connection takes several 100,000
  messages a second on loopback.
* Every field of a streamed trade/quote except ``t`` is the REST row's (so ``i``, ``p``, ``s``, ``x``
  of a trade identify it in ``/v2/stocks/{symbol}/trades`` of the replay session). ``t`` is the
  wall-clock time of sending: increasing within a connection, spread over the tick just ended, and
  never ending in a 0 digit, so the JSON form always has exactly 9 fractional digits (RFC3339Nano).
* ``*`` means the symbols of ``StreamConfig.universe`` (ten large names; ``FAKEPACA`` on /v2/test).
  Symbols without data (``UNKNOWN``, ``ZZZZ``, ``NOPE``) can be subscribed and stay silent. The
  streams run whether or not the real market is open.
* Minute bars (``b``): when the wall clock crosses a minute boundary, a bar for every symbol in
  ``bars`` stamped at the start of the minute just ended. Its o/h/l/c/v/n/vw are the replay
  session's REST minute bar at the same time of day (minute index = minutes since 09:30 New York of
  the stamp, modulo the session's length), so bars repeat the session day after day. Fast mode
  (``bar_interval_s`` set, for tests): a bar every ``bar_interval_s`` seconds, stamped on a clock of
  its own that starts at the minute of authentication and advances one minute per bar (it runs ahead
  of the wall clock).
* ``dailyBars`` (``d``) go out with the minute bars: the running aggregate of the replay session's
  minute bars up to that minute index, stamped at New York midnight of the minute's date.
* ``updatedBars``, ``statuses``, ``lulds``, ``imbalances``, ``corrections`` and ``cancelErrors``
  never carry data (the simulator has no late trades, halts or amendments).

Faults (``server.stream.faults``, a :class:`StreamFaults`, live; or ``/_sim/stream``):

``stall``          no data frames (trades, quotes, bars) while set; the socket stays open, pings are
                   answered, control messages still answered: a connected-but-mute stream
``rate_factor``    ``slow``: the rate is multiplied by this (e.g. 0.01); default 1
``malformed``      ``"text"``: a text frame that is not JSON goes out before every data frame;
                   ``"unknown_type"``: a well-formed frame ``[{"T":"zz","S":...,"msg":...}]`` in the
                   connection's encoding goes out before every data frame
``reject_auth``    valid keys get 402 ``auth failed`` (and the close)
``drop_after_s``   every authenticated connection is dropped (TCP abort, no close frame) this many
                   seconds after auth — reconnect loops meet the fault again on every connection

:meth:`AlpacaStream.drop` (from another thread: ``SimServer.drop_streams``) drops the connections
open now (``abrupt``: TCP abort, else a close frame 1001). A client that does not take a frame
within ``slow_client_timeout_s`` is dropped the same way (the vendor's 407 ``slow client``, which
the reference says may not arrive, is not sent).

HTTP control (no auth, never faulted): ``GET /_sim/stream`` (faults, config, connection counts),
``PUT /_sim/stream/faults`` (replace, body a StreamFaults object), ``DELETE /_sim/stream/faults``,
``POST /_sim/stream/drop`` (optional body ``{"feed": "iex", "abrupt": true}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from datetime import time as dtime
from operator import itemgetter
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgpack
import msgspec
import numpy as np
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from marketpipe.core.timeutil import NY, dt_to_ns
from marketpipe.sim.admin import SIM_HEADER
from marketpipe.sim.data import NS_PER_SEC, SimMarket, ny_midnight_ns, valid_symbol
from marketpipe.wire.alpaca_stream import (
    AUTHENTICATED,
    CHANNEL_NAMES,
    CONNECTED,
    ERROR_MESSAGES,
    FRAME_ERRORS,
    MSGPACK_CONTENT_TYPE,
    SERVED_FEEDS,
    BarMessage,
    DailyBarMessage,
    Error,
    QuoteMessage,
    Subscription,
    TradeMessage,
    array_header,
    control_frame,
    decode_client,
    encode,
    feed_of_path,
    parse_subscription,
)

FEEDS = SERVED_FEEDS
TEST_SYMBOL = "FAKEPACA"
NS_PER_MIN = 60 * NS_PER_SEC
FATAL = frozenset({402, 404, 406, 409})
_MAX_SOURCES = 512


@dataclass(frozen=True)
class StreamConfig:
    """How the stream behaves; replace at runtime with :meth:`AlpacaStream.configure`."""

    auth_timeout_s: float = 10.0
    rate: float = 1_000.0  # trade + quote messages per second per connection
    tick_s: float = 0.01
    max_batch: int = 1_000  # messages per frame
    max_burst_s: float = 0.25  # at most this much rate is owed after a slow tick
    bar_interval_s: float | None = None  # None: bars at wall-clock minute boundaries
    free_symbol_limit: int = 30
    universe: tuple[str, ...] = ("AAPL", "MSFT", "AMZN", "GOOGL", "META", "NVDA", "TSLA", "AMD", "SPY", "QQQ")
    test_source: str = "PACA"
    slow_client_timeout_s: float = 10.0
    close_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if self.rate < 0 or self.tick_s <= 0 or not 1 <= self.max_batch <= 65_535 or self.auth_timeout_s <= 0:
            raise ValueError("stream config: rate >= 0, tick_s > 0, 1 <= max_batch <= 65535, auth_timeout_s > 0")
        if self.bar_interval_s is not None and self.bar_interval_s <= 0:
            raise ValueError("stream config: bar_interval_s must be > 0 (or None)")


class DropFaults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fault every simulated stream plays (this one and the options stream): ``drop_after_s``. A fault
    a stream does not play is refused, not ignored."""

    drop_after_s: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def drop_due(self, authed_at: float, now: float) -> bool:
        """A connection authenticated at loop time ``authed_at`` is to be dropped at ``now``."""
        return self.drop_after_s is not None and now - authed_at >= self.drop_after_s


class StreamFaults(DropFaults, kw_only=True):
    """Live stream faults; see the module docstring."""

    stall: bool = False
    rate_factor: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    malformed: Literal["text", "unknown_type"] | None = None
    reject_auth: bool = False


# --- encoded replay material ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    """One symbol's trades or quotes of one session, pre-encoded: message ``k`` on the wire is
    ``pre[k] + stamp + suf``."""

    t: np.ndarray  # original times, ns
    pre: list[bytes]
    suf: bytes


@dataclass(frozen=True, slots=True)
class _Plan:
    """The merged replay of a connection's subscriptions."""

    t: np.ndarray
    pre: list[bytes]
    suf: list[bytes]

    def __len__(self) -> int:
        return len(self.pre)


@dataclass(frozen=True, slots=True)
class _Bars:
    """A session's minute bars and their running daily aggregate."""

    o: list[float]
    h: list[float]
    l: list[float]  # noqa: E741 - the wire letter
    c: list[float]
    v: list[int]
    n: list[int]
    vw: list[float]
    dh: list[float]
    dl: list[float]
    dv: list[int]
    dn: list[int]
    dvw: list[float]


def _json_stamps(ns: np.ndarray) -> list[bytes]:
    """``YYYY-MM-DDTHH:MM:SS.fffffffffZ`` for each stamp (none ends in a 0 digit)."""
    n = len(ns)
    sec = ns // NS_PER_SEC
    frac = ns % NS_PER_SEC
    s0 = int(sec[0])
    heads = [
        datetime.fromtimestamp(s0 + k, UTC).strftime("%Y-%m-%dT%H:%M:%S.").encode()
        for k in range(int(sec[-1]) - s0 + 1)
    ]
    table = np.frombuffer(b"".join(heads), np.uint8).reshape(len(heads), 20)
    buf = np.empty((n, 30), np.uint8)
    buf[:, :20] = table[sec - s0]
    for k in range(9):
        buf[:, 28 - k] = 48 + frac % 10
        frac = frac // 10
    buf[:, 29] = 90  # "Z"
    out: list[bytes] = buf.view("S30").ravel().tolist()
    return out


def _msgpack_stamps(ns: np.ndarray) -> list[bytes]:
    """msgpack Timestamp 64 (fixext 8, type -1) for each stamp."""
    n = len(ns)
    data = ((ns % NS_PER_SEC).astype(np.uint64) << np.uint64(34)) | (ns // NS_PER_SEC).astype(np.uint64)
    buf = np.empty((n, 10), np.uint8)
    buf[:, 0] = 0xD7
    buf[:, 1] = 0xFF
    buf[:, 2:] = np.frombuffer(data.astype(">u8").tobytes(), np.uint8).reshape(n, 8)
    out: list[bytes] = buf.view("V10").ravel().tolist()
    return out


def _encode_source(rows: list[dict[str, Any]], t: np.ndarray, kind: str, symbol: str, binary: bool) -> _Source:
    """Encode REST rows as stream messages with ``t`` left open (key order as the reference's)."""
    msg_type = TradeMessage if kind == "trades" else QuoteMessage
    keys, letter = msg_type.FIELDS, msg_type.__struct_config__.tag
    tape = rows[0]["z"] if rows else "C"
    pre: list[bytes] = []
    if binary:
        for r in rows:
            body = msgpack.packb({"T": letter, "S": symbol, **{k: r[k] for k in keys}})
            # fixmap: two more entries (t, z) than packed here; 0x80 | count fits while count <= 15
            pre.append(bytes([body[0] + 2]) + body[1:] + b"\xa1t")
        suf = msgpack.packb("z") + msgpack.packb(tape)
    else:
        for r in rows:
            pre.append(b"," + orjson.dumps({"T": letter, "S": symbol, **{k: r[k] for k in keys}})[:-1] + b',"t":"')
        suf = b'","z":' + orjson.dumps(tape) + b"}"
    return _Source(t, pre, suf)


def _merge(sources: list[_Source]) -> _Plan:
    if not sources:
        return _Plan(np.empty(0, np.int64), [], [])
    t = np.concatenate([s.t for s in sources])
    pre_all = [p for s in sources for p in s.pre]
    suf_all = [s.suf for s in sources for _ in range(len(s.pre))]
    if len(pre_all) <= 1:
        return _Plan(t, pre_all, suf_all)
    order = np.argsort(t, kind="stable")
    idx = order.tolist()
    pick = itemgetter(*idx)
    return _Plan(t[order], list(pick(pre_all)), list(pick(suf_all)))


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a send to a connection already gone: nothing to report


async def _guarded(send: Awaitable[None], conn: _Conn, limit_s: float) -> None:
    """Send in a task of its own that is never cancelled: cancelling aiohttp's compressed send
    half-way leaves its inner task's error unretrieved. A send that does not finish within
    ``limit_s`` (a client not reading) drops the connection."""
    task = asyncio.ensure_future(send)
    task.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if not done:
        conn.abort()
        raise ConnectionResetError("slow client dropped")
    task.result()


def _cyclic(items: list[bytes], pos: int, n: int) -> list[bytes]:
    out = items[pos : pos + n]
    while len(out) < n:
        out += items[: n - len(out)]
    return out


# --- a connection -------------------------------------------------------------------------------------


@dataclass(eq=False)
class StreamConn:
    """What dropping a connection needs: its socket, its request (for the TCP abort) and its feed."""

    ws: web.WebSocketResponse
    request: web.Request
    feed: str

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()


@dataclass(eq=False)
class _Conn(StreamConn):
    binary: bool
    key: str = ""
    plan_name: str = ""
    authed: bool = False
    authed_at: float = 0.0
    subs: dict[str, dict[str, None]] = field(default_factory=lambda: {c: {} for c in CHANNEL_NAMES})  # by wire key
    plan: _Plan = field(default_factory=lambda: _merge([]))
    pos: int = 0
    last_ns: int = 0
    bar_next_ns: int = 0  # wall-clock mode: next minute boundary
    fast_next: float = 0.0  # fast mode: loop time of the next bar
    fast_minute_ns: int = 0  # fast mode: stamp of the next bar
    emitter: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # data frames vs. subscription replies

    def encode(self, msgs: list[Any]) -> bytes:
        return encode(msgs, self.binary)

    async def send(self, frame: bytes) -> None:
        await self.ws.send_frame(frame, WSMsgType.BINARY if self.binary else WSMsgType.TEXT)


# --- the stream ---------------------------------------------------------------------------------------


C = TypeVar("C", bound=StreamConn)
F = TypeVar("F", bound=DropFaults)


class StreamControl(Generic[C, F]):
    """What the simulator's stock and options streams share: live ``faults`` (replaced whole, from any
    thread), dropping the open connections, and the HTTP control routes under a prefix
    (``GET {prefix}``, ``PUT``/``DELETE {prefix}/faults``, ``POST {prefix}/drop`` with an optional body
    ``{"feed": ..., "abrupt": true}``). A subclass keeps its open connections in ``_conns``."""

    def __init__(self, faults_type: type[F], feeds: tuple[str, ...]) -> None:
        self.faults_type = faults_type
        self.feeds = feeds
        self.faults: F = faults_type()
        self._conns: set[C] = set()
        self._closing: set[asyncio.Task[Any]] = set()

    def set_faults(self, faults: F | None = None, **fields: Any) -> F:
        """Replace the faults at once: ``set_faults(drop_after_s=0.5)`` or ``set_faults(StreamFaults(...))``."""
        new = faults if faults is not None else msgspec.convert(fields, self.faults_type)
        self.faults = new
        return new

    def clear_faults(self) -> None:
        self.faults = self.faults_type()

    def drop(self, feed: str | None = None, *, abrupt: bool = True) -> int:
        """Drop the open connections (of one feed, or all); returns how many. Call it on the server's
        loop, or from another thread through :meth:`drop_threadsafe`."""
        conns = [c for c in self._conns if feed is None or c.feed == feed]
        for c in conns:
            if abrupt:
                c.abort()
            else:
                task = asyncio.ensure_future(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"dropped"))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        return len(conns)

    def drop_threadsafe(self, loop: asyncio.AbstractEventLoop, feed: str | None = None, *, abrupt: bool = True) -> int:
        fut = asyncio.run_coroutine_threadsafe(self._drop_async(feed, abrupt), loop)
        return fut.result(timeout=5)

    async def _drop_async(self, feed: str | None, abrupt: bool) -> int:
        return self.drop(feed, abrupt=abrupt)

    def stats(self) -> dict[str, Any]:
        return {"open": len(self._conns)}

    # --- HTTP control ---------------------------------------------------------------------------------
    def add_control_routes(self, app: web.Application, prefix: str) -> None:
        app.router.add_get(prefix, self._admin_get)
        app.router.add_put(f"{prefix}/faults", self._admin_put_faults)
        app.router.add_delete(f"{prefix}/faults", self._admin_delete_faults)
        app.router.add_post(f"{prefix}/drop", self._admin_drop)

    def _admin_doc(self) -> dict[str, Any]:
        return {"faults": msgspec.to_builtins(self.faults), "stats": self.stats()}

    def _admin_state(self) -> web.Response:
        return web.Response(body=orjson.dumps(self._admin_doc()), content_type="application/json")

    async def _admin_get(self, _: web.Request) -> web.Response:
        return self._admin_state()

    async def _admin_put_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults = msgspec.json.decode(await request.read(), type=self.faults_type)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return web.Response(
                body=orjson.dumps({"message": f"invalid stream faults: {exc}"}),
                status=400,
                content_type="application/json",
            )
        return self._admin_state()

    async def _admin_delete_faults(self, _: web.Request) -> web.Response:
        self.clear_faults()
        return self._admin_state()

    async def _admin_drop(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            opts = orjson.loads(raw) if raw.strip() else {}
            if not isinstance(opts, dict):
                raise TypeError("body must be an object")
            feed, abrupt = opts.get("feed"), opts.get("abrupt", True)
            if (feed is not None and feed not in self.feeds) or not isinstance(abrupt, bool):
                raise ValueError(f"feed one of {self.feeds}, abrupt a bool")
        except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
            return web.Response(
                body=orjson.dumps({"message": f"invalid drop request: {exc}"}),
                status=400,
                content_type="application/json",
            )
        return web.Response(
            body=orjson.dumps({"dropped": self.drop(feed, abrupt=abrupt)}), content_type="application/json"
        )


class AlpacaStream(StreamControl[_Conn, StreamFaults]):
    """The stream endpoints of one simulator. Mounted by ``SimServer`` on the Alpaca face; its
    ``faults`` and ``config`` may be changed from any thread while it runs."""

    def __init__(self, market: SimMarket, keys: dict[str, tuple[str, str]], config: StreamConfig | None = None) -> None:
        super().__init__(StreamFaults, FEEDS)
        self.market = market
        self.keys = keys
        self.config = config if config is not None else StreamConfig()
        self._active: dict[tuple[str, str], _Conn] = {}
        self._sources: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._counters = {"connections": 0, "messages": 0, "frames": 0, "bars": 0}

    # --- control --------------------------------------------------------------------------------------
    def configure(self, **changes: Any) -> StreamConfig:
        """Replace config fields (e.g. ``rate=50_000``); running connections pick them up."""
        self.config = replace(self.config, **changes)
        return self.config

    def stats(self) -> dict[str, Any]:
        """Open and authenticated connections now; totals since start: connections, data messages
        (trades and quotes), data frames, bar messages."""
        return {
            "open": len(self._conns),
            "authenticated": len(self._active),
            **self._counters,
        }

    def _admin_doc(self) -> dict[str, Any]:
        return {"faults": msgspec.to_builtins(self.faults), "config": asdict(self.config), "stats": self.stats()}

    # --- mounting -------------------------------------------------------------------------------------
    def mount(self, app: web.Application) -> None:
        """Serve the stream paths ahead of the face's middleware (no REST auth, rate limits or HTTP
        faults on the upgrade), add the ``/_sim/stream`` control routes, close streams on shutdown."""

        @web.middleware
        async def stream_first(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            feed = feed_of_path(request.path)
            if feed is not None:
                return await self.handle(request, feed)
            return await handler(request)

        app.middlewares.insert(0, stream_first)
        self.add_control_routes(app, "/_sim/stream")
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, _: web.Application) -> None:
        conns = list(self._conns)
        for c in conns:
            if c.emitter is not None:
                c.emitter.cancel()
        closing = {
            asyncio.ensure_future(c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")): c for c in conns
        }
        for task in closing:
            task.add_done_callback(_retrieve)
        if closing:
            # a client that reads nothing would hold its close (and the server's stop) forever
            _done, stuck = await asyncio.wait(closing, timeout=self.config.close_timeout_s + 0.5)
            for task in stuck:
                closing[task].abort()

    # --- one connection -------------------------------------------------------------------------------
    async def handle(self, request: web.Request, feed: str) -> web.StreamResponse:
        cfg = self.config
        ws = web.WebSocketResponse(timeout=cfg.close_timeout_s, autoping=True, compress=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="websocket upgrade required\n")
        ws.headers[SIM_HEADER] = "1"  # like every REST answer: clients label the data sim:alpaca
        await ws.prepare(request)
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        conn = _Conn(ws, request, feed, binary=content_type == MSGPACK_CONTENT_TYPE)
        self._conns.add(conn)
        self._counters["connections"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.auth_timeout_s
        try:
            await self._control(conn, CONNECTED)
            key, secret = request.headers.get("APCA-API-KEY-ID"), request.headers.get("APCA-API-SECRET-KEY")
            if key is not None or secret is not None:
                await self._auth(conn, key, secret)
            while not ws.closed:
                timeout = None if conn.authed else deadline - loop.time()
                if timeout is not None and timeout <= 0:
                    await self._error(conn, 404)
                    break
                try:
                    msg = await ws.receive(timeout=timeout)
                except TimeoutError:
                    continue  # the deadline check above answers it
                if msg.type == WSMsgType.TEXT:
                    await self._on_message(conn, msg.data.encode(), binary=False)
                elif msg.type == WSMsgType.BINARY:
                    await self._on_message(conn, msg.data, binary=True)
                else:
                    break  # close, closing, closed, error
        except ConnectionError:
            pass  # the client went away mid-send
        finally:
            self._release(conn)
            if conn.emitter is not None:
                conn.emitter.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await conn.emitter
            if not ws.closed:
                with contextlib.suppress(ConnectionError):
                    await ws.close()
        return ws

    def _release(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn.authed and self._active.get((conn.key, conn.feed)) is conn:
            del self._active[(conn.key, conn.feed)]

    async def _control(self, conn: _Conn, msg: Any) -> None:
        await conn.send(control_frame(msg, conn.binary))

    async def _error(self, conn: _Conn, code: int) -> None:
        await self._control(conn, Error.of(code))
        if code in FATAL:
            await conn.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=ERROR_MESSAGES[code].encode())

    async def _on_message(self, conn: _Conn, data: bytes, *, binary: bool) -> None:
        try:
            obj = decode_client(data, binary=binary)
        except FRAME_ERRORS:
            await self._error(conn, 400)
            return
        action = obj.get("action") if isinstance(obj, dict) else None
        if action == "auth":
            if conn.authed:
                await self._error(conn, 403)
                return
            key, secret = obj.get("key"), obj.get("secret")
            await self._auth(conn, key if isinstance(key, str) else None, secret if isinstance(secret, str) else None)
        elif action in ("subscribe", "unsubscribe"):
            if not conn.authed:
                await self._error(conn, 401)
                return
            await self._subscribe(conn, obj, add=action == "subscribe")
        else:
            await self._error(conn, 400)

    async def _auth(self, conn: _Conn, key: str | None, secret: str | None) -> None:
        known = self.keys.get(key or "")
        if not key or not secret or known is None or known[0] != secret or self.faults.reject_auth:
            await self._error(conn, 402)
            return
        plan = known[1]
        if conn.feed == "sip" and plan == "free":
            await self._error(conn, 409)
            return
        if (key, conn.feed) in self._active:
            await self._error(conn, 406)
            return
        conn.key, conn.plan_name, conn.authed = key, plan, True
        loop = asyncio.get_running_loop()
        conn.authed_at = loop.time()
        self._active[(key, conn.feed)] = conn
        await self._control(conn, AUTHENTICATED)
        now = time.time_ns()
        conn.last_ns = now
        conn.bar_next_ns = (now // NS_PER_MIN + 1) * NS_PER_MIN
        conn.fast_minute_ns = now // NS_PER_MIN * NS_PER_MIN
        if self.config.bar_interval_s is not None:
            conn.fast_next = conn.authed_at + self.config.bar_interval_s
        conn.emitter = asyncio.create_task(self._emit(conn), name=f"sim-stream-{conn.feed}-{key}")

    # --- subscriptions --------------------------------------------------------------------------------
    def _valid(self, conn: _Conn, symbol: str) -> bool:
        return symbol == "*" or valid_symbol(symbol) or (conn.feed == "test" and symbol == TEST_SYMBOL)

    async def _subscribe(self, conn: _Conn, obj: dict[str, Any], *, add: bool) -> None:
        changes = parse_subscription(obj, lambda s: s if self._valid(conn, s) else None)
        if isinstance(changes, int):
            await self._error(conn, changes)
            return
        subs = {c: dict(syms) for c, syms in conn.subs.items()}
        for k, v in changes.items():
            for s in v:
                if add:
                    subs[k][s] = None
                else:
                    subs[k].pop(s, None)
        if add and conn.plan_name == "free":
            both = subs["trades"].keys() | subs["quotes"].keys()
            if conn.feed == "test" and "*" in both:
                both = (both - {"*"}) | {TEST_SYMBOL}  # all of the test feed is one symbol
            if "*" in both or len(both) > self.config.free_symbol_limit:
                await self._error(conn, 405)
                return
        ticks_changed = any(subs[c] != conn.subs[c] for c in ("trades", "quotes"))
        reply = Subscription.of({CHANNEL_NAMES[c]: syms for c, syms in subs.items()})
        # Encoding a cold session takes tens of ms per symbol: off the loop, so that other
        # connections and the REST face keep going.
        plan = await asyncio.to_thread(self._prepare, conn, subs, ticks_changed)
        # Under the data lock: every data frame goes out wholly before or wholly after the reply,
        # and built from the subscription set that the client was last told about.
        async with conn.lock:
            conn.subs = subs
            if plan is not None:
                # resume at the same point of the session's clock
                old = conn.plan
                at = int(old.t[conn.pos % len(old)]) if len(old) else 0
                conn.pos = int(np.searchsorted(plan.t, at, side="left")) % len(plan) if len(plan) else 0
                conn.plan = plan
            await self._control(conn, reply)

    def _expand(self, conn: _Conn, symbols: dict[str, None]) -> list[str]:
        if "*" not in symbols:
            return list(symbols)
        extra = (TEST_SYMBOL,) if conn.feed == "test" else self.config.universe
        return list(dict.fromkeys([*extra, *(s for s in symbols if s != "*")]))

    def _prepare(self, conn: _Conn, subs: dict[str, dict[str, None]], ticks_changed: bool) -> _Plan | None:
        """The new replay plan (None: trades and quotes unchanged); warms the bar caches too."""
        di = self._replay_session(time.time_ns())
        for sym in self._expand(conn, {**subs["bars"], **subs["dailyBars"]}):
            self._bars(conn.feed, sym, di)
        if not ticks_changed:
            return None
        sources: list[_Source] = []
        for kind in ("trades", "quotes"):
            for sym in self._expand(conn, subs[kind]):
                src = self._source(conn.feed, sym, kind, di, conn.binary)
                if src is not None and len(src.pre):
                    sources.append(src)
        return _merge(sources)

    def _replay_session(self, now_ns: int) -> int:
        return max(0, int(np.searchsorted(self.market.closes, now_ns, side="right")) - 1)

    def _data_symbol(self, feed: str, symbol: str) -> tuple[str, str] | None:
        """(market symbol, market feed) that streams under ``symbol`` on ``feed``; None: silent."""
        if feed == "test":
            return (self.config.test_source, "sip") if symbol == TEST_SYMBOL else None
        return (symbol, feed) if self.market.has_data(symbol) else None

    def _cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """Get or build (outside the lock: two threads may build the same entry, both right)."""
        with self._lock:
            hit = self._sources.get(key)
            if hit is not None:
                self._sources.move_to_end(key)
                return hit
        hit = build()
        with self._lock:
            self._sources[key] = hit
            while len(self._sources) > _MAX_SOURCES:
                self._sources.popitem(last=False)
        return hit

    def _source(self, feed: str, symbol: str, kind: str, di: int, binary: bool) -> _Source | None:
        data = self._data_symbol(feed, symbol)
        if data is None:
            return None
        msym, mfeed = data

        def build() -> _Source:
            m = self.market
            lo, hi = int(m.opens[di]), int(m.closes[di])
            page = m.page("trades" if kind == "trades" else "quotes", [msym], lo, hi, feed=mfeed, limit=1 << 40)
            runs = page.parts[0][1] if page.parts else []
            rows: list[dict[str, Any]] = orjson.loads(b"[" + b",".join(bytes(r) for r in runs) + b"]")
            frame = (m.trades_frame if kind == "trades" else m.quotes_frame)(msym, lo, hi, mfeed, now=hi + 1)
            t = frame["t"]
            if len(t) != len(rows):
                raise RuntimeError(f"sim stream: {msym} {kind} rows and times disagree")
            return _encode_source(rows, t, kind, symbol, binary)

        src: _Source = self._cached(("src", feed, symbol, kind, di, binary), build)
        return src

    def _bars(self, feed: str, symbol: str, di: int) -> _Bars | None:
        data = self._data_symbol(feed, symbol)
        if data is None:
            return None
        msym, mfeed = data

        def build() -> _Bars:
            m = self.market
            lo, hi = int(m.opens[di]), int(m.closes[di])
            f = m.bars_frame(msym, "1Min", lo, hi, mfeed, now=hi + 1)
            v = f["v"]
            cum_v = np.cumsum(v)
            dvw = np.round(np.cumsum(f["vw"] * v) / np.maximum(cum_v, 1), 4)
            return _Bars(
                o=f["o"].tolist(),
                h=f["h"].tolist(),
                l=f["l"].tolist(),
                c=f["c"].tolist(),
                v=v.tolist(),
                n=f["n"].tolist(),
                vw=f["vw"].tolist(),
                dh=np.maximum.accumulate(f["h"]).tolist(),
                dl=np.minimum.accumulate(f["l"]).tolist(),
                dv=cum_v.tolist(),
                dn=np.cumsum(f["n"]).tolist(),
                dvw=dvw.tolist(),
            )

        bars: _Bars = self._cached(("bars", feed, symbol, di), build)
        return bars if bars.o else None

    # --- emitting -------------------------------------------------------------------------------------
    async def _emit(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        owed = 0.0
        try:
            while not conn.ws.closed:
                cfg = self.config
                await asyncio.sleep(cfg.tick_s)
                faults = self.faults
                now = loop.time()
                dt, last = now - last, now
                if faults.drop_due(conn.authed_at, now):
                    conn.abort()
                    return
                if faults.stall:
                    owed = 0.0
                    self._skip_bars(conn, now)
                    continue
                rate = cfg.rate * faults.rate_factor
                owed = min(owed + rate * dt, max(float(cfg.max_batch), rate * cfg.max_burst_s))
                plan = conn.plan
                if not len(plan):
                    owed = 0.0
                elif owed >= 1.0:
                    n = int(owed)
                    owed -= n
                    await self._send_ticks(conn, plan, n, cfg)
                await self._send_bars(conn, now, cfg)
        except ConnectionError:
            return  # gone, or dropped as a slow client (the vendor's 407 case)

    async def _send_ticks(self, conn: _Conn, plan: _Plan, n: int, cfg: StreamConfig) -> None:
        now_ns = time.time_ns()
        lo = max(conn.last_ns, now_ns - int(cfg.tick_s * 5 * NS_PER_SEC))
        step = max(2, (now_ns - lo) // n)
        stamps = lo + step * np.arange(1, n + 1, dtype=np.int64)
        stamps += stamps % 10 == 0  # never a trailing 0 digit; step >= 2 keeps them increasing
        conn.last_ns = int(stamps[-1])
        size = len(plan)
        pos = conn.pos
        for a in range(0, n, cfg.max_batch):
            async with conn.lock:
                if conn.plan is not plan:
                    return  # the subscription changed: the rest of this tick is not owed any more
                k = min(cfg.max_batch, n - a)
                chunk = stamps[a : a + k]
                ts = _msgpack_stamps(chunk) if conn.binary else _json_stamps(chunk)
                parts: list[bytes] = [b""] * (3 * k)
                parts[0::3] = _cyclic(plan.pre, pos, k)
                parts[1::3] = ts
                parts[2::3] = _cyclic(plan.suf, pos, k)
                if conn.binary:
                    frame = array_header(k) + b"".join(parts)
                else:
                    body = b"".join(parts)
                    frame = b"[" + body[1:] + b"]"
                await self._send_data(conn, frame, cfg)
                pos = conn.pos = (pos + k) % size
            self._counters["messages"] += k
            self._counters["frames"] += 1

    async def _send_data(self, conn: _Conn, frame: bytes, cfg: StreamConfig) -> None:
        malformed = self.faults.malformed
        if malformed == "text":
            await _guarded(conn.ws.send_frame(b'[{"T":"t","S":', WSMsgType.TEXT), conn, cfg.slow_client_timeout_s)
        elif malformed == "unknown_type":
            bad = conn.encode([{"T": "zz", "S": "AAPL", "msg": "simulated unknown message type"}])
            await _guarded(conn.send(bad), conn, cfg.slow_client_timeout_s)
        await _guarded(conn.send(frame), conn, cfg.slow_client_timeout_s)

    def _skip_bars(self, conn: _Conn, now: float) -> None:
        """While stalled, bar times pass without bars."""
        cfg = self.config
        if cfg.bar_interval_s is None:
            wall = time.time_ns()
            conn.bar_next_ns = max(conn.bar_next_ns, (wall // NS_PER_MIN + 1) * NS_PER_MIN)
        else:
            while conn.fast_next <= now:
                conn.fast_next += cfg.bar_interval_s
                conn.fast_minute_ns += NS_PER_MIN

    async def _send_bars(self, conn: _Conn, now: float, cfg: StreamConfig) -> None:
        if cfg.bar_interval_s is None:
            wall = time.time_ns()
            if wall < conn.bar_next_ns:
                return
            stamp = wall // NS_PER_MIN * NS_PER_MIN - NS_PER_MIN
            conn.bar_next_ns = stamp + 2 * NS_PER_MIN
        else:
            if now < conn.fast_next:
                return
            stamp = conn.fast_minute_ns
            conn.fast_minute_ns += NS_PER_MIN
            conn.fast_next += cfg.bar_interval_s
            if conn.fast_next < now:
                conn.fast_next = now + cfg.bar_interval_s
        async with conn.lock:
            bar_syms = self._expand(conn, conn.subs["bars"])
            daily_syms = self._expand(conn, conn.subs["dailyBars"])
            if not bar_syms and not daily_syms:
                return
            msgs = self._bar_messages(conn, stamp, bar_syms, daily_syms)
            if msgs:
                await self._send_data(conn, conn.encode(msgs), cfg)
                self._counters["bars"] += len(msgs)

    def _bar_messages(
        self, conn: _Conn, stamp: int, bar_syms: list[str], daily_syms: list[str]
    ) -> list[BarMessage | DailyBarMessage]:
        day = datetime.fromtimestamp(stamp / NS_PER_SEC, NY).date()
        nine_thirty = dt_to_ns(datetime.combine(day, dtime(9, 30), NY))
        midnight = ny_midnight_ns(day)
        di = self._replay_session(time.time_ns())

        def ts(ns: int) -> datetime:
            return datetime.fromtimestamp(ns // NS_PER_SEC, UTC)  # whole minutes

        msgs: list[BarMessage | DailyBarMessage] = []
        for letter, syms in (("b", bar_syms), ("d", daily_syms)):
            for sym in syms:
                bars = self._bars(conn.feed, sym, di)
                if bars is None:
                    continue
                k = ((stamp - nine_thirty) // NS_PER_MIN) % len(bars.o)
                if letter == "b":
                    o, h, lo, c, v, n, vw, t = (
                        bars.o[k], bars.h[k], bars.l[k], bars.c[k], bars.v[k], bars.n[k], bars.vw[k], stamp
                    )  # fmt: skip
                else:
                    o, h, lo, c, v, n, vw, t = (
                        bars.o[0], bars.dh[k], bars.dl[k], bars.c[k], bars.dv[k], bars.dn[k], bars.dvw[k], midnight
                    )  # fmt: skip
                msgs.append((BarMessage if letter == "b" else DailyBarMessage)(sym, o, h, lo, c, v, ts(t), n, vw))
        return msgs
