"""The live hub: one upstream stream, checked, routed and fanned out to many clients.

Alpaca allows one stream connection per account and feed, so the gateway owns it. :class:`LiveHub`

* holds the one :class:`~marketpipe.providers.alpaca_stream.AlpacaStream` (the primary) and
  subscribes upstream only what its clients want (reference-counted per channel and symbol);
* runs every trade and quote through :class:`~marketpipe.quality.stream_checks.StreamChecker`;
* feeds the :class:`~marketpipe.service.stream_router.DataSourceRouter` a health report every
  ``MONITOR_SECONDS`` and, when the router says so, polls the fallback vendors' REST latest trades
  and quotes (Polygon, …; Alpaca's REST API only when no other vendor is configured);
* turns what is published into :class:`Item` objects put on every interested client's bounded queue.
  An item is encoded at most once per wire format, however many clients receive it;
* writes the stream's minute bars to the store, and after a reconnect fetches the minute bars the
  outage missed over REST (gap backfill) — nothing is ever filled in;
* keeps the previous session's close in the store, so change and change % survive a restart.

Two kinds of subscription: ``prices`` (the unified price update of ``/v1/stream``, SSE and the
dashboard) and the upstream channel names (``trades``, ``quotes``, ``bars``, … for the
Alpaca-compatible stream). Unified updates come from the router's active source: the stream while
the primary is active, the polled fallback while it is not. The Alpaca-compatible clients get the
stream's own messages only (Alpaca's format has no field to attribute another vendor's data).

Slow clients: each client's queue holds ``client_queue`` items. When it is ``slow_warn_fraction``
full the client is told (a ``slow_consumer`` warning); when it is full the client is dropped with an
error. The hub never waits for a client, so one slow client never stalls the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import orjson
import polars as pl

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument, MarketpipeError, SlowConsumer, UnknownSymbol
from marketpipe.core.events import hub as event_hub
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import (
    FANOUT_CLIENTS,
    FANOUT_DROPPED_CLIENTS,
    STREAM_BARS_PERSISTED,
    STREAM_GAP_BACKFILLS,
)
from marketpipe.core.schema import BAR_SCHEMA, Bar, Quote, Trade, normalize_symbol
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_stream import CHANNELS, AlpacaStream, Outage, StreamMessage
from marketpipe.providers.base import BarPage
from marketpipe.quality.stream_checks import StreamChecker
from marketpipe.service.backfill import check_page
from marketpipe.service.gateway import Gateway
from marketpipe.service.stream_router import FALLBACK, PRIMARY, DataSourceRouter, RouterConfig, SourceState

log = get_logger("marketpipe.service.live")

PRICES = "prices"
WILDCARD = "*"
ALPACA_PROTOCOL = "alpaca"  # clients of the Alpaca-compatible stream: no unified-stream status notices
ROUTED_WITH = {"corrections": "trades", "cancel_errors": "trades"}  # as Alpaca sends them
MONITOR_SECONDS = 1.0
OFFICIAL_DATA_URL = "https://data.alpaca.markets"
ALPACA_STREAM_URL = "wss://stream.data.alpaca.markets"
MINUTE = Timeframe.parse("1Min")
# quality_score of a unified update: checked real-time stream data 1.0; polled fallback data is
# delayed by up to the poll interval; a symbol whose sources disagree loses a fifth; stale halves it.
SCORE_STREAM = 1.0
SCORE_POLLED = 0.8
CROSS_SOURCE_PENALTY = 0.2


# --- fan-out ------------------------------------------------------------------------------------------


class Item:
    """One message on its way to clients: a channel (``prices`` or an upstream channel), a symbol and
    the record (a canonical Trade/Quote/Bar, a dict for events, or the unified price dict). Encodings
    are cached per wire format, so a message is encoded once however many clients receive it."""

    __slots__ = ("_enc", "arrived", "channel", "record", "symbol")

    def __init__(self, channel: str, symbol: str, record: Any, arrived: float = 0.0) -> None:
        self.channel = channel
        self.symbol = symbol
        self.record = record
        self.arrived = arrived  # epoch seconds the upstream frame arrived (0: not from upstream)
        self._enc: dict[str, Any] = {}

    def encoded(self, fmt: str, encode: Callable[[Item], Any]) -> Any:
        try:
            return self._enc[fmt]
        except KeyError:
            value = self._enc[fmt] = encode(self)
            return value


def unified_json(item: Item) -> bytes:
    return orjson.dumps(item.record)


class FanoutClient:
    """A client's bounded queue. The hub calls :meth:`put` (never blocks); the connection's writer
    task awaits :meth:`next_batch` and sends what it returns. Control messages (warnings, status
    changes, errors) go ahead of data in :attr:`notices`."""

    def __init__(self, protocol: str, name: str, limit: int, warn_fraction: float) -> None:
        self.protocol = protocol
        self.name = name
        self.limit = limit
        self.warn_at = max(1, int(limit * warn_fraction))
        self.queue: deque[Item] = deque()
        self.notices: deque[dict[str, Any]] = deque()
        self.subscriptions: dict[str, set[str]] = {}
        self.closed: str | None = None  # the reason, once dropped or closed
        self.close_message = ""  # why, in words, once dropped
        self.warned = False
        self.dropped = asyncio.Event()
        self._wake = asyncio.Event()

    def put(self, item: Item) -> None:
        if self.closed is not None:
            return
        q = self.queue
        if len(q) >= self.limit:
            self.drop("slow_consumer", f"the client did not keep up: {self.limit} messages were waiting")
            return
        q.append(item)
        if len(q) >= self.warn_at and not self.warned:
            self.warned = True
            self.notice(
                {
                    "type": "warning",
                    "code": SlowConsumer.code,
                    "message": f"{len(q)} messages waiting; at {self.limit} this connection is closed",
                    "queued": len(q),
                    "limit": self.limit,
                }
            )
        self._wake.set()

    def notice(self, msg: dict[str, Any]) -> None:
        if self.closed is None:
            if len(self.notices) >= self.limit:  # replies to a client that sends but never reads
                self.drop("slow_consumer", f"the client did not read: {self.limit} replies were waiting")
                return
            self.notices.append(msg)
            self._wake.set()

    def drop(self, reason: str, message: str) -> None:
        """Close this client: its writer sends the error and ends the connection."""
        if self.closed is not None:
            return
        self.closed = reason
        self.close_message = message
        self.queue.clear()
        told = [n for n in self.notices if n.get("code") == SlowConsumer.code]  # the warning, if still unsent
        self.notices.clear()
        self.notices.extend(told)
        self.notices.append({"type": "error", "code": reason.upper(), "message": message})
        self.dropped.set()
        FANOUT_DROPPED_CLIENTS.labels(self.protocol, reason).inc()
        log.warning("fanout_client_dropped", protocol=self.protocol, client=self.name, reason=reason)
        self._wake.set()

    async def next_batch(self, max_items: int = 1_000) -> tuple[list[dict[str, Any]], list[Item]]:
        """Wait for something to send: (control messages, data items). Both empty after close."""
        while not self.queue and not self.notices:
            if self.closed is not None:
                return [], []
            self._wake.clear()
            await self._wake.wait()
        notices = list(self.notices)
        self.notices.clear()
        q = self.queue
        n = min(len(q), max_items)
        items = [q.popleft() for _ in range(n)]
        if self.warned and len(q) < self.warn_at // 2:
            self.warned = False  # caught up: warn again if it falls behind again
        return notices, items

    def close(self) -> None:
        if self.closed is None:
            self.closed = "closed"
        self._wake.set()

    @property
    def close_frame(self) -> tuple[int, str]:
        """The WebSocket close (code, reason) that tells the client why: 1008 ``SLOW_CONSUMER: …`` for
        a dropped client (the reason within the protocol's 123 bytes), else a normal 1000."""
        if self.closed is None or self.closed == "closed":
            return 1000, ""
        reason = f"{self.closed.upper()}: {self.close_message}".encode()
        return 1008, reason[:123].decode("utf-8", "ignore")


# --- per-symbol state ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Symbol:
    price: float | None = None
    size: int | None = None
    bid: float | None = None
    ask: float | None = None
    bid_size: int | None = None
    ask_size: int | None = None
    ts: datetime | None = None  # the last event's (trade or quote)
    source: str | None = None  # of the price (the last trade), or of the quote until a trade is seen
    feed: str | None = None
    trade_ts: datetime | None = None
    trade_source: str | None = None
    quote_ts: datetime | None = None
    quote_source: str | None = None
    prev_close: float | None = None
    session: date | None = None
    volume: int = 0
    disagrees: bool = False
    spark: deque[tuple[float, float]] = field(default_factory=deque)  # (epoch seconds, price)


@dataclass(slots=True)
class _Stats:
    received: int = 0
    published: int = 0
    rejected: int = 0
    fallback_polls: int = 0
    fallback_updates: int = 0
    bars_persisted: int = 0
    outages: int = 0
    gap_backfills: int = 0
    gap_bars: int = 0


def stream_url(config: Config) -> str:
    """``[stream] url``, else derived from the Alpaca provider: Alpaca's stream for the official data
    API, the same host (``ws://``) for anything else (marketpipe's simulator serves both)."""
    url = config.stream.url
    if url is None:
        base = config.provider("alpaca").base_url
        if not base or base.rstrip("/") == OFFICIAL_DATA_URL:
            return ALPACA_STREAM_URL
        url = base
    url = url.rstrip("/")
    if url.startswith("http://"):
        return "ws://" + url[7:]
    if url.startswith("https://"):
        return "wss://" + url[8:]
    return url


class LiveHub:
    """See the module docstring. Create inside the event loop that will run it; :meth:`start`,
    then attach clients; :meth:`close` at shutdown."""

    def __init__(
        self,
        config: Config,
        gateway: Gateway,
        *,
        env: dict[str, str] | None = None,
        stream: AlpacaStream | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
        monitor_seconds: float = MONITOR_SECONDS,
        market_open: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.stream
        self.gateway = gateway
        self.data = gateway.data
        s = self.settings
        self.router = DataSourceRouter(
            RouterConfig(
                failure_threshold=s.failure_threshold,
                grace_seconds=s.grace_seconds,
                fallback_poll_seconds=s.fallback_poll_seconds,
                stale_seconds=s.stale_seconds,
            ),
            clock=clock,
        )
        self.checker = StreamChecker(s)
        self._env = env
        self._stream = stream
        self._stream_error: MarketpipeError | None = None
        self._clock = clock
        self._now = now
        self.monitor_seconds = monitor_seconds
        self._market_open = market_open or gateway.is_market_hours
        self._seen_reconnects = 0
        self._clients: set[FanoutClient] = set()
        self._routes: dict[tuple[str, str], set[FanoutClient]] = {}
        self._upstream: dict[tuple[str, str], int] = {}  # (upstream channel, symbol) -> clients
        self._symbols: dict[str, _Symbol] = {}
        self._bars: dict[tuple[str, datetime], Bar] = {}
        self._updated: dict[tuple[str, datetime], Bar] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._polling = False
        self._last_cross_check = clock()
        self._stats = _Stats()
        self._started = False
        self._closed = False
        self._persist_lock = asyncio.Lock()
        self._upstream_lock = asyncio.Lock()
        self._froze = False
        self._last_flush = clock()

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def stream(self) -> AlpacaStream | None:
        return self._stream

    async def start(self) -> None:
        """Start the monitor; connect upstream once there is something to subscribe. Never raises for
        a missing key or an unreachable vendor: the router then runs on the fallback."""
        if self._started:
            return
        self._started = True
        # A server's long-lived heap (pandas, polars, calendars, the app) is moved out of the cyclic
        # collector's sight: under stream load a full collection otherwise walks all of it several times
        # a second (measured: a quarter of the ingest rate). Objects made from here on are collected as usual.
        gc.collect()
        gc.freeze()
        self._froze = True
        if self._stream is None:
            self._stream = self._new_stream()
        if self._stream is not None:
            self._stream.add_batch_handler(self.handle_batch)
        self.router.on_transition(self._on_transition)
        self._monitor = asyncio.create_task(self._run_monitor(), name="live-hub-monitor")
        always = [normalize_symbol(sym) for sym in self.settings.symbols]  # [stream] symbols: held for good
        fresh = [sym for sym in always if sym not in self._symbols]
        for sym in always:
            self._symbols.setdefault(sym, _Symbol())
            await self._add_upstream(sym, _upstream_channels(PRICES))
        if fresh:
            self._spawn(self._ensure_prev_close(fresh))

    def _new_stream(self) -> AlpacaStream | None:
        s = self.settings
        try:
            return AlpacaStream(
                s.feed or self.config.provider("alpaca", AlpacaConfig).feed,
                base_url=stream_url(self.config),
                env=self._env,
                encoding="json" if s.encoding == "json" else "msgpack",
                stale_seconds=s.stale_seconds,
                on_reconnect=self.on_outage if s.gap_backfill else None,
            )
        except MarketpipeError as exc:
            self._stream_error = exc
            log.warning("live_primary_unavailable", code=exc.code, error=exc.message)
            return None

    async def _restart_stream(self, reason: str) -> None:
        """A stream that stopped for good (auth failed, not entitled) is replaced by a new one carrying
        every upstream subscription — on an admin reconnect, once the cause may have been fixed."""
        old = self._stream
        stream = self._new_stream()
        if stream is None:
            return
        if old is not None:
            await old.close()
        self._stream, self._seen_reconnects = stream, 0
        stream.add_batch_handler(self.handle_batch)
        wanted: dict[str, list[str]] = {}
        for ch, sym in self._upstream:
            wanted.setdefault(ch, []).append(sym)
        log.warning("live_stream_restarted", reason=reason, subscriptions=sum(len(v) for v in wanted.values()))
        if wanted:
            await stream.start()
            await stream.subscribe(**wanted)  # sent once connected

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in list(self._clients):
            c.close()
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        if self._stream is not None:
            await self._stream.close()  # first: no bar may arrive after the last flush
        with contextlib.suppress(Exception):
            await self.flush()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._froze:
            gc.unfreeze()  # native extensions (DuckDB) check their objects are freed at exit
            self._froze = False

    # --- clients ----------------------------------------------------------------------------------------

    def attach(self, protocol: str, name: str = "", *, queue_size: int | None = None) -> FanoutClient:
        if self._closed:
            raise InvalidArgument("the live hub is shut down")
        client = FanoutClient(
            protocol,
            name or uuid.uuid4().hex[:8],
            queue_size or self.settings.client_queue,
            self.settings.slow_warn_fraction,
        )
        self._clients.add(client)
        FANOUT_CLIENTS.labels(protocol).inc()
        return client

    async def detach(self, client: FanoutClient) -> None:
        """Forget ``client``: its routes go at once (nothing more is queued for it); the upstream
        unsubscribes run as the hub's own task, so a cancelled caller cannot leave them half done."""
        if client not in self._clients:
            return
        self._clients.discard(client)
        client.close()
        FANOUT_CLIENTS.labels(client.protocol).dec()
        releases = [(ch, self._unroute(client, ch, list(syms))) for ch, syms in client.subscriptions.items()]
        await self._shielded(self._release_all(releases))

    async def subscribe(self, client: FanoutClient, channel: str, symbols: Iterable[str]) -> list[str]:
        """Add ``symbols`` (normalised; ``*`` for upstream channels) on ``channel``; returns the
        client's whole list for that channel. A bad symbol raises InvalidArgument and changes nothing;
        a symbol the vendor refuses raises its error, the ones before it stay subscribed."""
        if channel != PRICES and channel not in CHANNELS:
            raise InvalidArgument(f"unknown channel {channel!r}", details={"channel": channel})
        syms = [self._symbol(channel, s) for s in symbols]
        have = client.subscriptions.setdefault(channel, set())
        new = [s for s in dict.fromkeys(syms) if s not in have]
        total = sum(len(v) for v in client.subscriptions.values())
        if total + len(new) > self.settings.max_symbols_per_client:
            raise InvalidArgument(
                f"at most {self.settings.max_symbols_per_client} subscriptions per client",
                details={"limit": self.settings.max_symbols_per_client},
            )
        await self._shielded(self._subscribe(client, channel, new))
        return sorted(have)

    async def _subscribe(self, client: FanoutClient, channel: str, new: list[str]) -> None:
        """The hub's side of a subscribe, run to the end even when the caller is cancelled: counted
        upstream, then routed — or released again if the client left meanwhile."""
        upstream = _upstream_channels(channel)
        fresh: list[str] = []
        try:
            for s in new:
                if s != WILDCARD and s not in self._symbols:
                    self._symbols[s] = _Symbol()
                    fresh.append(s)
                await self._add_upstream(s, upstream)  # raises (and counts nothing) when the vendor refuses
                if client.closed is not None:
                    await self._drop_upstream(s, upstream)
                    continue
                client.subscriptions.setdefault(channel, set()).add(s)
                self._routes.setdefault((channel, s), set()).add(client)
                if channel == PRICES:
                    self._send_last(client, s)
        finally:
            if fresh:
                self._spawn(self._ensure_prev_close(fresh))  # one snapshot request for the lot

    async def unsubscribe(self, client: FanoutClient, channel: str, symbols: Iterable[str]) -> list[str]:
        gone = self._unroute(client, channel, [raw if raw == WILDCARD else normalize_symbol(raw) for raw in symbols])
        await self._shielded(self._release_all([(channel, gone)]))
        return sorted(client.subscriptions.get(channel, set()))

    def _unroute(self, client: FanoutClient, channel: str, symbols: list[str]) -> list[str]:
        """Take ``symbols`` off ``client`` (synchronously); returns the ones it had."""
        have = client.subscriptions.get(channel, set())
        gone = []
        for s in symbols:
            if s not in have:
                continue
            have.discard(s)
            gone.append(s)
            route = self._routes.get((channel, s))
            if route is not None:
                route.discard(client)
                if not route:
                    del self._routes[(channel, s)]
        return gone

    async def _release_all(self, releases: list[tuple[str, list[str]]]) -> None:
        for channel, symbols in releases:
            for s in symbols:
                await self._drop_upstream(s, _upstream_channels(channel))

    async def _shielded(self, coro: Any) -> Any:
        """Run ``coro`` as a hub task the caller awaits; cancelling the caller does not cancel it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _symbol(self, channel: str, raw: str) -> str:
        if raw == WILDCARD:
            if channel == PRICES:
                raise InvalidArgument("the unified price stream takes symbols, not '*'", details={"symbol": raw})
            return raw
        return normalize_symbol(str(raw))

    async def _add_upstream(self, symbol: str, channels: Iterable[str]) -> None:
        """One more user of (channel, symbol) for each channel; the stream hears of the ones going
        0 → 1 in one subscribe. If the vendor refuses, nothing is counted."""
        async with self._upstream_lock:
            new = [ch for ch in channels if self._upstream.get((ch, symbol), 0) == 0]
            if new and self._stream is not None:
                await self._stream.start()  # connects on the first subscription (no-op after)
                await self._stream_call(self._stream.subscribe, new, symbol)
            for ch in channels:
                self._upstream[(ch, symbol)] = self._upstream.get((ch, symbol), 0) + 1

    async def _drop_upstream(self, symbol: str, channels: Iterable[str]) -> None:
        async with self._upstream_lock:
            gone = []
            for ch in channels:
                n = self._upstream.get((ch, symbol), 0) - 1
                if n > 0:
                    self._upstream[(ch, symbol)] = n
                else:
                    self._upstream.pop((ch, symbol), None)
                    gone.append(ch)
            if gone and self._stream is not None:
                with contextlib.suppress(MarketpipeError):  # already gone upstream: nothing to undo
                    await self._stream_call(self._stream.unsubscribe, gone, symbol)

    async def _stream_call(self, method: Callable[..., Any], channels: list[str], symbol: str) -> None:
        try:
            await method(**{ch: [symbol] for ch in channels})
        except MarketpipeError as exc:  # e.g. 405 symbol limit: the client asked, the vendor refused
            log.warning("live_upstream_subscription_failed", channels=channels, symbol=symbol, code=exc.code)
            raise

    def upstream_symbols(self, channel: str = "bars") -> list[str]:
        return sorted(s for (ch, s) in self._upstream if ch == channel and s != WILDCARD)

    # --- upstream messages ------------------------------------------------------------------------------

    def handle(self, msg: StreamMessage) -> None:
        """One upstream message: see :meth:`handle_batch`."""
        self.handle_batch([msg])

    def handle_batch(self, msgs: list[StreamMessage]) -> None:
        """One upstream frame's messages (the stream's batch handler): check, fan out to the channel's
        subscribers, publish unified prices while the stream is the active source, buffer bars."""
        stats = self._stats
        stats.received += len(msgs)
        routes = self._routes
        checker = self.checker
        state = self.router.state
        publish = state is SourceState.PRIMARY_ACTIVE or state is SourceState.STARTUP
        latest: dict[str, dict[str, Any]] = {}
        arrived = _arrival(msgs[0].record) if msgs else 0.0
        for msg in msgs:
            rec = msg.record
            channel = msg.channel
            kind = type(rec)
            if kind is Trade:
                if checker.check_trade(rec.symbol, rec.price, rec.size, rec.ts, rec.fetched_at, rec.source):
                    stats.rejected += 1
                    continue
            elif kind is Quote:
                if checker.check_quote(
                    rec.symbol,
                    rec.bid_price,
                    rec.bid_size,
                    rec.ask_price,
                    rec.ask_size,
                    rec.ts,
                    rec.fetched_at,
                    rec.source,
                ):
                    stats.rejected += 1
                    continue
            elif kind is Bar:
                if channel == "bars":
                    self._bars[(rec.symbol, rec.ts)] = rec
                elif channel == "updated_bars":
                    self._updated[(rec.symbol, rec.ts)] = rec
            symbol = msg.symbol or ""
            if routes:
                route = ROUTED_WITH.get(channel, channel)  # corrections and cancel errors come with trades
                targets = routes.get((route, symbol))
                wild = routes.get((route, WILDCARD))
                if targets or wild:
                    item = Item(channel, symbol, rec, arrived)
                    if targets:
                        for c in targets:
                            c.put(item)
                    if wild:
                        for c in wild:
                            if not targets or c not in targets:  # on both AAPL and "*": once
                                c.put(item)
            if publish and (kind is Trade or kind is Quote):
                self._publish_price(
                    rec,
                    real_time=rec.feed != "delayed_sip",
                    score=SCORE_STREAM,
                    role=PRIMARY,
                    last=latest,
                    arrived=arrived,
                )
        for symbol, doc in latest.items():
            self.router.record(symbol, doc, source=PRIMARY)

    def _publish_price(
        self,
        rec: Trade | Quote,
        *,
        real_time: bool,
        score: float,
        role: str,
        last: dict[str, dict[str, Any]] | None = None,
        arrived: float = 0.0,
    ) -> None:
        st = self._symbols.get(rec.symbol)
        if st is None:
            st = self._symbols[rec.symbol] = _Symbol()
        day = rec.ts.date()
        if st.session != day:
            st.session, st.volume = day, 0
        if isinstance(rec, Trade):
            if st.trade_ts is not None and rec.ts < st.trade_ts and st.trade_source == rec.source:
                return  # an out-of-order trade never moves the last price back
            st.price, st.size = rec.price, rec.size
            st.volume += rec.size
            st.trade_ts, st.trade_source = rec.ts, rec.source
            st.source, st.feed = rec.source, rec.feed
            spark = st.spark
            spark.append((rec.ts.timestamp(), rec.price))
            while len(spark) > self.settings.sparkline_points:
                spark.popleft()
        else:
            if st.quote_ts is not None and rec.ts < st.quote_ts and st.quote_source == rec.source:
                return
            st.bid, st.ask, st.bid_size, st.ask_size = rec.bid_price, rec.ask_price, rec.bid_size, rec.ask_size
            st.quote_ts, st.quote_source = rec.ts, rec.source
            if st.trade_source is None:
                st.source, st.feed = rec.source, rec.feed
        st.ts = rec.ts
        doc = self._unified(rec.symbol, st, "trade" if isinstance(rec, Trade) else "quote", real_time, score, rec)
        if last is None:
            self.router.record(rec.symbol, doc, source=role)  # type: ignore[arg-type]
        else:
            last[rec.symbol] = doc  # the caller records the batch's last value per symbol once
        self._stats.published += 1
        targets = self._routes.get((PRICES, rec.symbol))
        if targets:
            item = Item(PRICES, rec.symbol, doc, arrived)
            for c in targets:
                c.put(item)

    def _unified(
        self, symbol: str, st: _Symbol, event: str, real_time: bool, score: float, rec: Trade | Quote | None
    ) -> dict[str, Any]:
        change = change_pct = None
        if st.price is not None and st.prev_close:
            change = round(st.price - st.prev_close, 6)
            change_pct = round(change / st.prev_close * 100.0, 4)
        if st.disagrees:
            score -= CROSS_SOURCE_PENALTY
        return {
            "type": "price",
            "event": event,
            "symbol": symbol,
            "price": st.price,
            "size": st.size,
            "bid": st.bid,
            "ask": st.ask,
            "bid_size": st.bid_size,
            "ask_size": st.ask_size,
            "change": change,
            "change_pct": change_pct,
            "prev_close": st.prev_close,
            "volume": st.volume,
            "timestamp": st.ts,
            "received_at": rec.fetched_at if rec is not None else None,
            "source": st.source,
            "quote_source": st.quote_source,
            "feed": st.feed,
            "is_real_time": real_time,
            "quality_score": round(score, 3),
            "stale": False,
        }

    def _on_transition(self, old: SourceState, new: SourceState, reason: str) -> None:
        """Unified-stream clients are told which source serves them now."""
        msg = {
            "type": "status",
            "state": str(new),
            "previous": str(old),
            "active_source": self.router.active_source,
            "reason": reason,
            "at": self._now(),
        }
        for c in self._clients:
            if PRICES in c.subscriptions or c.protocol != ALPACA_PROTOCOL:
                c.notice(msg)

    def _send_last(self, client: FanoutClient, symbol: str) -> None:
        """A new subscriber gets the last value at once, labelled stale when it is."""
        last = self.router.last(symbol)
        if last is None:
            return
        doc = dict(last["value"])
        doc["stale"] = bool(last["stale"])
        if doc["stale"]:
            doc["quality_score"] = round(float(doc.get("quality_score") or 0.0) / 2, 3)
        doc["age_seconds"] = round(float(last["age_seconds"]), 3)
        client.put(Item(PRICES, symbol, doc))

    # --- monitor: router health, fallback, persistence ------------------------------------------------

    async def _run_monitor(self) -> None:
        while True:
            try:
                await self._monitor_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the monitor must outlive any one failure
                log.error("live_monitor_failed", error=repr(exc))
            await asyncio.sleep(self.monitor_seconds)

    async def _monitor_once(self) -> None:
        stream = self._stream
        if not self._upstream:
            self.router.primary_idle()  # nothing subscribed: nothing to be stale about
        elif stream is None:
            self.router.primary_failed(self._stream_error.code if self._stream_error else "no_stream")
        else:
            health = stream.health()
            seen, self._seen_reconnects = self._seen_reconnects, health.reconnects
            if health.stopped:
                code = health.stop_error.get("code") if health.stop_error else "stopped"
                self.router.primary_failed(str(code))
            elif not health.connected:
                # one failure per lost connection or failed attempt (the stream retries with backoff);
                # a first connection still being opened is not a failure (silence counts via staleness)
                if health.reconnects > seen:
                    self.router.primary_failed("disconnected")
            elif self._flowing(health):
                self.router.primary_ok()
        self.router.tick()
        for req in self.router.take_reconnects():
            if req.source != PRIMARY:
                continue
            if stream is None or stream.health().stopped:
                await self._restart_stream(f"requested: {req.reason}")
            else:
                await stream.reconnect(f"requested: {req.reason}")
        if self.router.should_poll_fallback() and not self._polling and self._price_symbols():
            self._spawn(self._poll_fallback())
        s = self.settings
        now = self._clock()
        if (
            s.cross_check_seconds
            and now - self._last_cross_check >= s.cross_check_seconds
            and self.router.state is SourceState.PRIMARY_ACTIVE
            and not self._polling
        ):
            self._last_cross_check = now
            self._spawn(self._poll_fallback(cross_check_only=True))
        if s.persist_bars and now - self._last_flush >= s.persist_every_seconds:
            self._last_flush = now
            await self.flush()

    def _flowing(self, health: Any) -> bool:
        """Connected with data within ``stale_seconds`` (or connected more recently than that). Outside
        market hours a connected stream may rightly be silent: connected is enough then."""
        if not self._market_open():
            return True
        if not health.last_message_at:
            since = health.connected_since
            return since is not None and (self._now() - since).total_seconds() < self.settings.stale_seconds
        newest = max(health.last_message_at.values())
        return (self._now() - newest).total_seconds() < self.settings.stale_seconds

    def _price_symbols(self) -> list[str]:
        return sorted(s for (ch, s) in self._routes if ch == PRICES)

    def _fallback_providers(self) -> list[Any]:
        usable, _ = self.gateway.candidates("latest_trade")
        usable = [p for p in usable if hasattr(p, "latest_trades")]
        others = [p for p in usable if p.name != "alpaca"]
        return others or usable

    async def _poll_fallback(self, cross_check_only: bool = False) -> None:
        """Latest trades and quotes from the first fallback vendor that answers."""
        syms = self._price_symbols()
        if not syms:
            return
        self._polling = True
        try:
            errors: list[str] = []
            for p in self._fallback_providers():
                try:
                    trades = await p.latest_trades(syms)
                    quotes = await p.latest_quotes(syms) if hasattr(p, "latest_quotes") else {}
                except MarketpipeError as exc:
                    errors.append(f"{p.name}: {exc.code}")
                    continue
                if not trades and not quotes:
                    errors.append(f"{p.name}: no data for {', '.join(syms)}")
                    continue
                self._stats.fallback_polls += 1
                if cross_check_only:
                    for sym, t in trades.items():
                        res = self.checker.cross_check(sym, t.price, t.source)
                        if res is not None and sym in self._symbols:
                            self._symbols[sym].disagrees = res.warned
                    return
                self.router.fallback_ok()
                if self.router.active_source != FALLBACK:
                    return  # the primary took over meanwhile
                self._apply_fallback(trades, quotes)
                return
            if not cross_check_only:
                self.router.fallback_failed("; ".join(errors) or "no fallback provider")
        finally:
            self._polling = False

    def _apply_fallback(self, trades: dict[str, Trade], quotes: dict[str, Quote]) -> None:
        for sym in sorted(set(trades) | set(quotes)):
            for rec in (quotes.get(sym), trades.get(sym)):
                if rec is None:
                    continue
                if isinstance(rec, Trade):
                    res = self.checker.cross_check(sym, rec.price, rec.source)
                    st = self._symbols.get(sym)
                    if res is not None and st is not None:
                        st.disagrees = res.warned
                    if self.checker.check_trade(sym, rec.price, rec.size, rec.ts, rec.fetched_at, rec.source):
                        continue
                st = self._symbols.get(sym)
                if st is not None:
                    seen_ts, seen_src = (
                        (st.trade_ts, st.trade_source) if isinstance(rec, Trade) else (st.quote_ts, st.quote_source)
                    )
                    if seen_ts is not None and rec.ts <= seen_ts and seen_src == rec.source:
                        continue  # nothing new since the last poll
                self._stats.fallback_updates += 1
                self._publish_price(rec, real_time=False, score=SCORE_POLLED, role=FALLBACK)

    # --- previous close ------------------------------------------------------------------------------

    def _expected_prev_session(self) -> date | None:
        cal = get_calendar(self.config.calendar)
        now = self._now()
        started = [s for s in cal.sessions(now - timedelta(days=14), now + timedelta(minutes=1)) if s.open <= now]
        return started[-2].day if len(started) >= 2 else None

    async def _ensure_prev_close(self, symbols: list[str]) -> None:
        """Previous session's close: from the store when it is the right session, else from a
        snapshot (with failover), then kept in the store."""
        try:
            want = await asyncio.to_thread(self._expected_prev_session)
            held = await asyncio.to_thread(self.data.store.prev_closes, symbols)
            missing = [s for s in symbols if s not in held or held[s][0] != want]
            for s, (_session, close, _src) in held.items():
                if s not in missing:
                    self._set_prev_close(s, close)
            if not missing:
                return
            snaps = await self.gateway.snapshots(missing)
            for s in missing:
                if s not in snaps:
                    self._tell_subscribers(
                        s,
                        {
                            "type": "warning",
                            "code": UnknownSymbol.code,
                            "symbol": s,
                            "message": f"no vendor has a snapshot of {s}: subscribed, but nothing may arrive",
                        },
                    )
            tz = ZoneInfo(get_calendar(self.config.calendar).tz)
            rows: list[tuple[str, date, float, str]] = []
            for s, snap in snaps.items():
                bar = snap.prev_daily_bar
                if bar is None or not bar.close > 0:
                    continue
                session = bar.ts.astimezone(tz).date()
                rows.append((s, session, float(bar.close), bar.source))
                self._set_prev_close(s, float(bar.close))
            await asyncio.to_thread(self.data.store.save_prev_closes, rows)
        except MarketpipeError as exc:
            log.warning("live_prev_close_unavailable", symbols=symbols, code=exc.code, error=exc.message)

    def _tell_subscribers(self, symbol: str, notice: dict[str, Any]) -> None:
        for c in self._routes.get((PRICES, symbol), ()):
            c.notice(notice)

    def _set_prev_close(self, symbol: str, close: float) -> None:
        st = self._symbols.setdefault(symbol, _Symbol())
        st.prev_close = close

    # --- persistence and gap backfill -----------------------------------------------------------------

    async def flush(self) -> int:
        """Write the minute bars received since the last flush (checked like any page)."""
        if not self._bars and not self._updated:
            return 0
        async with self._persist_lock:
            stored = 0
            for attr, refresh in (("_bars", False), ("_updated", True)):
                taken: dict[tuple[str, datetime], Bar] = getattr(self, attr)
                if not taken:
                    continue
                setattr(self, attr, {})
                try:
                    stored += await asyncio.to_thread(self._write_bars, list(taken.values()), refresh)
                except Exception as exc:  # noqa: BLE001 - keep the bars for the next flush, newer versions win
                    pending: dict[tuple[str, datetime], Bar] = getattr(self, attr)
                    setattr(self, attr, {**taken, **pending})
                    log.error("live_bars_not_stored", bars=len(taken), error=repr(exc))
            return stored

    def _write_bars(self, bars: list[Bar], refresh: bool) -> int:
        frame = pl.DataFrame(
            [msgspec.structs.astuple(b) for b in bars],  # Bar's fields are BAR_SCHEMA's columns, in order
            schema=BAR_SCHEMA,
            orient="row",
        ).sort("symbol", "ts")
        first = bars[0]
        page = BarPage(
            frame=frame,
            symbols=sorted({b.symbol for b in bars}),
            timeframe=MINUTE,
            start=min(b.ts for b in bars),
            end=max(b.ts for b in bars) + timedelta(minutes=1),
            feed=first.feed or "",
            source=first.source,
            request_id=f"stream-{uuid.uuid4().hex[:12]}",
            fetched_at=max(b.fetched_at for b in bars),
            next_page_token=None,
            page_number=0,
        )
        checked = check_page(page, {}, "alpaca_stream", self._now(), anomaly=None, refresh=refresh)
        stored = self.data.store.write_pages([checked.write])[0]
        n = checked.write.bars.height
        self._stats.bars_persisted += n
        STREAM_BARS_PERSISTED.labels(first.source).inc(n)
        return stored

    async def on_outage(self, outage: Outage) -> None:
        """Fetch the minute bars the outage missed over REST, for the symbols whose bars are streamed."""
        self._stats.outages += 1
        syms = self.upstream_symbols("bars")
        if not syms:
            return
        since = outage.last_data_at or outage.disconnected_at
        start = since.replace(second=0, microsecond=0)
        end = outage.reconnected_at.replace(second=0, microsecond=0)  # the current minute is still forming
        if end <= start:
            return
        self._spawn(self._gap_backfill(syms, start, end, outage.reason))

    async def _gap_backfill(self, syms: list[str], start: datetime, end: datetime, reason: str) -> None:
        try:
            stats = await self.data.backfill(syms, start, end, timeframe="1Min")
        except MarketpipeError as exc:
            STREAM_GAP_BACKFILLS.labels("failed").inc()
            log.warning("live_gap_backfill_failed", symbols=syms, start=start, end=end, code=exc.code)
            return
        self._stats.gap_backfills += 1
        self._stats.gap_bars += stats.bars_stored
        STREAM_GAP_BACKFILLS.labels("ok").inc()
        log.info("live_gap_backfill", symbols=syms, start=start, end=end, reason=reason, stored=stats.bars_stored)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- admin and exposure ---------------------------------------------------------------------------

    def force_failover(self, reason: str = "admin") -> None:
        self.router.force_failover(reason)

    def release(self, reason: str = "admin") -> None:
        self.router.release(reason)

    def request_reconnect(self, reason: str = "admin") -> None:
        self.router.request_reconnect(PRIMARY, reason)

    def datasource(self) -> dict[str, Any]:
        """``/health/datasource``'s live part: the router, the upstream connection, the fan-out."""
        doc = self.router.snapshot()
        # the router keeps monotonic times; wall-clock ones for people and dashboards
        doc["since_at"] = self._wall(doc["since"])
        for tr in doc["history"]:
            tr["at_time"] = self._wall(tr["at"])
        stream = self._stream
        doc["primary"]["stream"] = (
            stream.health().to_dict()
            if stream is not None
            else {"connected": False, "error": self._stream_error.to_dict() if self._stream_error else None}
        )
        st = self._stats
        doc["fanout"] = {
            "clients": len(self._clients),
            "by_protocol": dict(Counter(c.protocol for c in self._clients)),
            "subscribed_symbols": len(self._symbols),
        }
        doc["stats"] = {
            "received": st.received,
            "published": st.published,
            "rejected": st.rejected,
            "rejected_by_reason": dict(self.checker.rejected),
            "fallback_polls": st.fallback_polls,
            "fallback_updates": st.fallback_updates,
            "bars_persisted": st.bars_persisted,
            "outages": st.outages,
            "gap_backfills": st.gap_backfills,
            "gap_bars_stored": st.gap_bars,
        }
        return doc

    def _wall(self, at: float) -> str:
        return (self._now() - timedelta(seconds=self._clock() - at)).isoformat()

    def board(self, symbols: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The dashboard's table: last unified value per symbol (stale-labelled) and its sparkline."""
        names = sorted(self._symbols) if symbols is None else [normalize_symbol(s) for s in symbols]
        rows = []
        for sym in names:
            st = self._symbols.get(sym)
            last = self.router.last(sym)
            row: dict[str, Any] = dict(last["value"]) if last else {"type": "price", "symbol": sym, "price": None}
            row["stale"] = bool(last["stale"]) if last else None
            row["age_seconds"] = round(float(last["age_seconds"]), 3) if last else None
            row["prev_close"] = st.prev_close if st else None
            row["sparkline"] = [p for _, p in st.spark] if st else []
            rows.append(row)
        return rows

    @staticmethod
    def alerts(limit: int = 50) -> list[dict[str, Any]]:
        return [e.to_dict() for e in list(event_hub.recent)[-limit:]][::-1]


def _arrival(record: Any) -> float:
    fetched = getattr(record, "fetched_at", None)
    if fetched is None and isinstance(record, dict):
        fetched = record.get("fetched_at")
    return fetched.timestamp() if isinstance(fetched, datetime) else 0.0


def observe_delivery(histogram: Any, items: list[Item]) -> None:
    """After a client frame is written: how long its oldest upstream message spent in the gateway."""
    if items and items[0].arrived:
        histogram.observe(max(0.0, time.time() - items[0].arrived))


def _upstream_channels(channel: str) -> tuple[str, ...]:
    """What a hub subscription needs upstream: unified prices come from trades and quotes (and the
    minute bars are stored); an Alpaca-compatible channel is itself."""
    return ("trades", "quotes", "bars") if channel == PRICES else (channel,)
