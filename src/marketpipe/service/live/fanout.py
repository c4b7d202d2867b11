"""Fan-out: the hub's clients, who is routed to what, and each client's bounded queue.

Two kinds of route: ``prices`` (the unified price update of ``/v1/stream``, SSE and the dashboard)
and the upstream channel names (``trades``, ``quotes``, ``bars``, … for the Alpaca-compatible
stream), per symbol or ``*``. What is published becomes an :class:`Item` put on every interested
client's queue; an item is encoded at most once per wire format, however many clients receive it.

Slow clients: each client's queue holds ``limit`` items. When it is ``warn_fraction`` full the
client is told (a ``slow_consumer`` warning); when it is full the client is dropped with an error.
Nothing here ever waits for a client, so one slow client never stalls the others.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import orjson

from marketpipe.core.errors import SlowConsumer
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import FANOUT_CLIENTS, FANOUT_DROPPED_CLIENTS
from marketpipe.core.schema import StreamRecord

log = get_logger("marketpipe.service.live")

PRICES = "prices"
V1_JSON = "v1"  # the wire format of /v1/stream and SSE (Item.encoded's key)
WILDCARD = "*"
ALPACA_PROTOCOL = "alpaca"  # clients of the Alpaca-compatible stream: no unified-stream status notices
ROUTED_WITH = {"corrections": "trades", "cancel_errors": "trades"}  # as Alpaca sends them

Route = tuple[str, str]  # (hub channel, symbol or "*")


class Item:
    """One message on its way to clients: a channel (``prices`` or an upstream channel), a symbol and
    the record (a canonical stream record — Trade/Quote/Bar or a tagged event — or, on ``prices``, the
    unified price dict). Encodings
    are cached per wire format, so a message is encoded once however many clients receive it."""

    __slots__ = ("_enc", "arrived", "channel", "record", "solo", "symbol")

    def __init__(
        self,
        channel: str,
        symbol: str,
        record: StreamRecord | dict[str, Any],
        arrived: float = 0.0,
        solo: bool = False,
    ) -> None:
        self.channel = channel
        self.symbol = symbol
        self.record = record
        self.arrived = arrived  # epoch seconds the upstream frame arrived (0: not from upstream)
        self.solo = solo  # put on one client's queue only: nothing to share, so nothing to cache
        self._enc: dict[str, Any] | None = None  # made on the first encoding (most items have one or none)

    def encoded(self, fmt: str, encode: Callable[[Item], Any]) -> Any:
        enc = self._enc
        if enc is None:
            enc = self._enc = {}
        elif fmt in enc:
            return enc[fmt]
        value = enc[fmt] = encode(self)
        return value


def unified_json(item: Item) -> bytes:
    return orjson.dumps(item.record)


# /v1/stream's message type for each data channel
V1_TYPES = {
    "trades": "trade",
    "quotes": "quote",
    "bars": "bar",
    "updated_bars": "updated_bar",
    "daily_bars": "daily_bar",
    "orderbooks": "orderbook",
}


def v1_json(item: Item) -> bytes:
    """An item as ``/v1/stream`` sends it: a ``price`` update as built, a stream record as its fields
    with ``type`` (``trade``, ``quote``, ``bar``, ``updated_bar``, ``daily_bar``, ``orderbook``),
    ``timestamp`` (and ``timestamp_ns``, the vendor's exact instant) and sizes as the vendor sent them
    (fractions of a coin stay exact). Order-book levels are ``[price, size]`` pairs; ``reset: true``
    means the levels are the whole book."""
    if item.channel == PRICES:
        return orjson.dumps(item.record)
    doc = msgspec.to_builtins(item.record)
    ts_ns = doc.pop("ts_ns", None)
    out = {"type": V1_TYPES.get(item.channel, item.channel), "symbol": item.symbol}
    out.update((k, v) for k, v in doc.items() if k not in ("type", "ts", "symbol"))
    out["timestamp"] = doc.get("ts")
    if ts_ns is not None:
        out["timestamp_ns"] = ts_ns
    return orjson.dumps(out)


def share_v1(items: list[Item]) -> None:
    """Give the shared price updates among ``items`` that have no ``/v1`` encoding yet theirs, from one
    encoding of them all: the array is cut at its ``},{"`` boundaries, which JSON cannot hold inside a
    string (a quote in one is escaped) and flat objects hold nowhere else; when the pieces do not match
    the updates one to one (an empty or nested object), they are left to be encoded one by one."""
    todo = [it for it in items if it.channel == PRICES and not it.solo and (it._enc is None or V1_JSON not in it._enc)]
    if len(todo) < 2:
        return
    records = [it.record for it in todo]
    if not all(type(r) is dict and r for r in records):
        return
    pieces = orjson.dumps(records)[3:-2].split(b'},{"')  # after '[{"', before '}]'
    if len(pieces) != len(todo):
        return
    for it, piece in zip(todo, pieces, strict=True):
        if it._enc is None:
            it._enc = {}
        it._enc[V1_JSON] = b'{"%s}' % piece


def v1_frame(notices: list[dict[str, Any]], items: list[Item]) -> bytes:
    """A ``/v1/stream`` frame: the notices, then the items, as one JSON array. The unified price updates
    that went to this client alone are encoded together, in one call per run of them (most of a busy
    frame, and the same bytes as one call each); the others once per message, shared by every client
    that receives them (:meth:`Item.encoded`)."""
    share_v1(items)
    parts: list[bytes | memoryview] = []
    run: list[Any] = list(notices)
    for it in items:
        if it.solo and it.channel == PRICES:
            run.append(it.record)
            continue
        if run:
            parts.append(memoryview(orjson.dumps(run))[1:-1])
            run = []
        parts.append(it.encoded(V1_JSON, v1_json))
    if run:
        if not parts:
            return orjson.dumps(run)
        parts.append(memoryview(orjson.dumps(run))[1:-1])
    return b"[" + b",".join(parts) + b"]"


def observe_delivery(histogram: Any, items: list[Item]) -> None:
    """After a client frame is written: how long its oldest upstream message spent in the gateway."""
    if items and items[0].arrived:
        histogram.observe(max(0.0, time.time() - items[0].arrived))


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


class Fanout:
    """The clients and the routing table ``(channel, symbol) -> clients``. Synchronous: what goes
    upstream for a route is the hub's business."""

    def __init__(self, queue_size: int, warn_fraction: float) -> None:
        self.queue_size = queue_size
        self.warn_fraction = warn_fraction
        self.clients: set[FanoutClient] = set()
        self.routes: dict[Route, set[FanoutClient]] = {}

    def attach(self, protocol: str, name: str = "", queue_size: int | None = None) -> FanoutClient:
        client = FanoutClient(protocol, name or uuid.uuid4().hex[:8], queue_size or self.queue_size, self.warn_fraction)
        self.clients.add(client)
        FANOUT_CLIENTS.labels(protocol).inc()
        return client

    def detach(self, client: FanoutClient) -> list[tuple[str, list[str]]] | None:
        """Close and forget ``client`` and its routes; returns what it was routed to (None: unknown)."""
        if client not in self.clients:
            return None
        self.clients.discard(client)
        client.close()
        FANOUT_CLIENTS.labels(client.protocol).dec()
        return [(ch, self.unroute(client, ch, list(syms))) for ch, syms in client.subscriptions.items()]

    def route(self, client: FanoutClient, channel: str, symbol: str) -> None:
        client.subscriptions.setdefault(channel, set()).add(symbol)
        self.routes.setdefault((channel, symbol), set()).add(client)

    def unroute(self, client: FanoutClient, channel: str, symbols: Iterable[str]) -> list[str]:
        """Take ``symbols`` off ``client``; returns the ones it had."""
        have = client.subscriptions.get(channel, set())
        gone = []
        for s in symbols:
            if s not in have:
                continue
            have.discard(s)
            gone.append(s)
            route = self.routes.get((channel, s))
            if route is not None:
                route.discard(client)
                if not route:
                    del self.routes[(channel, s)]
        return gone

    def symbols(self, channel: str = PRICES) -> list[str]:
        return sorted(s for (ch, s) in self.routes if ch == channel)

    def deliver(self, channel: str, symbol: str, record: StreamRecord, arrived: float) -> None:
        """An upstream message to the clients of its channel and symbol, and of its channel's ``*``
        (a client on both hears it once). Corrections and cancel errors go with trades."""
        routes = self.routes
        route = ROUTED_WITH.get(channel, channel)
        targets = routes.get((route, symbol))
        wild = routes.get((route, WILDCARD))
        if not targets and not wild:
            return
        item = Item(channel, symbol, record, arrived)
        if targets:
            for c in targets:
                c.put(item)
        if wild:
            for c in wild:
                if not targets or c not in targets:
                    c.put(item)

    def publish(self, symbol: str, doc: dict[str, Any], arrived: float = 0.0) -> None:
        """A unified price update to the symbol's ``prices`` clients."""
        targets = self.routes.get((PRICES, symbol))
        if targets:
            item = Item(PRICES, symbol, doc, arrived, len(targets) == 1)
            for c in targets:
                c.put(item)

    def tell_subscribers(self, symbol: str, notice: dict[str, Any]) -> None:
        for c in self.routes.get((PRICES, symbol), ()):
            c.notice(notice)

    def tell_unified(self, notice: dict[str, Any], concerns: Callable[[FanoutClient], bool] | None = None) -> None:
        """A notice for every client of the unified stream (status changes) that it ``concerns``."""
        for c in self.clients:
            if (PRICES in c.subscriptions or c.protocol != ALPACA_PROTOCOL) and (concerns is None or concerns(c)):
                c.notice(notice)

    def close_all(self) -> None:
        for c in list(self.clients):
            c.close()

    def snapshot(self) -> dict[str, Any]:
        return {"clients": len(self.clients), "by_protocol": dict(Counter(c.protocol for c in self.clients))}
