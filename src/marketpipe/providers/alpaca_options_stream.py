"""Alpaca's options stream (``wss://stream.data.alpaca.markets/v1beta1/{indicative|opra}``), as a client.

MessagePack only (the upgrade says ``Content-Type: application/msgpack``; the vendor answers JSON
clients with 412), channels ``trades`` and ``quotes`` only, no ``*`` for quotes (413, refused here before
asking). One connection; :meth:`OptionsUpstream.subscribe` / :meth:`unsubscribe` send the changes, and the
connection is re-opened (with jittered backoff, reset once a connection has stayed up ``HEALTHY_SECONDS``)
and re-subscribed when it drops. Each data message becomes a
canonical option tick (:func:`tick_of`: a dict naming its ``source`` and ``feed``) handed to ``on_tick``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from marketpipe.core.errors import (
    AuthFailed,
    InvalidArgument,
    MarketpipeError,
    NotEntitled,
    StreamUnavailable,
)
from marketpipe.core.log import get_logger
from marketpipe.providers.base import sim_source
from marketpipe.wire.alpaca_options import FEEDS, STAR_QUOTES_REFUSED, STREAM_CHANNELS, stream_path
from marketpipe.wire.alpaca_stream import MSGPACK_CONTENT_TYPE, ws_scheme

log = get_logger("marketpipe.providers.alpaca_options_stream")
CONNECT_SECONDS = 10.0
HEALTHY_SECONDS = 10.0  # a connection up this long resets the reconnect backoff (the stock stream's rule)


def tick_of(msg: dict[str, Any], source: str, feed: str, received: datetime) -> dict[str, Any] | None:
    """A vendor ``t``/``q`` message as marketpipe's option tick; None for anything else."""
    kind = msg.get("T")
    ts = msg.get("t")
    if isinstance(ts, datetime):
        ts = ts.astimezone(UTC)
    base = {"contract": msg.get("S"), "ts": ts, "source": source, "feed": feed, "received_at": received}
    if kind == "q":
        return {
            "type": "quote",
            **base,
            "bid_price": msg.get("bp"),
            "bid_size": msg.get("bs"),
            "bid_exchange": msg.get("bx"),
            "ask_price": msg.get("ap"),
            "ask_size": msg.get("as"),
            "ask_exchange": msg.get("ax"),
            "condition": msg.get("c"),
        }
    if kind == "t":
        return {
            "type": "trade",
            **base,
            "price": msg.get("p"),
            "size": msg.get("s"),
            "exchange": msg.get("x"),
            "condition": msg.get("c"),
        }
    return None


def _refusal(msg: dict[str, Any], feed: str) -> MarketpipeError:
    code = msg.get("code")
    text = str(msg.get("msg", ""))
    details = {"vendor_code": code, "vendor_message": text, "feed": feed}
    if code == 402:
        return AuthFailed(f"alpaca options stream: {text}", provider="alpaca", details=details)
    if code == 409:
        return NotEntitled(f"alpaca options stream {feed}: {text}", provider="alpaca", details=details)
    if code in (400, 412, 413):
        return InvalidArgument(f"alpaca options stream: {text}", details=details)
    return StreamUnavailable(f"alpaca options stream: {code} {text}", provider="alpaca", details=details)


