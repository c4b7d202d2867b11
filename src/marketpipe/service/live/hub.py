"""The live hub: one upstream stream, checked, routed and fanned out to many clients.

Alpaca allows one stream connection per account and feed, so the gateway owns it. :class:`LiveHub`
wires together

* the one :class:`~marketpipe.providers.alpaca_stream.AlpacaStream` (the primary). Each client's
  subscription is one reference on the stream, which counts them per channel and symbol and tells
  the vendor only of the changes 0 → 1 and 1 → 0 (the hub counts nothing itself);
* :class:`~marketpipe.quality.stream_checks.StreamChecker`, which every trade and quote passes;
* the :class:`~marketpipe.service.stream_router.DataSourceRouter`, fed a health report every
  ``MONITOR_SECONDS``; when it fails over, the :class:`~.poller.FallbackPoller` polls REST;
* the :class:`~.fanout.Fanout` (clients, routes, bounded queues), the :class:`~.board.PriceBoard`
  (unified prices, as ``price_board``), the :class:`~.bars.BarWriter` (stream bars to the store, gap backfill) and
  :class:`~.bars.PrevCloses`.

Unified updates come from the router's active source: the stream while the primary is active, the
polled fallback while it is not. The Alpaca-compatible clients get the stream's own messages only
(Alpaca's format has no field to attribute another vendor's data).

Crypto pairs go to the hub's **crypto lane** (:attr:`LiveHub.crypto`, made on the first pair): a second
``LiveHub`` with ``asset_class="crypto"`` sharing this hub's fan-out (so one client may hold stocks and
pairs), whose primary is a :class:`~.crypto.CryptoLiveStream` (one client of the shared
:class:`~.crypto.CryptoHub`: one upstream per location for ``/v1/stream`` and ``/v1beta3/crypto``
alike) and whose fallback poller reads the crypto REST latest values. It has its own router, price
board and checks; its market never closes, so silence is always staleness. Its status notices carry
``"asset_class": "crypto"`` and go to the clients holding pairs. Like a stock's, a pair's stream minute
bars (and their ``updated_bars`` revisions) are stored — in ``crypto_bars``, fractional volumes exact —
and after an upstream outage of the lane the minutes it missed are backfilled over REST from the crypto
source (:class:`~.bars.BarWriter` of the lane). Pairs have no previous close here (change is null).

Option contracts (OCC symbols, ``SPY261218C00240000``) go to the **options lane** (:attr:`LiveHub.options`,
made on the first contract, ``options_live`` given) the same way: a ``LiveHub`` with
``asset_class="option"`` on the shared fan-out, whose primary is an :class:`~.options.OptionsLiveStream`
(one client of the shared :class:`~.options.OptionsLive`: one upstream per feed for ``/v1/stream`` and
``/v1beta1/{indicative,opra}`` alike), whose router is ``live_options`` and whose fallback poller reads the
options REST latest trades and quotes (:class:`~.options.OptionsLatest`), published as delayed. Options
trade in the equities' hours, so its market is the stock calendar's (a quiet stream outside market hours
is not a failure). Channels: ``prices``, ``trades``, ``quotes`` (the vendor streams no option bars; no
greeks are computed or streamed). Status notices carry ``"asset_class": "option"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument, MarketpipeError, UnknownSymbol
from marketpipe.core.events import hub as event_hub
from marketpipe.core.log import get_logger
from marketpipe.core.options import is_option, parse_occ
from marketpipe.core.schema import Bar, Quote, StreamRecord, Trade, is_crypto, normalize_symbol
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_stream import (
    AlpacaStream,
    Outage,
    StreamHealth,
    StreamMessage,
)
from marketpipe.quality.stream_checks import StreamChecker
from marketpipe.service.gateway import Gateway
from marketpipe.service.live.bars import BarWriter, PrevCloses
from marketpipe.service.live.board import SCORE_POLLED, SCORE_STREAM, PriceBoard
from marketpipe.service.live.fanout import ALPACA_PROTOCOL, PRICES, WILDCARD, Fanout, FanoutClient, Item, Route
from marketpipe.service.live.poller import FallbackPoller
from marketpipe.service.stream_router import (
    FALLBACK,
    PRIMARY,
    DataSourceRouter,
    Role,
    RouterConfig,
    SourceState,
)
from marketpipe.wire.alpaca_stream import CHANNELS, stream_base_url, ws_scheme

log = get_logger("marketpipe.service.live")

MONITOR_SECONDS = 1.0
EQUITY = "us_equity"
CRYPTO = "crypto"
OPTION = "option"
CRYPTO_CHANNELS = ("trades", "quotes", "bars", "updated_bars", "daily_bars", "orderbooks")
OPTION_CHANNELS = ("trades", "quotes")
LANE_CHANNELS = {CRYPTO: CRYPTO_CHANNELS, OPTION: OPTION_CHANNELS}
ASSET_WORDS = {EQUITY: "stocks", CRYPTO: "crypto pairs", OPTION: "option contracts"}


def asset_class_of(symbol: str) -> str:
    """A canonical symbol's asset class: a crypto pair, an OCC option contract, else a stock."""
    if is_crypto(symbol):
        return CRYPTO
    return OPTION if is_option(symbol) else EQUITY


