"""The crypto live hub: one upstream Alpaca crypto stream per location, shared by every client.

Clients (the gateway's ``/v1beta3/crypto/{loc}`` WebSocket, :mod:`marketpipe.api.crypto_stream`)
register a bounded queue and subscribe per channel and pair; the hub keeps reference counts and
changes the upstream subscription only when the first client asks for a (channel, pair) or the last
one leaves. Each upstream message is handed once to every client that subscribed to it (a full queue
drops the client, as the stock hub does with slow consumers). Order books: the hub keeps each pair's
book (:class:`~marketpipe.wire.alpaca_crypto.LocalBook`) so that a client subscribing later gets the
current whole book (``"r": true``) at once instead of waiting for the vendor's next reset; an update
that arrives before any whole book is counted (``marketpipe_stream_errors_total{code="ORDERBOOK_NOT_RESET"}``),
logged and still delivered as received: nothing is dropped. A failed or closed upstream is
reconnected with full-jitter backoff and subscribed again to what clients hold
(``marketpipe_stream_reconnects_total{provider="alpaca_crypto"}``); clients keep their subscriptions,
and the hub's outage listeners (:meth:`CryptoHub.on_outage`) are told the window it was down
(:class:`~marketpipe.providers.alpaca_stream.Outage`: from the loss to the restored subscription, with
the last data message before it), so the live hub can backfill the minute bars it missed.

The project's own stream (``/v1/stream``) reaches the same upstreams through :class:`CryptoLiveStream`:
one more client of this hub, which the live hub (:class:`~.hub.LiveHub`'s crypto lane) uses as its
primary stream, as it uses :class:`~marketpipe.providers.alpaca_stream.AlpacaStream` for stocks, with
:class:`CryptoLatest` (the REST latest values) as its fallback source.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from marketpipe.core.config import Config, alpaca_credentials
from marketpipe.core.errors import MalformedMessage, MarketpipeError, MissingCredentials, OrderbookNotReset
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import STREAM_ERRORS, STREAM_MESSAGES, STREAM_RECONNECTS
from marketpipe.core.schema import OrderBook, Quote, Trade
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_crypto_stream import CryptoStreamConnection, crypto_stream_url
from marketpipe.providers.alpaca_stream import Outage, ReconnectHook, StreamHealth, StreamMessage
from marketpipe.service.live.lane import LaneStream
from marketpipe.wire.alpaca_crypto import (
    CHANNEL_OF_TYPE,
    CHANNELS,
    DEFAULT_LOCATION,
    LocalBook,
    quote_records,
    stream_record,
    trade_records,
)

if TYPE_CHECKING:
    from marketpipe.service.crypto import CryptoData

log = get_logger("marketpipe.service.live.crypto")
PROVIDER = "alpaca_crypto"


@dataclass(eq=False)
class CryptoClient:
    """One downstream connection: its subscription and its bounded queue of message lists."""

    queue: asyncio.Queue[list[dict[str, Any]] | None]
    subs: dict[str, dict[str, None]] = field(default_factory=lambda: {c: {} for c in CHANNELS})
    dropped: bool = False


@dataclass(eq=False)
class _Upstream:
    loc: str
    conn: CryptoStreamConnection
    task: asyncio.Task[None] | None = None
    refs: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    books: dict[str, LocalBook] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: MarketpipeError | None = None
    connected: bool = False
    connected_since: datetime | None = None
    last_message_at: datetime | None = None
    reconnects: int = 0  # connections lost or failed since the first one


class CryptoHub:
    def __init__(
        self,
        connect: Callable[[str], CryptoStreamConnection],
        *,
        queue_size: int = 10_000,
        base_backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
    ) -> None:
        self._connect = connect
        self.base_backoff_s, self.max_backoff_s = base_backoff_s, max_backoff_s
        self._queue_size = queue_size
        self._up: dict[str, _Upstream] = {}
        self._clients: dict[str, set[CryptoClient]] = defaultdict(set)
        self._outage_listeners: dict[str, list[Callable[[Outage], None]]] = defaultdict(list)
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: Config, *, env: Mapping[str, str] | None = None) -> CryptoHub:
        """A hub whose upstream is the Alpaca provider's (its base URL or ``APCA_API_DATA_URL``), with
        the Alpaca keys when set (the stream needs an auth step; keys are not checked without them)."""
        src = os.environ if env is None else env
        cfg = config.provider("alpaca", AlpacaConfig)
        try:
            key, secret = alpaca_credentials(dict(src))
        except MissingCredentials:
            key = secret = ""
        base = cfg.base_url or src.get("APCA_API_DATA_URL")
        return cls(lambda loc: CryptoStreamConnection(crypto_stream_url(base, loc), key, secret))

    def client(self) -> CryptoClient:
        return CryptoClient(asyncio.Queue(self._queue_size))

    def on_outage(self, loc: str, listener: Callable[[Outage], None]) -> Callable[[], None]:
        """Call ``listener`` (synchronously, from the pump: it must not block) with each outage of the
        location's upstream once it is connected and subscribed again; returns its remover."""
        self._outage_listeners[loc].append(listener)
        return lambda: self._outage_listeners[loc].remove(listener)

    def _outage(self, outage: Outage) -> None:
        log.warning(
            "crypto_stream_outage_over",
            location=outage.feed,
            reason=outage.reason,
            seconds=round((outage.reconnected_at - outage.disconnected_at).total_seconds(), 3),
        )
        for listener in list(self._outage_listeners[outage.feed]):
            try:
                listener(outage)
            except Exception as exc:  # noqa: BLE001 -- a listener's bug must not stop the feed
                log.error("crypto_outage_listener_failed", error=repr(exc))

    async def _upstream(self, loc: str) -> _Upstream:
        up = self._up.get(loc)
        if up is None or (up.task is not None and up.task.done()):
            up = self._up[loc] = _Upstream(loc, self._connect(loc))
            await up.conn.connect()  # a failure (auth, connection) reaches the subscriber as a typed error
            up.connected, up.connected_since = True, utcnow()
            up.task = asyncio.create_task(self._pump(up))
        return up

    def upstream(self, loc: str) -> _Upstream | None:
        """The location's upstream as it stands (None: never connected)."""
        return self._up.get(loc)

    def book(self, loc: str, symbol: str) -> OrderBook | None:
        """The pair's current whole book (``reset``), when the hub follows it and has had a whole book."""
        up = self._up.get(loc)
        book = up.books.get(symbol) if up is not None else None
        if book is None or not book.reset_seen:
            return None
        levels = book.levels()
        return OrderBook(
            symbol=symbol,
            ts=None,
            bids=tuple(levels["b"]),
            asks=tuple(levels["a"]),
            reset=True,
            source=up.conn.source if up is not None else PROVIDER,
            feed=loc,
            fetched_at=utcnow(),
        )

    async def reconnect(self, loc: str) -> bool:
        """Close the location's upstream connection: the pump reconnects and subscribes again."""
        up = self._up.get(loc)
        if up is None or up.task is None or up.task.done():
            return False
        await up.conn.aclose()
        return True

    async def change(self, loc: str, client: CryptoClient, channels: dict[str, list[str]], *, add: bool) -> None:
        """Add or remove (channel, pair)s of ``client``; the upstream hears only first and last ones."""
        async with self._lock:
            up = await self._upstream(loc)
            self._clients[loc].add(client)
            delta: dict[str, list[str]] = defaultdict(list)
            snapshots: list[dict[str, Any]] = []
            for ch, syms in channels.items():
                for s in syms:
                    held = s in client.subs[ch]
                    if add and not held:
                        client.subs[ch][s] = None
                        up.refs[(ch, s)] += 1
                        if up.refs[(ch, s)] == 1:
                            delta[ch].append(s)
                        elif ch == "orderbooks" and s in up.books and up.books[s].reset_seen:
                            snapshots.append(_book_message(up.books[s]))
                    elif not add and held:
                        del client.subs[ch][s]
                        up.refs[(ch, s)] -= 1
                        if up.refs[(ch, s)] == 0:
                            del up.refs[(ch, s)]
                            delta[ch].append(s)
                            if ch == "orderbooks":
                                up.books.pop(s, None)
            if delta:
                await up.conn.send("subscribe" if add else "unsubscribe", dict(delta))
            if snapshots:
                self._put(client, snapshots)

    async def leave(self, loc: str, client: CryptoClient) -> None:
        await self.change(loc, client, {c: list(s) for c, s in client.subs.items() if s}, add=False)
        self._clients[loc].discard(client)

    def _put(self, client: CryptoClient, msgs: list[dict[str, Any]]) -> None:
        if client.dropped:
            return
        try:
            client.queue.put_nowait(msgs)
        except asyncio.QueueFull:
            client.dropped = True
            with contextlib.suppress(asyncio.QueueEmpty):
                client.queue.get_nowait()
            client.queue.put_nowait(None)  # the writer sees it and closes with "slow client"

    async def _pump(self, up: _Upstream) -> None:
        """Relay the upstream's frames; when it fails or ends, reconnect (full-jitter backoff) and
        subscribe again to everything clients hold, as long as any client holds something. The books
        are dropped on a reconnect: the vendor sends each whole book again."""
        attempt = 0
        connected = True
        down: tuple[datetime, datetime | None, str] | None = None  # since, last data before, why
        while True:
            try:
                if not connected:
                    up.conn = self._connect(up.loc)
                    await up.conn.connect()
                    held: dict[str, list[str]] = defaultdict(list)
                    for ch, sym in up.refs:
                        held[ch].append(sym)
                    if held:
                        await up.conn.send("subscribe", dict(held))
                    connected = True
                    up.connected, up.connected_since = True, utcnow()
                    if down is not None:
                        self._outage(Outage(down[0], up.connected_since, down[1], down[2], up.loc))
                        down = None
                async for frame in up.conn.frames():
                    attempt = 0
                    self._relay(up, frame)
                reason = "closed"
            except MarketpipeError as exc:
                up.error = exc
                up.connected = False
                up.reconnects += 1
                reason = exc.code
                STREAM_RECONNECTS.labels(PROVIDER, exc.code).inc()
                log.warning("crypto_stream_reconnecting", location=up.loc, code=exc.code, error=exc.message)
            if down is None:  # the first failure of this outage; retries that fail extend it
                down = (utcnow(), up.last_message_at, reason)
            await up.conn.aclose()
            connected = False
            up.books.clear()
            if not up.refs:
                return  # nobody listens: the next subscriber connects afresh
            await asyncio.sleep(random.uniform(0, min(self.max_backoff_s, self.base_backoff_s * 2**attempt)))
            attempt += 1

    def _relay(self, up: _Upstream, frame: list[dict[str, Any]]) -> None:
        data = [m for m in frame if m.get("T") in CHANNEL_OF_TYPE]
        if data:
            up.last_message_at = utcnow()
        for m in data:
            STREAM_MESSAGES.labels(PROVIDER, up.loc, CHANNEL_OF_TYPE[m["T"]]).inc()
            if m["T"] == "o" and isinstance(m.get("S"), str):
                self._book(up, m)
        for client in list(self._clients[up.loc]):
            mine = [m for m in data if m.get("S") in client.subs[CHANNEL_OF_TYPE[m["T"]]]]
            if mine:
                self._put(client, mine)

    def _book(self, up: _Upstream, msg: dict[str, Any]) -> None:
        sym = msg["S"]
        book = up.books.setdefault(sym, LocalBook(sym))
        try:
            book.apply(msg)
        except OrderbookNotReset as exc:
            STREAM_ERRORS.labels(PROVIDER, exc.code).inc()
            log.warning("orderbook_not_reset", symbol=sym, location=up.loc)

    async def aclose(self) -> None:
        for up in self._up.values():
            if up.task is not None:
                up.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, MarketpipeError):
                    await up.task
            await up.conn.aclose()
        self._up.clear()