class OptionsUpstream:
    """One options stream connection for ``feed``; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        feed: str,
        key: str,
        secret: str,
        on_tick: Callable[[dict[str, Any]], None],
    ) -> None:
        if feed not in FEEDS:
            raise InvalidArgument(
                f"options stream feed must be one of {', '.join(FEEDS)}", details={"parameter": "feed"}
            )
        self.url = ws_scheme(base_url).rstrip("/") + stream_path(feed)
        self.feed = feed
        self._key, self._secret = key, secret
        self.on_tick = on_tick
        self.source = "alpaca"
        self.subs: dict[str, set[str]] = {c: set() for c in STREAM_CHANNELS}
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.failure: MarketpipeError | None = None  # the refusal that ended the connection, if any
        self.connects = 0
        self.losses = 0  # connections lost or re-opens failed (what the live hub's router counts)
        self.connected_since: datetime | None = None
        self.last_message_at: datetime | None = None  # the last data message (trade or quote)

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def stopped(self) -> bool:
        """Ended for good: the vendor refused the keys or the feed (no more re-opens)."""
        return self._task is not None and self._task.done()

    async def start(self) -> None:
        """Connect and authenticate (errors raised here: bad keys, no entitlement, no server)."""
        await self._open()
        self._task = asyncio.create_task(self._run())

    async def _open(self) -> None:
        try:
            ws = await asyncio.wait_for(
                connect(self.url, additional_headers={"Content-Type": MSGPACK_CONTENT_TYPE}, max_size=2**24),
                CONNECT_SECONDS,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise StreamUnavailable(
                f"alpaca options stream: cannot connect to {self.url} ({type(exc).__name__})", provider="alpaca"
            ) from exc
        try:
            first = self._frame(await ws.recv())
            if not first or first[0].get("T") != "success":
                raise _refusal(first[0] if first else {}, self.feed)
            await ws.send(msgpack.packb({"action": "auth", "key": self._key, "secret": self._secret}))
            reply = self._frame(await ws.recv())
            if not reply or reply[0].get("T") != "success":
                raise _refusal(reply[0] if reply else {}, self.feed)
            wanted = {c: sorted(s) for c, s in self.subs.items() if s}
            if wanted:
                await ws.send(msgpack.packb({"action": "subscribe", **wanted}))
        except ConnectionClosed as exc:  # dropped during the handshake: an attempt that failed, tried again
            await ws.close()
            raise StreamUnavailable(
                f"alpaca options stream: {self.url} closed the connection before it was ready", provider="alpaca"
            ) from exc
        except BaseException:
            await ws.close()
            raise
        if ws.response is not None:
            self.source = sim_source(ws.response.headers, "alpaca")  # sim:alpaca from the simulator
        self._ws = ws
        self.connects += 1
        self.connected_since = datetime.now(UTC)
        self._ready.set()

    @staticmethod
    def _frame(raw: Any) -> list[dict[str, Any]]:
        if isinstance(raw, str):
            import orjson

            out = orjson.loads(raw)
        else:
            out = msgpack.unpackb(raw, timestamp=3, strict_map_key=False)
        return out if isinstance(out, list) else []

    async def _run(self) -> None:
        attempt = 0
        while True:
            ws = self._ws
            if ws is not None:
                opened = time.monotonic()
                try:
                    async for raw in ws:
                        now = datetime.now(UTC)
                        for msg in self._frame(raw):
                            if msg.get("T") == "error":
                                log.warning(
                                    "options_stream_error", feed=self.feed, code=msg.get("code"), msg=msg.get("msg")
                                )
                                continue
                            tick = tick_of(msg, self.source, self.feed, now)
                            if tick is not None:
                                self.last_message_at = now
                                self.on_tick(tick)
                except ConnectionClosed:
                    pass
                self._ready.clear()
                self._ws = None
                self.losses += 1
                log.warning("options_stream_disconnected", feed=self.feed)
                if time.monotonic() - opened >= HEALTHY_SECONDS:
                    attempt = 0  # a vendor that drops every connection at once is not re-dialled flat out
            try:
                await asyncio.sleep(random.uniform(0, min(5.0, 0.2 * 2**attempt)))  # full jitter
                attempt += 1
                await self._open()
            except MarketpipeError as exc:
                self.failure = exc
                self.losses += 1
                log.warning("options_stream_reopen_failed", feed=self.feed, code=exc.code)
                if isinstance(exc, AuthFailed | NotEntitled):
                    return

    async def reconnect(self) -> bool:
        """Close the connection: the run loop re-opens it (with backoff) and subscribes again."""
        ws = self._ws
        if ws is None or self._task is None or self._task.done():
            return False
        await ws.close()
        return True

    async def subscribe(self, channel: str, symbols: list[str]) -> None:
        if channel == "quotes" and "*" in symbols:
            code, text = STAR_QUOTES_REFUSED
            raise InvalidArgument(f"{code}: {text}", details={"parameter": "quotes"})
        self.subs[channel].update(symbols)
        await self._send({"action": "subscribe", channel: symbols})

    async def unsubscribe(self, channel: str, symbols: list[str]) -> None:
        self.subs[channel].difference_update(symbols)
        await self._send({"action": "unsubscribe", channel: symbols})

    async def _send(self, msg: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return  # re-subscribed from self.subs on reconnect
        with contextlib.suppress(ConnectionClosed):
            await ws.send(msgpack.packb(msg))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