T = TypeVar("T")


def stream_url(config: Config) -> str:
    """``[stream] url``, else the stream host that goes with the Alpaca provider's data URL
    (:func:`marketpipe.wire.alpaca_stream.stream_base_url`)."""
    if config.stream.url:
        return ws_scheme(config.stream.url)
    return stream_base_url(config.provider("alpaca", AlpacaConfig).base_url)


def upstream_channels(channel: str) -> tuple[str, ...]:
    """What a hub subscription needs upstream: unified prices come from trades and quotes (and the
    minute bars, which are stored — a stock's and a pair's alike); any other channel is itself."""
    if channel == PRICES:
        return ("trades", "quotes", "bars")
    return (channel,)


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
        asset_class: str = EQUITY,
        fanout: Fanout | None = None,
        crypto_hub: Callable[[], Any] | None = None,
        options_live: Callable[[], Any] | None = None,
        fallback_sources: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.config = config
        self.settings = s = config.stream
        self.gateway = gateway
        self.data = gateway.data
        self.router = DataSourceRouter(
            RouterConfig(
                failure_threshold=s.failure_threshold,
                grace_seconds=s.grace_seconds,
                fallback_poll_seconds=s.fallback_poll_seconds,
                stale_seconds=s.stale_seconds,
            ),
            clock=clock,
            name="live" if asset_class == EQUITY else f"live_{asset_class}",  # metrics and alerts per lane
        )
        self.checker = StreamChecker(s)
        self.asset_class = asset_class
        self.lane = fanout is not None  # a lane of another hub: its fan-out, that hub's lifecycle
        self.fanout = fanout or Fanout(s.client_queue, s.slow_warn_fraction)
        self.price_board = PriceBoard(self.router, s.sparkline_points)
        self.poller = FallbackPoller(
            gateway, self.router, self.checker, self.price_board, self._publish_polled, fallback_sources
        )
        self.crypto: LiveHub | None = None  # the crypto lane, made on the first pair (crypto_hub given)
        self._crypto_hub = crypto_hub
        self.options: LiveHub | None = None  # the options lane, made on the first contract (options_live given)
        self._options_live = options_live
        self._lane_lock = asyncio.Lock()
        self.bars = BarWriter(
            self.data, now, self._spawn, lambda: self.upstream_symbols("bars"), crypto=asset_class == CRYPTO
        )
        self.prev_closes = PrevCloses(
            gateway, config.calendar, now, self.price_board.set_prev_close, self._unknown_symbol
        )
        self._env = env
        self._stream = stream
        self._stream_error: MarketpipeError | None = None
        self._clock = clock
        self._now = now
        self.monitor_seconds = monitor_seconds
        self._market_open = market_open or gateway.is_market_hours
        self._seen_reconnects = 0
        self._held: list[str] = []  # [stream] symbols: subscribed upstream for good
        self._upstream_lock = asyncio.Lock()  # a subscription change and a stream restart never interleave
        self._tasks: set[asyncio.Task[Any]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._last_cross_check = clock()
        self._last_flush = clock()
        self.received = 0
        self.rejected = 0
        # the crypto vendor sends a fresh bars subscriber the last finished minute at once; a lane sharing
        # one upstream subscription (prices bring bars upstream) hands a later subscriber the last one seen
        self._last_bars: dict[str, Bar] | None = {} if asset_class == CRYPTO else None
        self._started = False
        self._closed = False
        self._froze = False

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
        if not self.lane:
            gc.collect()
            gc.freeze()
            self._froze = True
        if self._stream is None:
            self._stream = self._new_stream()
        if self._stream is not None:
            self._stream.add_batch_handler(self.handle_batch)
        self.router.on_transition(self._on_transition)
        self._monitor = asyncio.create_task(self._run_monitor(), name="live-hub-monitor")
        held = [self.stream_symbol(PRICES, raw) for raw in self.settings.symbols]
        await self.hold([s for s in held if self.owns(s)])
        if not self.lane:
            for kind in (CRYPTO, OPTION):
                theirs = [s for s in held if asset_class_of(s) == kind]
                if theirs:
                    await (await self.lane_of(kind)).hold(theirs)

    async def hold(self, symbols: list[str]) -> None:
        """Subscribe ``symbols`` upstream for good (``[stream] symbols``)."""
        fresh = []
        for sym in symbols:
            if self.price_board.add(sym):
                fresh.append(sym)
            async with self._upstream_lock:
                await self._upstream_add(sym, self.upstream_channels(PRICES))
                self._held.append(sym)
        if fresh and self.asset_class == EQUITY:
            self._spawn(self.prev_closes.ensure(fresh))

    def owns(self, symbol: str) -> bool:
        """Whether ``symbol`` is this hub's asset class (``*`` is the stock stream's)."""
        if symbol == WILDCARD:
            return self.asset_class == EQUITY
        return asset_class_of(symbol) == self.asset_class

    def upstream_channels(self, channel: str) -> tuple[str, ...]:
        if self.asset_class == OPTION and channel == PRICES:
            return OPTION_CHANNELS  # no option bars on the vendor's stream
        return upstream_channels(channel)

    async def lane_of(self, asset_class: str) -> LiveHub:
        return await (self.crypto_lane() if asset_class == CRYPTO else self.options_lane())

    def lanes(self) -> list[LiveHub]:
        return [h for h in (self.crypto, self.options) if h is not None]

    async def options_lane(self) -> LiveHub:
        """The options lane (see the module docstring), started on first use."""
        async with self._lane_lock:
            if self.options is None:
                if self._options_live is None or self.lane:
                    raise InvalidArgument("this live hub streams no option contracts", details={"asset_class": OPTION})
                from marketpipe.service.live.options import OptionsLatest, OptionsLiveStream

                options = self.data.options
                feed = options.provider.feed(None)  # the plan's default feed: opra on unlimited, else indicative
                lane = LiveHub(
                    self.config,
                    self.gateway,
                    env=self._env,
                    stream=OptionsLiveStream(self._options_live(), feed),  # type: ignore[arg-type]
                    clock=self._clock,
                    now=self._now,
                    monitor_seconds=self.monitor_seconds,
                    market_open=self._market_open,  # the equities' calendar: options trade in its hours
                    asset_class=OPTION,
                    fanout=self.fanout,
                    fallback_sources=lambda: [OptionsLatest(options, feed)],
                )
                await lane.start()
                self.options = lane
            return self.options

    async def crypto_lane(self) -> LiveHub:
        """The crypto lane (see the module docstring), started on first use."""
        async with self._lane_lock:
            if self.crypto is None:
                if self._crypto_hub is None or self.lane:
                    raise InvalidArgument("this live hub streams no crypto pairs", details={"asset_class": CRYPTO})
                from marketpipe.service.live.crypto import CryptoLatest, CryptoLiveStream

                data = self.data
                stream = CryptoLiveStream(self._crypto_hub())
                lane = LiveHub(
                    self.config,
                    self.gateway,
                    env=self._env,
                    stream=stream,  # type: ignore[arg-type]
                    clock=self._clock,
                    now=self._now,
                    monitor_seconds=self.monitor_seconds,
                    market_open=lambda: True,  # around the clock: silence is always staleness
                    asset_class=CRYPTO,
                    fanout=self.fanout,
                    fallback_sources=lambda: [CryptoLatest(data.crypto)],
                )
                if self.settings.gap_backfill:
                    stream.on_reconnect = lane.bars.on_outage  # the minutes an outage missed, over REST
                await lane.start()
                self.crypto = lane
            return self.crypto

    def _hub_of(self, symbol: str) -> LiveHub:
        return next((h for h in self.lanes() if h.owns(symbol)), self)

    def _new_stream(self) -> AlpacaStream | None:
        s = self.settings
        try:
            return AlpacaStream(
                s.feed or self.config.provider("alpaca", AlpacaConfig).feed,
                base_url=stream_url(self.config),
                env=self._env,
                encoding="json" if s.encoding == "json" else "msgpack",
                stale_seconds=s.stale_seconds,
                on_reconnect=self.bars.on_outage if s.gap_backfill else None,
            )
        except MarketpipeError as exc:
            self._stream_error = exc
            log.warning("live_primary_unavailable", code=exc.code, error=exc.message)
            return None

    async def _restart_stream(self, reason: str) -> None:
        """A stream that stopped for good (auth failed, not entitled) is replaced by a new one carrying
        every upstream reference — on an admin reconnect, once the cause may have been fixed."""
        stream = self._new_stream()
        if stream is None:
            return
        async with self._upstream_lock:
            old = self._stream
            if old is not None:
                await old.close()
            self._stream, self._seen_reconnects = stream, 0
            stream.add_batch_handler(self.handle_batch)
            wanted = self.upstream_wanted()
            log.warning("live_stream_restarted", reason=reason, subscriptions=len(wanted))
            # not connected yet: the references are only counted, and sent together once connected
            for round_ in range(max(wanted.values(), default=0)):
                req: dict[str, list[str]] = {}
                for (ch, sym), n in wanted.items():
                    if n > round_:
                        req.setdefault(ch, []).append(sym)
                await stream.subscribe(**req)
            if wanted:
                await stream.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for lane in self.lanes():
            await lane.close()
        self.fanout.close_all()
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

    # --- clients and subscriptions ----------------------------------------------------------------------

    def attach(self, protocol: str, name: str = "", *, queue_size: int | None = None) -> FanoutClient:
        if self._closed:
            raise InvalidArgument("the live hub is shut down")
        return self.fanout.attach(protocol, name, queue_size)

    async def detach(self, client: FanoutClient) -> None:
        """Forget ``client``: its routes go at once (nothing more is queued for it); the upstream
        releases run as the hub's own task, so a cancelled caller cannot leave them half done."""
        releases = self.fanout.detach(client)
        if releases is not None:
            await self._shielded(self._release_all(releases))

    async def subscribe(self, client: FanoutClient, channel: str, symbols: Iterable[str]) -> list[str]:
        """Add ``symbols`` (normalised; ``*`` for upstream channels) on ``channel``; returns the
        client's whole list for that channel. A bad symbol raises InvalidArgument and changes nothing;
        a symbol the vendor refuses raises its error, the ones before it stay subscribed."""
        if channel != PRICES and channel not in CHANNELS and channel not in CRYPTO_CHANNELS:
            raise InvalidArgument(f"unknown channel {channel!r}", details={"channel": channel})
        syms = [self.stream_symbol(channel, s) for s in symbols]
        for s in syms:
            kind = EQUITY if s == WILDCARD else asset_class_of(s)
            if kind != EQUITY and client.protocol == ALPACA_PROTOCOL:  # Alpaca's stock stream has neither
                elsewhere = "/v1beta3/crypto/us" if kind == CRYPTO else "/v1beta1/indicative or /v1beta1/opra"
                raise InvalidArgument(
                    f"{s} is not a stock: Alpaca's stock stream has no {ASSET_WORDS[kind]} (use {elsewhere})",
                    details={"symbol": s},
                )
            if channel != PRICES and channel not in LANE_CHANNELS.get(kind, CHANNELS):
                raise InvalidArgument(
                    f"the {channel} channel is not streamed for {ASSET_WORDS[kind]} ({s})",
                    details={"channel": channel, "symbol": s},
                )
        have = client.subscriptions.setdefault(channel, set())
        new = [s for s in dict.fromkeys(syms) if s not in have]
        total = sum(len(v) for v in client.subscriptions.values())
        if total + len(new) > self.settings.max_symbols_per_client:
            raise InvalidArgument(
                f"at most {self.settings.max_symbols_per_client} subscriptions per client",
                details={"limit": self.settings.max_symbols_per_client},
            )
        mine = [s for s in new if self.owns(s)]
        if mine:
            await self._shielded(self._subscribe(client, channel, mine))
        for kind in (CRYPTO, OPTION):  # another lane's symbols (a lane itself is asked for its own only)
            theirs = [s for s in new if s != WILDCARD and not self.owns(s) and asset_class_of(s) == kind]
            if theirs:
                lane = await self.lane_of(kind)
                await lane._shielded(lane._subscribe(client, channel, theirs))
        return sorted(have)

    async def _subscribe(self, client: FanoutClient, channel: str, new: list[str]) -> None:
        """The hub's side of a subscribe, run to the end even when the caller is cancelled: one
        reference upstream, then routed — or released again if the client left meanwhile."""
        upstream = self.upstream_channels(channel)
        fresh: list[str] = []
        try:
            for s in new:
                if s != WILDCARD and self.price_board.add(s):
                    fresh.append(s)
                async with self._upstream_lock:
                    await self._upstream_add(s, upstream)  # raises (and holds nothing) when the vendor refuses
                    if client.closed is not None:
                        await self._upstream_release(s, upstream)
                        continue
                    self.fanout.route(client, channel, s)
                if channel == PRICES:
                    doc = self.price_board.last_update(s)
                    if doc is not None:
                        client.put(Item(PRICES, s, doc))
                elif channel == "bars" and self._last_bars is not None and s in self._last_bars:
                    client.put(Item(channel, s, self._last_bars[s]))  # a pair's last minute, as the vendor does
                elif channel == "orderbooks":  # a book already followed: the whole of it now (reset)
                    current = getattr(self._stream, "current_book", None)
                    book = current(s) if current is not None else None
                    if book is not None:
                        client.put(Item(channel, s, book))
        finally:
            if fresh and self.asset_class == EQUITY:
                self._spawn(self.prev_closes.ensure(fresh))  # one snapshot request for the lot

    async def unsubscribe(self, client: FanoutClient, channel: str, symbols: Iterable[str]) -> list[str]:
        wanted = [self.stream_symbol(channel, raw) for raw in symbols]
        gone = self.fanout.unroute(client, channel, wanted)
        await self._shielded(self._release_all([(channel, gone)]))
        return sorted(client.subscriptions.get(channel, set()))

    async def _release_all(self, releases: list[tuple[str, list[str]]]) -> None:
        for channel, symbols in releases:
            for s in symbols:
                hub = self._hub_of(s)
                async with hub._upstream_lock:
                    await hub._upstream_release(s, hub.upstream_channels(channel))

    async def _upstream_add(self, symbol: str, channels: tuple[str, ...]) -> None:
        """One more reference on the stream for each of ``channels`` (caller holds the upstream lock)."""
        stream = self._stream
        if stream is None:
            return  # counted by nobody: a restarted stream gets what the routes want
        await stream.start()  # connects on the first subscription (no-op after)
        try:
            await stream.subscribe(**{ch: [symbol] for ch in channels})
        except MarketpipeError as exc:  # e.g. 405 symbol limit: the client asked, the vendor refused
            log.warning("live_upstream_subscription_failed", channels=channels, symbol=symbol, code=exc.code)
            raise

    async def _upstream_release(self, symbol: str, channels: tuple[str, ...]) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            await stream.unsubscribe(**{ch: [symbol] for ch in channels})
        except MarketpipeError as exc:  # already gone upstream (a stream rebuilt meanwhile): nothing to undo
            log.info("live_upstream_release_failed", channels=channels, symbol=symbol, code=exc.code)

    async def _shielded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` as a hub task the caller awaits; cancelling the caller does not cancel it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def stream_symbol(channel: str, raw: str) -> str:
        """A client's symbol as the hub keys it: a stock or a pair normalised, an OCC contract parsed
        (``INVALID_OPTION_SYMBOL`` when it cannot exist), ``*`` only on an upstream channel."""
        if raw == WILDCARD:
            if channel == PRICES:
                raise InvalidArgument("the unified price stream takes symbols, not '*'", details={"symbol": raw})
            return raw
        if is_option(raw):
            return parse_occ(raw).symbol  # an impossible date or a zero strike: INVALID_OPTION_SYMBOL
        return normalize_symbol(str(raw))

    def upstream_wanted(self) -> Counter[Route]:
        """The references the clients (and ``[stream] symbols``) hold upstream, per (upstream channel,
        symbol) — derived from the routes; the stream keeps the count."""
        want: Counter[Route] = Counter()
        for (channel, sym), clients in self.fanout.routes.items():
            if not self.owns(sym):
                continue
            for ch in self.upstream_channels(channel):
                want[(ch, sym)] += len(clients)
        for sym in self._held:
            for ch in self.upstream_channels(PRICES):
                want[(ch, sym)] += 1
        return want

    def upstream_symbols(self, channel: str = "bars") -> list[str]:
        return sorted({s for (ch, s) in self.upstream_wanted() if ch == channel and s != WILDCARD})

    # --- upstream messages ------------------------------------------------------------------------------

    def handle(self, msg: StreamMessage) -> None:
        """One upstream message: see :meth:`handle_batch`."""
        self.handle_batch([msg])

    def handle_batch(self, msgs: list[StreamMessage]) -> None:
        """One upstream frame's messages (the stream's batch handler): check, fan out to the channel's
        subscribers, publish unified prices while the stream is the active source, buffer bars."""
        self.received += len(msgs)
        routes = self.fanout.routes
        deliver = self.fanout.deliver
        checker = self.checker
        state = self.router.state
        publish = state is SourceState.PRIMARY_ACTIVE or state is SourceState.STARTUP
        latest: dict[str, dict[str, Any]] = {}
        last_bars = self._last_bars
        arrived = _arrival(msgs[0].record) if msgs else 0.0
        for channel, rec in msgs:
            price: Trade | Quote | None = None
            # exact types: the record union is told apart by its class (trades and quotes first: the bulk)
            if type(rec) is Trade:
                if checker.check_trade(rec.symbol, rec.price, rec.size, rec.ts, rec.fetched_at, rec.source):
                    self.rejected += 1
                    continue
                price, symbol = rec, rec.symbol
            elif type(rec) is Quote:
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
                    self.rejected += 1
                    continue
                price, symbol = rec, rec.symbol
            elif type(rec) is Bar:
                self.bars.add(channel, rec)
                symbol = rec.symbol
                if last_bars is not None and channel == "bars":
                    last_bars[symbol] = rec
            else:  # a stream event or a raw message
                symbol = rec.symbol or ""
            if routes:
                deliver(channel, symbol, rec, arrived)
            if publish and price is not None:
                self._publish(price, price.feed != "delayed_sip", SCORE_STREAM, PRIMARY, latest, arrived)
        for symbol, doc in latest.items():
            self.router.record(symbol, doc, source=PRIMARY)

    def _publish(
        self,
        rec: Trade | Quote,
        real_time: bool,
        score: float,
        role: Role,
        last: dict[str, dict[str, Any]] | None = None,
        arrived: float = 0.0,
    ) -> None:
        doc = self.price_board.update(rec, real_time, score)
        if doc is None:
            return
        if last is None:
            self.router.record(rec.symbol, doc, source=role)
        else:
            last[rec.symbol] = doc  # the caller records the batch's last value per symbol once
        self.fanout.publish(rec.symbol, doc, arrived)

    def _publish_polled(self, rec: Trade | Quote) -> None:
        self._publish(rec, False, SCORE_POLLED, FALLBACK)

    def _unknown_symbol(self, symbol: str) -> None:
        self.fanout.tell_subscribers(
            symbol,
            {
                "type": "warning",
                "code": UnknownSymbol.code,
                "symbol": symbol,
                "message": f"no vendor has a snapshot of {symbol}: subscribed, but nothing may arrive",
            },
        )

    def _on_transition(self, old: SourceState, new: SourceState, reason: str) -> None:
        """Unified-stream clients are told which source serves them now: the stock router's changes
        go to every client but those holding only pairs; the crypto lane's to those holding a pair."""
        self.fanout.tell_unified(
            {
                "type": "status",
                "asset_class": self.asset_class,
                "state": str(new),
                "previous": str(old),
                "active_source": self.router.active_source,
                "reason": reason,
                "at": self._now(),
            },
            self._concerns,
        )

    def _concerns(self, client: FanoutClient) -> bool:
        held = [s for syms in client.subscriptions.values() for s in syms]
        if self.asset_class != EQUITY:
            return any(self.owns(s) for s in held)
        return not held or any(self.owns(s) for s in held)

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
        if not any(self.owns(sym) for _, sym in self.fanout.routes) and not self._held:
            self.router.primary_idle()  # nothing subscribed: nothing to be stale about
        elif stream is None:
            self.router.primary_failed(self._stream_error.code if self._stream_error else "no_stream")
        else:
            health = stream.health()
            seen, self._seen_reconnects = self._seen_reconnects, health.reconnects
            if health.stopped:
                code = health.stop_error.get("code") if health.stop_error else "stopped"
                self.router.primary_failed(str(code))
            elif health.reconnects > seen:
                # a connection lost or an attempt failed since the last look (the stream retries with
                # backoff): a failure even when it is up again at this instant, or a vendor that drops
                # every connection would look healthy whenever it is looked at between two drops
                self.router.primary_failed("disconnected")
            elif not health.connected:
                pass  # a first connection still being opened is not a failure (silence counts via staleness)
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
        poller = self.poller
        price_symbols = [s for s in self.fanout.symbols(PRICES) if self.owns(s)]
        if self.router.should_poll_fallback() and not poller.polling and price_symbols:
            self._spawn(poller.poll(price_symbols))
        s = self.settings
        now = self._clock()
        if (
            s.cross_check_seconds
            and now - self._last_cross_check >= s.cross_check_seconds
            and self.router.state is SourceState.PRIMARY_ACTIVE
            and not poller.polling
        ):
            self._last_cross_check = now
            self._spawn(poller.poll(price_symbols, cross_check_only=True))
        if s.persist_bars and now - self._last_flush >= s.persist_every_seconds:
            self._last_flush = now
            await self.flush()

    def _flowing(self, health: StreamHealth) -> bool:
        """Connected with data within ``stale_seconds`` (or connected more recently than that). Outside
        market hours a connected stream may rightly be silent: connected is enough then."""
        if not self._market_open():
            return True
        if not health.last_message_at:
            since = health.connected_since
            return since is not None and (self._now() - since).total_seconds() < self.settings.stale_seconds
        newest = max(health.last_message_at.values())
        return (self._now() - newest).total_seconds() < self.settings.stale_seconds

    # --- persistence -------------------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write the stream's minute bars received since the last flush."""
        return await self.bars.flush()

    async def on_outage(self, outage: Outage) -> None:
        await self.bars.on_outage(outage)

    # --- admin and exposure ---------------------------------------------------------------------------

    def force_failover(self, reason: str = "admin") -> None:
        """Live data to the fallback (the crypto lane's too: its REST latest values)."""
        self.router.force_failover(reason)
        for lane in self.lanes():
            lane.force_failover(reason)

    def release(self, reason: str = "admin") -> None:
        self.router.release(reason)
        for lane in self.lanes():
            lane.release(reason)

    def request_reconnect(self, reason: str = "admin") -> None:
        self.router.request_reconnect(PRIMARY, reason)
        for lane in self.lanes():
            lane.request_reconnect(reason)

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
        doc["fanout"] = {**self.fanout.snapshot(), "subscribed_symbols": len(self.price_board.symbols)}
        bars, poller = self.bars, self.poller
        doc["stats"] = {
            "received": self.received,
            "published": self.price_board.published,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.checker.rejected),
            "fallback_polls": poller.polls,
            "fallback_updates": poller.updates,
            "bars_persisted": bars.persisted,
            "outages": bars.outages,
            "gap_backfills": bars.gap_backfills,
            "gap_bars_stored": bars.gap_bars,
        }
        doc["asset_class"] = self.asset_class
        for hub in self.lanes():
            lane = hub.datasource()
            lane.pop("fanout", None)  # shared: reported once, above
            doc["crypto" if hub.asset_class == CRYPTO else "options"] = lane
        return doc

    def _wall(self, at: float) -> str:
        return (self._now() - timedelta(seconds=self._clock() - at)).isoformat()

    def board(self, symbols: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The dashboard's table: last unified value per symbol (stale-labelled) and its sparkline."""
        if symbols is None:
            rows = self.price_board.rows(None)
            return rows + [r for lane in self.lanes() for r in lane.price_board.rows(None)]
        names = [self.stream_symbol(PRICES, s) for s in symbols]
        return [self._hub_of(s).price_board.rows([s])[0] for s in names]

    @staticmethod
    def alerts(limit: int = 50) -> list[dict[str, Any]]:
        return [e.to_dict() for e in list(event_hub.recent)[-limit:]][::-1]


def _arrival(record: StreamRecord) -> float:
    return record.fetched_at.timestamp()
