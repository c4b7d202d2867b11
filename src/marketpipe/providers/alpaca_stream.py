"""Alpaca real-time stock stream (WebSocket). Wire format: shared/reference/market-data-apis.md §2.

One :class:`AlpacaStream` is one socket to ``{base_url}/v2/{feed}`` (Alpaca allows one connection per
endpoint per account, so consumers share it): it waits for the welcome, authenticates, subscribes,
and turns every data frame into canonical records (:class:`~marketpipe.core.schema.Trade`,
``Quote``, ``Bar``; statuses, LULD bands, imbalances, corrections and cancel/errors as the tagged
structs ``TradingStatus``, ``Luld``, ``Imbalance``, ``Correction``, ``CancelError``; anything else as a
``RawMessage``), each wrapped in a :class:`StreamMessage` that says its channel. It runs as one task
on the caller's event loop.

* Subscriptions are reference-counted per (channel, symbol): the server sees a subscribe only when a
  count goes 0 → 1 and an unsubscribe only on 1 → 0; the whole set is restored after every reconnect.
* Reconnects use jittered exponential backoff (``backoff_initial`` → ``backoff_max``, reset once a
  connection has stayed up ``healthy_seconds``). A per-channel watchdog reconnects when a subscribed,
  continuously flowing channel (trades, quotes, minute and daily bars) has been silent for longer
  than its limit while the market is open. ``on_reconnect`` receives the outage window, so the owner
  can backfill missed bars over REST.
* Vendor error codes (§2.6), on purpose: 402 stops the stream with ``AuthFailed``; 408/411 and 409
  without a fallback feed stop it with ``NotEntitled``; 409 with ``fallback_feed`` (default ``iex``)
  switches feed and reconnects at once; 406 waits ``limit_backoff_seconds`` (default 60 s) before the
  next try; 401/404/407/500 reconnect; 400/405/410 in answer to a subscribe are raised to the caller
  of :meth:`AlpacaStream.subscribe` and the connection stays; 403 and unknown codes are logged.
* Malformed frames are logged (throttled), counted and skipped; a message of an unknown type is kept
  as a ``raw`` record, never a crash.

Encoding: msgpack by default (``Content-Type: application/msgpack`` on the upgrade, like the official
SDKs; timestamps arrive as msgpack Timestamp ext −1) or JSON with ``encoding="json"``. Timestamps are
held as UTC datetimes (microseconds). Records carry ``source`` (a constructor parameter: ``"alpaca"``,
or ``"sim:alpaca"`` against marketpipe's simulator), the feed actually streamed, and ``fetched_at``
(the frame's receive time).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import alpaca_credentials
from marketpipe.core.errors import (
    AuthFailed,
    InvalidArgument,
    MarketpipeError,
    NotEntitled,
    ProviderBadRequest,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import (
    STREAM_CONNECTED,
    STREAM_CONSUMER_DROPPED,
    STREAM_DECODE_ERRORS,
    STREAM_ERRORS,
    STREAM_FEED_FALLBACKS,
    STREAM_MESSAGES,
    STREAM_RECONNECTS,
)
from marketpipe.core.schema import StreamRecord, normalize_symbol
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.base import sim_source
from marketpipe.wire.alpaca_stream import (
    CHANNELS,
    CONTROL_TYPES,
    DECODERS,
    DEFAULT_STREAM_URL,
    FRAME_ERRORS,
    MESSAGE_CHANNEL_NAMES,
    MESSAGE_CHANNELS,
    MSGPACK_CONTENT_TYPE,
    RAW,
    STREAM_FEEDS,
    Subscription,
    decode_data_frame,
    decode_frame,
    encode,
    raw_record,
    stream_url,
)

# Channels whose data flows continuously while the market is open; the others carry events (halts,
# LULD bands, late-trade bar updates) and may rightly stay silent for hours.
BAR_PERIOD_SECONDS = 60.0
_LOG_EVERY_S = 10.0

log = get_logger("marketpipe.providers.alpaca_stream")

Encoding = Literal["msgpack", "json"]


class StreamMessage(NamedTuple):
    """One data message: ``channel`` is one of :data:`MESSAGE_CHANNEL_NAMES` (``updated_bars`` carries
    a corrected version of the last minute bar; ``raw`` a message of a type this client does not know,
    or a known type that could not be decoded). A named tuple: immutable, and made once per message on
    the hot path (a frozen dataclass costs several times as much to create)."""

    channel: str
    record: StreamRecord

    @property
    def symbol(self) -> str | None:
        return self.record.symbol  # None only for a raw message without a symbol


@dataclass(frozen=True, slots=True)
class Outage:
    """The window in which the stream was not delivering: from the loss of a working connection (or
    the watchdog's decision that it was stale) until the next one was authenticated and subscribed.
    ``last_data_at`` is the receive time of the last data message before the outage (None: none yet);
    missed minute bars lie after it."""

    disconnected_at: datetime
    reconnected_at: datetime
    last_data_at: datetime | None
    reason: str
    feed: str


@dataclass(frozen=True, slots=True)
class StreamHealth:
    """A snapshot of the stream's state for health checks and dashboards."""

    connected: bool
    feed: str
    url: str
    encoding: str
    source: str
    connected_since: datetime | None
    last_message_at: dict[str, datetime]
    messages_received: int
    messages_by_channel: dict[str, int]
    reconnects: int
    connections: int
    errors_by_code: dict[int, int]
    decode_errors: int
    handler_errors: int
    subscriptions: dict[str, dict[str, int]]
    server_subscriptions: dict[str, list[str]]
    last_error: dict[str, Any] | None
    next_retry_at: datetime | None
    stopped: bool
    stop_error: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        def iso(ts: datetime | None) -> str | None:
            return ts.isoformat() if ts is not None else None

        return {
            "connected": self.connected,
            "feed": self.feed,
            "url": self.url,
            "encoding": self.encoding,
            "source": self.source,
            "connected_since": iso(self.connected_since),
            "last_message_at": {k: v.isoformat() for k, v in self.last_message_at.items()},
            "messages_received": self.messages_received,
            "messages_by_channel": dict(self.messages_by_channel),
            "reconnects": self.reconnects,
            "connections": self.connections,
            "errors_by_code": {str(k): v for k, v in self.errors_by_code.items()},
            "decode_errors": self.decode_errors,
            "handler_errors": self.handler_errors,
            "subscriptions": {k: dict(v) for k, v in self.subscriptions.items()},
            "server_subscriptions": {k: list(v) for k, v in self.server_subscriptions.items()},
            "last_error": self.last_error,
            "next_retry_at": iso(self.next_retry_at),
            "stopped": self.stopped,
            "stop_error": self.stop_error,
        }


Handler = Callable[[StreamMessage], Awaitable[None] | None]
ReconnectHook = Callable[[Outage], Awaitable[None] | None]
BatchHandler = Callable[[list[StreamMessage]], Awaitable[None] | None]


class MessageIterator:
    """An async iterator over the stream's messages (optionally only some channels), buffered up to
    ``maxsize`` messages; when the consumer falls further behind, the oldest are dropped, counted in
    ``dropped`` and in a metric, and logged. Iteration ends when the stream is closed and raises the
    stream's error when it stopped on one (after the buffered messages). Leave with :meth:`close`
    (or use it as an async context manager)."""

    def __init__(self, owner: AlpacaStream, channels: frozenset[str] | None, maxsize: int) -> None:
        self._owner = owner
        self.channels = channels
        self._buf: deque[StreamMessage] = deque()
        self._maxsize = maxsize
        self._wake = asyncio.Event()
        self._done = False
        self._error: BaseException | None = None
        self._overrun = False
        self.dropped = 0

    def _put(self, msg: StreamMessage) -> None:
        if len(self._buf) >= self._maxsize:
            self._buf.popleft()
            self.dropped += 1
            STREAM_CONSUMER_DROPPED.labels(self._owner.source).inc()
            if not self._overrun:
                self._overrun = True
                log.warning("stream_consumer_overrun", source=self._owner.source, maxsize=self._maxsize)
        self._buf.append(msg)
        self._wake.set()

    def _finish(self, error: BaseException | None) -> None:
        self._done = True
        self._error = error
        self._wake.set()

    def pending(self) -> int:
        return len(self._buf)

    def __aiter__(self) -> MessageIterator:
        return self

    async def __anext__(self) -> StreamMessage:
        while not self._buf:
            self._overrun = False
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        return self._buf.popleft()

    def close(self) -> None:
        self._owner._detach(self)
        self._finish(None)

    async def __aenter__(self) -> MessageIterator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class _SessionClock:
    """Whether XNYS is in a regular session now; the calendar is asked again only at session edges."""

    def __init__(self) -> None:
        self._since = datetime.min.replace(tzinfo=UTC)
        self._until: datetime | None = None
        self._open = False

    def stale(self) -> bool:
        return self._until is None or utcnow() >= self._until

    def __call__(self) -> bool:
        return self.is_open(utcnow())

    def is_open(self, now: datetime) -> bool:
        if self._until is None or now >= self._until or now < self._since:
            self._refresh(now)
        return self._open

    def _refresh(self, now: datetime) -> None:
        for s in get_calendar("XNYS").sessions(now - timedelta(days=1), now + timedelta(days=10)):
            if s.open <= now < s.close:
                self._open, self._since, self._until = True, s.open, s.close
                return
            if s.open > now:
                self._open, self._since, self._until = False, now, s.open
                return
        self._open, self._since, self._until = False, now, now + timedelta(hours=1)


@dataclass(slots=True)
class _Outcome:
    """How one connection (or attempt) ended."""

    reason: str
    healthy: bool = False
    fatal: MarketpipeError | None = None
    delay: float | None = None  # overrides the backoff (0: at once; 406: the long wait)


class _Lost(Exception):
    """The connection went away while a subscribe/unsubscribe waited for its reply."""


@dataclass(slots=True)
class _Stats:
    messages: int = 0
    by_channel: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    connections: int = 0
    errors_by_code: dict[int, int] = field(default_factory=dict)
    decode_errors: int = 0
    handler_errors: int = 0
    last_error: dict[str, Any] | None = None


class AlpacaStream:
    """Client of Alpaca's real-time stock stream; see the module docstring.

    Typical use::

        async with AlpacaStream("sip") as stream:
            await stream.subscribe(trades=["AAPL"], bars=["*"])
            async for msg in stream.messages():
                print(msg.channel, msg.record)

    ``stale_limits`` maps channels (``trades``, ``quotes``, ``bars``, ``daily_bars``, ...) to the
    seconds of silence after which the watchdog reconnects (default: ``stale_seconds`` for trades and
    quotes, one bar period more for minute and daily bars; event channels are not watched). Note a
    channel subscribed only for thinly traded symbols may be silent for longer than that.
    """

    def __init__(
        self,
        feed: str = "iex",
        *,
        base_url: str = DEFAULT_STREAM_URL,
        key: str | None = None,
        secret: str | None = None,
        env: Mapping[str, str] | None = None,
        source: str | None = None,
        encoding: Encoding = "msgpack",
        fallback_feed: str | None = "iex",
        stale_seconds: float = 30.0,
        stale_limits: Mapping[str, float] | None = None,
        market_open: Callable[[], bool] | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        healthy_seconds: float = 10.0,
        limit_backoff_seconds: float = 60.0,
        on_reconnect: ReconnectHook | None = None,
        open_timeout: float = 10.0,
        reply_timeout: float = 10.0,
        ping_interval: float | None = 10.0,
        ping_timeout: float | None = 10.0,
        max_frame_bytes: int | None = 32 * 1024 * 1024,
        queue_size: int = 100_000,
    ) -> None:
        if feed not in STREAM_FEEDS:
            raise InvalidArgument(
                f"unknown stream feed {feed!r}; one of {', '.join(STREAM_FEEDS)}", details={"feed": feed}
            )
        if fallback_feed is not None and fallback_feed not in STREAM_FEEDS:
            raise InvalidArgument(f"unknown fallback feed {fallback_feed!r}", details={"feed": fallback_feed})
        if encoding not in ("msgpack", "json"):
            raise InvalidArgument(f"encoding must be 'msgpack' or 'json', got {encoding!r}")
        base = base_url.rstrip("/")
        if not base.startswith(("ws://", "wss://")):
            raise InvalidArgument(f"stream base URL must start with ws:// or wss://, got {base_url!r}")
        if min(stale_seconds, backoff_initial, healthy_seconds, open_timeout, reply_timeout) <= 0:
            raise InvalidArgument("stale_seconds, backoff_initial, healthy_seconds and timeouts must be > 0")
        if backoff_max < backoff_initial or limit_backoff_seconds < 0 or queue_size < 1:
            raise InvalidArgument("need backoff_max >= backoff_initial, limit_backoff_seconds >= 0, queue_size >= 1")
        if key is None or secret is None:
            key, secret = alpaca_credentials(dict(env) if env is not None else None)
        limits = (
            dict(stale_limits)
            if stale_limits is not None
            else {
                "trades": stale_seconds,
                "quotes": stale_seconds,
                "bars": stale_seconds + BAR_PERIOD_SECONDS,
                "daily_bars": stale_seconds + BAR_PERIOD_SECONDS,
            }
        )
        unknown = set(limits) - set(CHANNELS)
        if unknown or any(v <= 0 for v in limits.values()):
            raise InvalidArgument(f"stale_limits: channels from {sorted(CHANNELS)} with limits > 0, got {limits}")
        self.feed = feed
        self.base_url = base
        self.source = source or "alpaca"
        self._auto_source = source is None
        self.encoding: Encoding = encoding
        self.fallback_feed = fallback_feed
        self.stale_limits: dict[str, float] = limits
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.healthy_seconds = healthy_seconds
        self.limit_backoff_seconds = limit_backoff_seconds
        self.on_reconnect = on_reconnect
        self.open_timeout = open_timeout
        self.reply_timeout = reply_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.max_frame_bytes = max_frame_bytes
        self.queue_size = queue_size
        self._key = key
        self._secret = secret
        self._market_open = market_open
        self._clock = _SessionClock()

        self._refs: dict[str, dict[str, int]] = {name: {} for name in CHANNELS}
        self._server_subs: dict[str, list[str]] = {}
        self._sub_changed_at: dict[str, float] = {}
        self._sub_lock = asyncio.Lock()
        self._pending: asyncio.Future[dict[str, Any]] | None = None

        self._consumers: list[MessageIterator] = []
        self._handlers: list[tuple[Handler, frozenset[str] | None]] = []
        self._batch_handlers: list[BatchHandler] = []
        self._hook_tasks: set[asyncio.Task[None]] = set()

        self._task: asyncio.Task[None] | None = None
        self._ws: ClientConnection | None = None
        self._ready = False
        self._ready_evt = asyncio.Event()
        self._done_evt = asyncio.Event()
        self._close_evt = asyncio.Event()
        self._closing = False
        self._stop_error: MarketpipeError | None = None
        self._end_reason: str | None = None
        self._ready_at = 0.0  # loop time
        self._connected_since: datetime | None = None
        self._down_since: datetime | None = None
        self._down_reason = ""
        self._down_last_data: datetime | None = None
        self._next_retry_at: datetime | None = None
        self._last_data: dict[str, float] = {}  # loop time per channel
        self._last_data_wall: dict[str, datetime] = {}
        self._stats = _Stats()
        self._log_at: dict[str, tuple[float, int]] = {}

    # --- public API ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return stream_url(self.base_url, self.feed)

    @property
    def connected(self) -> bool:
        """True while authenticated and subscribed on an open connection."""
        return self._ready

    async def start(self) -> None:
        """Start the connection task on the running loop (returns at once; see :meth:`wait_ready`)."""
        if self._task is not None:
            return
        if self._done_evt.is_set():
            raise InvalidArgument("this stream was closed; create a new AlpacaStream")
        self._task = asyncio.create_task(self._run(), name=f"alpaca-stream-{self.feed}")

    async def wait_ready(self, within: float | None = None) -> None:
        """Wait until connected, authenticated and subscribed. Raises the stream's error if it stopped
        on one, ``ProviderUnavailable`` if it was closed, ``ProviderTimeout`` after ``within`` seconds."""
        if self._task is None:
            await self.start()
        ready = asyncio.ensure_future(self._ready_evt.wait())
        done = asyncio.ensure_future(self._done_evt.wait())
        try:
            await asyncio.wait({ready, done}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            done.cancel()
        if self._ready:
            return
        if self._stop_error is not None:
            raise self._stop_error
        if self._done_evt.is_set():
            raise ProviderUnavailable("stream closed", provider=self.source)
        raise ProviderTimeout(
            f"stream {self.url} not connected within {within} s",
            details={"feed": self.feed, "last_error": self._stats.last_error},
            provider=self.source,
        )

    async def run(self) -> None:
        """Start (if needed) and run until :meth:`close`; raises the error that stopped the stream."""
        await self.start()
        assert self._task is not None
        await asyncio.shield(self._task)
        if self._stop_error is not None:
            raise self._stop_error

    async def close(self) -> None:
        """Close the connection, stop reconnecting, end every message iterator. Idempotent."""
        self._closing = True
        self._close_evt.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=2.0)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        hooks = list(self._hook_tasks)
        for t in hooks:
            t.cancel()
        if hooks:
            await asyncio.gather(*hooks, return_exceptions=True)
        self._finish(None)

    async def reconnect(self, reason: str = "requested") -> bool:
        """Close the current connection; the run loop opens a new one and restores the subscriptions.
        False when there is no open connection (a reconnect is then already under way)."""
        ws = self._ws
        if ws is None:
            return False
        self._end_reason = reason
        log.info("stream_reconnect_requested", url=self.url, reason=reason)
        await ws.close(code=1000, reason=reason[:100])
        return True

    async def __aenter__(self) -> AlpacaStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def subscribe(
        self,
        *,
        trades: Iterable[str] = (),
        quotes: Iterable[str] = (),
        bars: Iterable[str] = (),
        updated_bars: Iterable[str] = (),
        daily_bars: Iterable[str] = (),
        statuses: Iterable[str] = (),
        lulds: Iterable[str] = (),
        imbalances: Iterable[str] = (),
    ) -> None:
        """Add one reference per (channel, symbol); ``"*"`` means every symbol. Only symbols whose
        count goes 0 → 1 are sent. While connected this waits for the server's answer and raises its
        refusal (``NotEntitled`` for 405 symbol limit, ``ProviderBadRequest`` for 400/410), leaving
        the counts as they were; while disconnected the subscription is sent on (re)connect."""
        req = self._request_map(
            trades=trades,
            quotes=quotes,
            bars=bars,
            updated_bars=updated_bars,
            daily_bars=daily_bars,
            statuses=statuses,
            lulds=lulds,
            imbalances=imbalances,
        )
        async with self._sub_lock:
            delta: dict[str, list[str]] = {}
            for name, syms in req.items():
                counts = self._refs[name]
                for s in syms:
                    n = counts.get(s, 0)
                    counts[s] = n + 1
                    if n == 0:
                        delta.setdefault(CHANNELS[name], []).append(s)
            try:
                await self._apply("subscribe", delta)
            except BaseException:  # refused, or the caller was cancelled: nothing stays counted
                self._release_refs(req)
                raise

    async def unsubscribe(
        self,
        *,
        trades: Iterable[str] = (),
        quotes: Iterable[str] = (),
        bars: Iterable[str] = (),
        updated_bars: Iterable[str] = (),
        daily_bars: Iterable[str] = (),
        statuses: Iterable[str] = (),
        lulds: Iterable[str] = (),
        imbalances: Iterable[str] = (),
    ) -> None:
        """Drop one reference per (channel, symbol); the server is told only on 1 → 0. Releasing a
        reference that is not held raises ``InvalidArgument`` and changes nothing."""
        req = self._request_map(
            trades=trades,
            quotes=quotes,
            bars=bars,
            updated_bars=updated_bars,
            daily_bars=daily_bars,
            statuses=statuses,
            lulds=lulds,
            imbalances=imbalances,
        )
        async with self._sub_lock:
            missing = {name: [s for s in syms if s not in self._refs[name]] for name, syms in req.items()}
            missing = {k: v for k, v in missing.items() if v}
            if missing:
                raise InvalidArgument(f"not subscribed: {missing}", details={"not_subscribed": missing})
            delta: dict[str, list[str]] = {}
            for name, syms in req.items():
                counts = self._refs[name]
                for s in syms:
                    counts[s] -= 1
                    if counts[s] == 0:
                        del counts[s]
                        delta.setdefault(CHANNELS[name], []).append(s)
            try:
                await self._apply("unsubscribe", delta)
            except MarketpipeError:
                for name, syms in req.items():
                    for s in syms:
                        self._refs[name][s] = self._refs[name].get(s, 0) + 1
                raise

    def messages(self, channels: Iterable[str] | None = None, *, maxsize: int | None = None) -> MessageIterator:
        """A new iterator over the messages from now on (all channels, or the ones named: ``trades``,
        ``quotes``, ``bars``, ``updated_bars``, ``daily_bars``, ``statuses``, ``lulds``,
        ``imbalances``, ``corrections``, ``cancel_errors``, ``raw``)."""
        chans = self._channel_filter(channels)
        it = MessageIterator(self, chans, maxsize or self.queue_size)
        if self._done_evt.is_set():
            it._finish(self._stop_error)
        else:
            self._consumers.append(it)
        return it

    def add_handler(self, handler: Handler, channels: Iterable[str] | None = None) -> Callable[[], None]:
        """Call ``handler(msg)`` (sync, or awaited when it returns an awaitable) for every message of
        the given channels, in order, on the receive path (a slow handler slows the stream). A
        handler's exception is logged and counted, never stops the stream. Returns a remover."""
        return self._add(self._handlers, (handler, self._channel_filter(channels)))

    def add_batch_handler(self, handler: BatchHandler) -> Callable[[], None]:
        """Call ``handler(msgs)`` once per frame with all its data messages, in order (the fast path
        for a consumer that handles every message itself). Same error handling as handlers."""
        return self._add(self._batch_handlers, handler)

    @staticmethod
    def _add(registry: list[Any], entry: Any) -> Callable[[], None]:
        registry.append(entry)

        def remove() -> None:
            if entry in registry:
                registry.remove(entry)

        return remove

    def health(self) -> StreamHealth:
        st = self._stats
        stop = self._stop_error
        return StreamHealth(
            connected=self._ready,
            feed=self.feed,
            url=self.url,
            encoding=self.encoding,
            source=self.source,
            connected_since=self._connected_since if self._ready else None,
            last_message_at=dict(self._last_data_wall),
            messages_received=st.messages,
            messages_by_channel=dict(st.by_channel),
            reconnects=st.reconnects,
            connections=st.connections,
            errors_by_code=dict(st.errors_by_code),
            decode_errors=st.decode_errors,
            handler_errors=st.handler_errors,
            subscriptions={k: dict(v) for k, v in self._refs.items() if v},
            server_subscriptions={k: list(v) for k, v in self._server_subs.items()},
            last_error=dict(st.last_error) if st.last_error is not None else None,
            next_retry_at=self._next_retry_at,
            stopped=self._done_evt.is_set(),
            stop_error=stop.to_dict() if stop is not None else None,
        )

    def __repr__(self) -> str:
        return f"AlpacaStream(url={self.url!r}, source={self.source!r}, connected={self._ready})"

    # --- subscriptions ------------------------------------------------------------------------------
    @staticmethod
    def _request_map(**channels: Iterable[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, syms in channels.items():
            if isinstance(syms, str):
                syms = [syms]
            norm = list(dict.fromkeys("*" if s == "*" else normalize_symbol(s) for s in syms))
            if norm:
                out[name] = norm
        return out

    def _release_refs(self, req: dict[str, list[str]]) -> None:
        for name, syms in req.items():
            counts = self._refs[name]
            for s in syms:
                counts[s] -= 1
                if counts[s] <= 0:
                    del counts[s]

    def _desired_wire(self) -> dict[str, list[str]]:
        return {CHANNELS[name]: list(counts) for name, counts in self._refs.items() if counts}

    def _channel_filter(self, channels: Iterable[str] | None) -> frozenset[str] | None:
        if channels is None:
            return None
        chans = frozenset([channels] if isinstance(channels, str) else channels)
        bad = chans - MESSAGE_CHANNEL_NAMES
        if bad:
            raise InvalidArgument(f"unknown channels {sorted(bad)}; known: {sorted(MESSAGE_CHANNEL_NAMES)}")
        return chans

    async def _apply(self, action: str, delta: dict[str, list[str]]) -> None:
        """Send a subscribe/unsubscribe on the live connection and wait for the answer (caller holds
        ``_sub_lock``). Without a live connection the change waits for the next (re)connect."""
        ws = self._ws
        if not delta or not self._ready or ws is None:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending = fut
        try:
            await self._send(ws, {"action": action, **delta})
            await asyncio.wait_for(asyncio.shield(fut), self.reply_timeout)
        except (_Lost, ConnectionClosed):
            log.info("stream_subscription_deferred", action=action, reason="connection lost")
        except TimeoutError:
            log.warning("stream_subscription_no_reply", action=action, timeout=self.reply_timeout)
            self._end_reason = "reply_timeout"
            await ws.close()
        finally:
            self._pending = None

    # --- the connection loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        try:
            while not self._closing:
                outcome = await self._session()
                if outcome.fatal is not None:
                    self._finish(outcome.fatal)
                    return
                if self._closing:
                    break
                if outcome.healthy:
                    failures = 0
                if outcome.delay is not None:
                    delay = outcome.delay
                else:
                    cap = min(self.backoff_max, self.backoff_initial * 2.0**failures)
                    delay = random.uniform(cap / 2, cap)
                    failures += 1
                self._stats.reconnects += 1
                STREAM_RECONNECTS.labels(self.source, outcome.reason).inc()
                log.info("stream_reconnect_scheduled", url=self.url, reason=outcome.reason, delay_s=round(delay, 3))
                self._next_retry_at = utcnow() + timedelta(seconds=delay)
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._close_evt.wait(), delay)
                self._next_retry_at = None
        finally:
            self._set_ready(False)
            if self._closing:
                self._finish(None)

    def _finish(self, error: MarketpipeError | None) -> None:
        if self._done_evt.is_set():
            return
        if error is not None:
            self._stop_error = error
            log.error("stream_stopped", url=self.url, code=error.code, error=error.message)
        self._closing = True
        self._close_evt.set()
        self._done_evt.set()
        for it in self._consumers:
            it._finish(error)
        self._consumers.clear()

    def _detach(self, it: MessageIterator) -> None:
        if it in self._consumers:
            self._consumers.remove(it)

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        STREAM_CONNECTED.labels(self.source, self.feed).set(1 if ready else 0)
        if ready:
            self._ready_evt.set()
        else:
            self._ready_evt.clear()

    async def _session(self) -> _Outcome:
        self._end_reason = None
        headers = {"Content-Type": MSGPACK_CONTENT_TYPE} if self.encoding == "msgpack" else None
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                open_timeout=self.open_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                close_timeout=2.0,
                max_size=self.max_frame_bytes,
            )
        except InvalidURI as exc:
            return _Outcome("invalid_url", fatal=InvalidArgument(f"invalid stream URL {self.url!r}: {exc}"))
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._note_error(None, f"connect failed: {exc!r}")
            log.warning("stream_connect_failed", url=self.url, error=repr(exc))
            return _Outcome("connect_failed")
        self._ws = ws
        if self._auto_source and ws.response is not None:
            self.source = sim_source(ws.response.headers, "alpaca")  # sim:alpaca from the simulator
        watchdog: asyncio.Task[None] | None = None
        try:
            outcome = await self._handshake(ws)
            if outcome is not None:
                return outcome
            watchdog = asyncio.create_task(self._watchdog(ws), name=f"alpaca-stream-watchdog-{self.feed}")
            return await self._receive(ws)
        finally:
            was_ready = self._ready
            self._set_ready(False)
            self._ws = None
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            pending = self._pending
            if pending is not None and not pending.done():
                pending.set_exception(_Lost())
            self._server_subs = {}
            await ws.close()
            if was_ready and not self._closing:
                self._down_since = utcnow()
                self._down_reason = self._end_reason or "dropped"
                self._down_last_data = max(self._last_data_wall.values(), default=None)

    async def _handshake(self, ws: ClientConnection) -> _Outcome | None:
        """Welcome, auth, restore the subscriptions; None when ready, else how the attempt ended."""
        try:
            msg = await self._next_control(ws)
            if msg.get("T") == "error":
                return self._on_error(msg, during_handshake=True) or _Outcome("handshake_error")
            if msg.get("T") != "success" or msg.get("msg") != "connected":
                log.warning("stream_unexpected_welcome", url=self.url, message=_short(msg))
            await self._send(ws, {"action": "auth", "key": self._key, "secret": self._secret})
            while True:
                msg = await self._next_control(ws)
                if msg.get("T") == "success" and msg.get("msg") == "authenticated":
                    break
                if msg.get("T") == "error":
                    if msg.get("code") == 403:  # already authenticated (header auth): we are in
                        self._on_error(msg, during_handshake=True)
                        break
                    return self._on_error(msg, during_handshake=True) or _Outcome("auth_error")
                log.warning("stream_unexpected_control", url=self.url, message=_short(msg))
            async with self._sub_lock:
                wire = self._desired_wire()
                if wire:
                    await self._send(ws, {"action": "subscribe", **wire})
                    while True:
                        msg = await self._next_control(ws)
                        if msg.get("T") == "subscription":
                            self._on_subscription(msg)
                            break
                        if msg.get("T") == "error":
                            outcome = self._on_error(msg, during_handshake=False)
                            if outcome is not None:
                                return outcome
                            # refused (e.g. 405 after a plan change): stay connected, the caller sees it in health()
                            log.error("stream_restore_refused", url=self.url, code=msg.get("code"))
                            break
                self._mark_ready()
        except TimeoutError:
            self._note_error(None, "no answer during the handshake")
            log.warning("stream_handshake_timeout", url=self.url, timeout=self.reply_timeout)
            return _Outcome("handshake_timeout")
        except ConnectionClosed as exc:
            log.warning("stream_closed_during_handshake", url=self.url, error=repr(exc))
            return _Outcome("closed_during_handshake")
        return None

    def _mark_ready(self) -> None:
        loop = asyncio.get_running_loop()
        now = utcnow()
        self._ready_at = loop.time()
        self._connected_since = now
        self._stats.connections += 1
        self._set_ready(True)
        log.info("stream_ready", url=self.url, subscriptions=self._server_subs)
        if self._down_since is not None:
            outage = Outage(
                disconnected_at=self._down_since,
                reconnected_at=now,
                last_data_at=self._down_last_data,
                reason=self._down_reason,
                feed=self.feed,
            )
            self._down_since = None
            hook = self.on_reconnect
            if hook is not None:
                task = asyncio.create_task(self._call_hook(hook, outage), name="alpaca-stream-on-reconnect")
                self._hook_tasks.add(task)
                task.add_done_callback(self._hook_tasks.discard)

    async def _call_hook(self, hook: ReconnectHook, outage: Outage) -> None:
        try:
            result = hook(outage)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - the owner's hook must not break the stream
            self._stats.handler_errors += 1
            log.error("stream_on_reconnect_failed", error=repr(exc))

    async def _next_control(self, ws: ClientConnection) -> dict[str, Any]:
        """The next control message during the handshake (data frames in between are delivered)."""
        deadline = asyncio.get_running_loop().time() + self.reply_timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError
            raw = await asyncio.wait_for(ws.recv(), remaining)
            controls = await self._on_frame(raw)
            if controls:
                return controls[0]

    async def _receive(self, ws: ClientConnection) -> _Outcome:
        try:
            async for raw in ws:
                for msg in await self._on_frame(raw):
                    outcome = self._on_control(msg)
                    if outcome is not None:
                        self._end_reason = outcome.reason
                        await ws.close()
                        return outcome
        except ConnectionClosed as exc:
            self._note_error(None, f"connection lost: {exc!r}")
            log.warning("stream_connection_lost", url=self.url, error=repr(exc))
            return _Outcome(self._end_reason or "dropped", healthy=self._was_healthy())
        reason = self._end_reason or ("closed" if self._closing else "closed_by_server")
        return _Outcome(reason, healthy=self._was_healthy())

    def _was_healthy(self) -> bool:
        return asyncio.get_running_loop().time() - self._ready_at >= self.healthy_seconds

    # --- control messages -----------------------------------------------------------------------------
    def _on_control(self, msg: dict[str, Any]) -> _Outcome | None:
        kind = msg.get("T")
        if kind == "subscription":
            self._on_subscription(msg)
            if self._pending is not None and not self._pending.done():
                self._pending.set_result(msg)
            return None
        if kind == "error":
            outcome = self._on_error(msg, during_handshake=False)
            if outcome is not None and self._pending is not None and not self._pending.done():
                self._pending.set_exception(_Lost())
            return outcome
        log.info("stream_control", message=_short(msg))
        return None

    def _on_subscription(self, msg: dict[str, Any]) -> None:
        now = asyncio.get_running_loop().time()
        subs = Subscription.parse(msg)
        for name, syms in subs.items():
            if syms != self._server_subs.get(name, []):
                self._sub_changed_at[name] = now  # a newly subscribed channel gets a full stale period
        self._server_subs = subs

    def _note_error(self, code: int | None, message: str) -> None:
        self._stats.last_error = {"code": code, "message": message, "at": utcnow().isoformat()}

    def _on_error(self, msg: dict[str, Any], *, during_handshake: bool) -> _Outcome | None:
        """Every §2.6 code on purpose. Returns how the connection ends, or None when it stays."""
        raw_code = msg.get("code")
        code = raw_code if isinstance(raw_code, int) else -1
        text = str(msg.get("msg", ""))
        self._stats.errors_by_code[code] = self._stats.errors_by_code.get(code, 0) + 1
        STREAM_ERRORS.labels(self.source, str(code)).inc()
        self._note_error(code, text)
        details = {"vendor_code": code, "vendor_message": text, "feed": self.feed}
        if code == 402:
            return _Outcome(
                "auth_failed",
                fatal=AuthFailed(f"Alpaca stream: auth failed ({text})", details=details, provider=self.source),
            )
        if code in (408, 411):
            return _Outcome(
                f"error_{code}",
                fatal=NotEntitled(f"Alpaca stream: {text} ({code})", details=details, provider=self.source),
            )
        if code == 409:
            fallback = self.fallback_feed
            if fallback is not None and fallback != self.feed:
                log.warning("stream_feed_fallback", from_feed=self.feed, to_feed=fallback, reason=text)
                STREAM_FEED_FALLBACKS.labels(self.source, self.feed, fallback).inc()
                self._set_ready(False)
                self.feed = fallback
                return _Outcome("feed_fallback", delay=0.0)
            return _Outcome(
                "insufficient_subscription",
                fatal=NotEntitled(
                    f"Alpaca stream: insufficient subscription for feed {self.feed!r} and no fallback feed",
                    details=details,
                    provider=self.source,
                ),
            )
        if code == 406:
            log.error(
                "stream_connection_limit",
                url=self.url,
                message="another session holds this key's connection to this endpoint; share one AlpacaStream",
                retry_in_s=self.limit_backoff_seconds,
            )
            return _Outcome("connection_limit", delay=self.limit_backoff_seconds)
        if code in (401, 404, 407, 500):
            log.warning("stream_error_reconnect", url=self.url, code=code, message=text)
            return _Outcome(f"error_{code}")
        if code == 403:
            log.info("stream_already_authenticated", url=self.url)
            return None
        pending = self._pending
        if pending is not None and not pending.done():  # the answer to a subscribe/unsubscribe
            pending.set_exception(_subscribe_error(code, text, details, self.source))
            return None
        if during_handshake:
            log.warning("stream_error_reconnect", url=self.url, code=code, message=text)
            return _Outcome(f"error_{code}")
        log.error("stream_error", url=self.url, code=code, message=text)
        return None

    # --- data -----------------------------------------------------------------------------------------
    async def _on_frame(self, raw: str | bytes) -> list[dict[str, Any]]:
        """Decode one frame, deliver its data messages, return its control messages."""
        fetched = utcnow()
        if type(raw) is bytes:  # msgpack: a frame of trades, quotes and bars goes straight to records
            fast = decode_data_frame(raw, self.source, self.feed, fetched, StreamMessage)
            if fast:
                await self._deliver(fast, fetched)
                return []
        try:
            decoded = decode_frame(raw)
        except FRAME_ERRORS as exc:
            self._decode_error("frame is not valid msgpack/JSON", raw, exc)
            return []
        if isinstance(decoded, dict):
            decoded = [decoded]
        if not isinstance(decoded, list):
            self._decode_error("frame is not an array of messages", raw, None)
            return []
        controls: list[dict[str, Any]] = []
        out: list[StreamMessage] = []
        feed, source = self.feed, self.source
        for item in decoded:
            if not isinstance(item, dict):
                self._decode_error("message is not an object", raw, None)
                continue
            kind = item.get("T")
            if kind in CONTROL_TYPES:
                controls.append(item)
                continue
            out.append(self._to_message(item, kind, source, feed, fetched, raw))
        if out:
            await self._deliver(out, fetched)
        return controls

    def _to_message(
        self, item: dict[str, Any], kind: Any, source: str, feed: str, fetched: datetime, raw: str | bytes
    ) -> StreamMessage:
        channel = MESSAGE_CHANNELS.get(kind) if isinstance(kind, str) else None
        if channel is None:
            return StreamMessage(RAW, raw_record(item, source, feed, fetched, None))
        try:
            return StreamMessage(channel, DECODERS[kind](item, source, feed, fetched))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self._decode_error(f"{channel} message cannot be decoded", raw, exc)
            return StreamMessage(RAW, raw_record(item, source, feed, fetched, f"{type(exc).__name__}: {exc}"))

    async def _deliver(self, msgs: list[StreamMessage], fetched: datetime) -> None:
        now = asyncio.get_running_loop().time()
        counts: dict[str, int] = {}
        for m in msgs:
            counts[m.channel] = counts.get(m.channel, 0) + 1
        st = self._stats
        st.messages += len(msgs)
        for ch, n in counts.items():
            st.by_channel[ch] = st.by_channel.get(ch, 0) + n
            STREAM_MESSAGES.labels(self.source, self.feed, ch).inc(n)
            self._last_data[ch] = now
            self._last_data_wall[ch] = fetched
        for it in self._consumers:
            chans = it.channels
            for m in msgs:
                if chans is None or m.channel in chans:
                    it._put(m)
        for batch_handler in list(self._batch_handlers):
            await self._call_handler(batch_handler, msgs)
        if self._handlers:
            for m in msgs:
                for handler, chans in list(self._handlers):
                    if chans is None or m.channel in chans:
                        await self._call_handler(handler, m)

    async def _call_handler(self, handler: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = handler(arg)
            if result is not None and inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - a consumer's bug must not break the stream
            self._stats.handler_errors += 1
            self._log_throttled("stream_handler_failed", error=repr(exc))

    def _decode_error(self, what: str, raw: str | bytes, exc: BaseException | None) -> None:
        self._stats.decode_errors += 1
        STREAM_DECODE_ERRORS.labels(self.source).inc()
        self._log_throttled("stream_malformed", what=what, error=repr(exc) if exc else None, sample=repr(raw[:80]))

    def _log_throttled(self, event: str, **kw: Any) -> None:
        """At most one line per event kind every few seconds, with the count of the ones held back."""
        now = time.monotonic()
        last, held = self._log_at.get(event, (0.0, 0))
        if now - last >= _LOG_EVERY_S:
            log.warning(event, url=self.url, suppressed=held, **kw)
            self._log_at[event] = (now, 0)
        else:
            self._log_at[event] = (last, held + 1)

    # --- watchdog -------------------------------------------------------------------------------------
    async def _watchdog(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        period = max(0.05, min(1.0, min(self.stale_limits.values(), default=1.0) / 4))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            stale = [
                ch
                for ch, limit in self.stale_limits.items()
                if self._server_subs.get(ch)
                and now - max(self._last_data.get(ch, 0.0), self._ready_at, self._sub_changed_at.get(ch, 0.0)) > limit
            ]
            if not stale or not await self._is_market_open():
                continue
            log.warning("stream_stale", url=self.url, channels=stale, limits={c: self.stale_limits[c] for c in stale})
            self._note_error(None, f"no data on {', '.join(stale)}")
            self._end_reason = "stale"
            await ws.close(reason="stale data")
            return

    async def _is_market_open(self) -> bool:
        if self._market_open is not None:
            return bool(self._market_open())
        if self._clock.stale():
            # the calendar is asked at session edges only; its first load (pandas) is slow: off the loop
            return await asyncio.to_thread(self._clock)
        return self._clock()

    # --- wire -----------------------------------------------------------------------------------------
    async def _send(self, ws: ClientConnection, obj: dict[str, Any]) -> None:
        if self.encoding == "msgpack":
            await ws.send(encode(obj, binary=True))
        else:
            await ws.send(encode(obj, binary=False).decode())


def _subscribe_error(code: int, text: str, details: dict[str, Any], source: str) -> MarketpipeError:
    if code == 405:
        return NotEntitled(f"Alpaca stream: symbol limit exceeded ({text})", details=details, provider=source)
    if code in (400, 410):
        return ProviderBadRequest(
            f"Alpaca stream refused the subscription: {text} ({code})", details=details, provider=source
        )
    return ProviderError(f"Alpaca stream error {code}: {text}", details=details, provider=source)


def _short(msg: dict[str, Any]) -> str:
    text = repr(msg)
    return text if len(text) <= 200 else text[:200] + "…"