def _book_message(book: LocalBook) -> dict[str, Any]:
    levels = book.levels()
    return {
        "T": "o",
        "S": book.symbol,
        "t": book.updated,
        "b": [{"p": p, "s": s} for p, s in levels["b"]],
        "a": [{"p": p, "s": s} for p, s in levels["a"]],
        "r": True,
    }


# The live hub's channel names (the stock stream's) -> the crypto stream's
VENDOR_CHANNELS = {
    "trades": "trades",
    "quotes": "quotes",
    "bars": "bars",
    "updated_bars": "updatedBars",
    "daily_bars": "dailyBars",
    "orderbooks": "orderbooks",
}
HUB_CHANNELS = {v: k for k, v in VENDOR_CHANNELS.items()}


class CryptoLiveStream(LaneStream):
    """The crypto lane's primary stream: what :class:`~.hub.LiveHub` needs of an upstream stream
    (``start``, reference-counted ``subscribe``/``unsubscribe``, batch handlers, ``health``,
    ``reconnect``, ``close``), served by one :class:`CryptoClient` of the shared :class:`CryptoHub`, so
    ``/v1/stream`` and ``/v1beta3/crypto/{loc}`` clients share the location's one upstream connection.

    References are counted per (hub channel, pair) and reconciled with backoff (:class:`~.lane.LaneStream`).
    Messages become canonical records (``wire/alpaca_crypto.stream_record``); one that lacks a value its
    kind needs is counted and logged, never filled in."""

    kind = "crypto_live"

    def __init__(
        self,
        hub: CryptoHub,
        loc: str = DEFAULT_LOCATION,
        *,
        base_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        super().__init__(loc, base_backoff_s=base_backoff_s, max_backoff_s=max_backoff_s)
        self.hub = hub
        self.loc = loc
        self.client = hub.client()
        self.on_reconnect: ReconnectHook | None = None  # as AlpacaStream's: each outage once it is over
        self.outages = 0
        self._hooks: set[asyncio.Task[None]] = set()
        self._forget_outages = hub.on_outage(loc, self._on_outage)

    def _on_outage(self, outage: Outage) -> None:
        """The shared upstream is back after ``outage``: the owner's hook runs as a task of its own."""
        self.outages += 1
        hook = self.on_reconnect
        if hook is None or self._closed:
            return
        task = asyncio.create_task(self._call_hook(hook, outage), name=f"crypto-live-outage-{self.loc}")
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    @staticmethod
    async def _call_hook(hook: ReconnectHook, outage: Outage) -> None:
        try:
            r = hook(outage)
            if inspect.isawaitable(r):
                await r
        except Exception as exc:  # noqa: BLE001 -- the owner's hook must not break the stream
            log.error("crypto_live_on_reconnect_failed", error=repr(exc))

    def _wanted(self) -> set[tuple[str, str]]:
        return {(VENDOR_CHANNELS[ch], s) for (ch, s), n in self.refs.items() if n > 0}

    def _held(self) -> set[tuple[str, str]]:
        return {(ch, s) for ch, syms in self.client.subs.items() for s in syms}

    async def _change(self, channel: str, symbols: list[str], add: bool) -> None:
        await self.hub.change(self.loc, self.client, {channel: symbols}, add=add)

    async def _read(self) -> None:
        while True:
            msgs = await self.client.queue.get()
            if msgs is None:  # this client fell behind the hub: join again, nothing else to do
                log.warning("crypto_live_client_dropped", location=self.loc)
                old, self.client = self.client, self.hub.client()
                await self.hub.leave(self.loc, old)
                await self._reconcile()
                continue
            await self._deliver(msgs)

    async def _deliver(self, msgs: list[dict[str, Any]]) -> None:
        now = utcnow()
        up = self.hub.upstream(self.loc)
        source = up.conn.source if up is not None else PROVIDER
        out: list[StreamMessage] = []
        for m in msgs:
            channel = HUB_CHANNELS[CHANNEL_OF_TYPE[m["T"]]]
            try:
                rec = stream_record(m, source, self.loc, now)
            except MarketpipeError as exc:
                rec, reason = None, exc.code
            else:
                reason = "incomplete"
            if rec is None:
                self.decode_errors += 1
                STREAM_ERRORS.labels(PROVIDER, MalformedMessage.code).inc()
                log.warning("crypto_live_message_undecodable", location=self.loc, reason=reason, message=str(m)[:200])
                continue
            out.append(StreamMessage(channel, rec))
            self._received(channel, now)
        await self._handle(out)

    def current_book(self, symbol: str) -> OrderBook | None:
        """The pair's whole current book, for a client that subscribes to a book already followed."""
        return self.hub.book(self.loc, symbol)

    async def reconnect(self, reason: str = "requested") -> bool:
        log.warning("crypto_live_reconnect", location=self.loc, reason=reason)
        return await self.hub.reconnect(self.loc)

    def health(self) -> StreamHealth:
        up = self.hub.upstream(self.loc)
        connected = up is not None and up.connected and self.error is None
        err = self.error or (up.error if up is not None and not up.connected else None)
        return StreamHealth(
            connected=connected,
            feed=self.loc,
            url=up.conn.url if up is not None else "",
            encoding="json",
            source=up.conn.source if up is not None else PROVIDER,
            connected_since=up.connected_since if up is not None else None,
            last_message_at=dict(self.last_message_at),
            messages_received=self.messages,
            messages_by_channel=dict(self.by_channel),
            reconnects=self.failures + (up.reconnects if up is not None else 0),
            connections=1 if connected else 0,
            errors_by_code={},
            decode_errors=self.decode_errors,
            handler_errors=0,
            subscriptions=self.subscription_counts(),
            server_subscriptions={HUB_CHANNELS[c]: sorted(v) for c, v in self.client.subs.items() if v},
            last_error=err.to_dict() if err is not None else None,
            next_retry_at=None,
            stopped=False,
            stop_error=None,
        )

    async def close(self) -> None:
        self._forget_outages()
        await self._stop_tasks(*self._hooks)
        with contextlib.suppress(MarketpipeError):
            await self.hub.leave(self.loc, self.client)


class CryptoLatest:
    """The crypto lane's fallback source for :class:`~.poller.FallbackPoller`: the latest trades and
    quotes over REST (``/v1beta3/crypto/{loc}/latest/...``), as canonical records with fractional sizes."""

    name = PROVIDER

    def __init__(self, crypto: CryptoData, loc: str = DEFAULT_LOCATION) -> None:
        self.crypto = crypto
        self.loc = loc

    def supports(self, *_: Any) -> None:
        return None  # serves latest trades and quotes for every pair the location lists

    async def latest_trades(self, symbols: list[str]) -> dict[str, Trade]:
        return trade_records(await self.crypto.latest("trades", symbols, location=self.loc))

    async def latest_quotes(self, symbols: list[str]) -> dict[str, Quote]:
        return quote_records(await self.crypto.latest("quotes", symbols, location=self.loc))
