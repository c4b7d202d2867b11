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
(``marketpipe_stream_reconnects_total{provider="alpaca_crypto"}``); clients keep their subscriptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from marketpipe.core.config import Config, alpaca_credentials
from marketpipe.core.errors import MarketpipeError, MissingCredentials, OrderbookNotReset
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import STREAM_ERRORS, STREAM_MESSAGES, STREAM_RECONNECTS
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_crypto_stream import CryptoStreamConnection, crypto_stream_url
from marketpipe.wire.alpaca_crypto import CHANNEL_OF_TYPE, CHANNELS, LocalBook

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

    async def _upstream(self, loc: str) -> _Upstream:
        up = self._up.get(loc)
        if up is None or (up.task is not None and up.task.done()):
            up = self._up[loc] = _Upstream(loc, self._connect(loc))
            await up.conn.connect()  # a failure (auth, connection) reaches the subscriber as a typed error
            up.task = asyncio.create_task(self._pump(up))
        return up

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
                async for frame in up.conn.frames():
                    attempt = 0
                    self._relay(up, frame)
            except MarketpipeError as exc:
                up.error = exc
                STREAM_RECONNECTS.labels(PROVIDER, exc.code).inc()
                log.warning("crypto_stream_reconnecting", location=up.loc, code=exc.code, error=exc.message)
            await up.conn.aclose()
            connected = False
            up.books.clear()
            if not up.refs:
                return  # nobody listens: the next subscriber connects afresh
            await asyncio.sleep(random.uniform(0, min(self.max_backoff_s, self.base_backoff_s * 2**attempt)))
            attempt += 1

    def _relay(self, up: _Upstream, frame: list[dict[str, Any]]) -> None:
        data = [m for m in frame if m.get("T") in CHANNEL_OF_TYPE]
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
