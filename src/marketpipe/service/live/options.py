"""The options side of the live hub: one upstream options stream per feed, checked and fanned out.

As for stocks, the gateway owns the vendor connection (one per feed, opened when the first client
subscribes) and counts nothing itself twice: a client's subscription is a route in a
:class:`~.fanout.Fanout` (bounded queues, slow clients dropped, never waited for), and the upstream is told
only of a route set going from empty to not, or back. Every tick passes :func:`tick_problem` (bid ≤ ask,
sizes ≥ 0, prices ≥ 0, a parsable OCC contract); a tick that fails is counted in
``marketpipe_option_stream_rejected_total`` and not forwarded. Ticks carry ``source`` and ``feed``.

The project's own stream (``/v1/stream``) reaches the same upstreams through :class:`OptionsLiveStream`:
one more client of :class:`OptionsLive` (so ``/v1/stream`` and ``/v1beta1/{indicative,opra}`` share the
feed's one connection), which the live hub's options lane (:class:`~.hub.LiveHub` with
``asset_class="option"``) uses as its primary stream, as the crypto lane uses
:class:`~.crypto.CryptoLiveStream`, with :class:`OptionsLatest` (the REST latest trades and quotes) as
its fallback source. Prices only: nothing here computes a greek or an implied volatility.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from marketpipe.core.config import Config, alpaca_credentials
from marketpipe.core.errors import InvalidOptionSymbol, MalformedMessage
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import REGISTRY, STREAM_ERRORS
from marketpipe.core.options import parse_occ
from marketpipe.core.schema import Quote, Trade
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_options_stream import OptionsUpstream
from marketpipe.providers.alpaca_stream import StreamHealth, StreamMessage
from marketpipe.service.live.fanout import WILDCARD, Fanout, FanoutClient, Item
from marketpipe.service.live.lane import LaneStream
from marketpipe.wire.alpaca_stream import stream_base_url

if TYPE_CHECKING:
    import polars as pl

    from marketpipe.service.options import OptionsData

log = get_logger("marketpipe.service.live.options")
REJECTED = Counter(
    "marketpipe_option_stream_rejected_total",
    "Option stream ticks not forwarded, by the check they failed",
    ["check"],
    registry=REGISTRY,
)
PROTOCOL = "alpaca-options"
CHANNEL_OF = {"quote": "quotes", "trade": "trades"}


def tick_problem(tick: dict[str, Any]) -> str | None:
    """The first check a tick fails (None: it passes)."""
    try:
        parse_occ(tick.get("contract"))
    except InvalidOptionSymbol:
        return "occ_symbol"
    if tick.get("ts") is None:
        return "no_time"
    if tick["type"] == "quote":
        bp, ap = tick.get("bid_price"), tick.get("ask_price")
        if any(v is not None and v < 0 for v in (bp, ap, tick.get("bid_size"), tick.get("ask_size"))):
            return "negative"
        if bp is not None and ap is not None and bp > ap > 0:
            return "crossed_quote"
    elif any(v is not None and v < 0 for v in (tick.get("price"), tick.get("size"))):
        return "negative"
    return None


class OptionsLive:
    """Upstreams by feed and their clients. Create on the running loop; :meth:`close` at shutdown."""

    def __init__(self, config: Config, *, env: dict[str, str] | None = None, queue_size: int | None = None) -> None:
        s = config.stream
        self.config = config
        self._env = env
        self.fanout = Fanout(queue_size or s.client_queue, s.slow_warn_fraction)
        self.upstreams: dict[str, OptionsUpstream] = {}
        self._lock = asyncio.Lock()
        self.base_url = config.stream.url or stream_base_url(config.provider("alpaca", AlpacaConfig).base_url)

    async def upstream(self, feed: str) -> OptionsUpstream:
        async with self._lock:
            up = self.upstreams.get(feed)
            if up is None:
                key, secret = alpaca_credentials(self._env)
                up = OptionsUpstream(self.base_url, feed, key, secret, functools.partial(self._on_tick, feed))
                await up.start()
                self.upstreams[feed] = up
            return up

    def _on_tick(self, feed: str, tick: dict[str, Any]) -> None:
        problem = tick_problem(tick)
        if problem is not None:
            REJECTED.labels(problem).inc()
            return
        channel = f"{feed}:{CHANNEL_OF[tick['type']]}"
        contract = str(tick["contract"])
        routes = self.fanout.routes
        targets = routes.get((channel, contract), set()) | routes.get((channel, WILDCARD), set())
        if targets:
            item = Item(channel, contract, tick, time.time())
            for c in targets:
                c.put(item)

    def attach(self, name: str) -> FanoutClient:
        return self.fanout.attach(PROTOCOL, name)

    async def change(self, client: FanoutClient, feed: str, channel: str, symbols: list[str], *, add: bool) -> None:
        """Route (or unroute) ``client``; the upstream hears of a symbol's first route and its last."""
        up = await self.upstream(feed)
        key = f"{feed}:{channel}"
        if add:
            fresh = [s for s in symbols if not self.fanout.routes.get((key, s))]
            for s in symbols:
                self.fanout.route(client, key, s)
            if fresh:
                await up.subscribe(channel, fresh)
        else:
            gone = self.fanout.unroute(client, key, symbols)
            last = [s for s in gone if not self.fanout.routes.get((key, s))]
            if last:
                await up.unsubscribe(channel, last)

    async def detach(self, client: FanoutClient) -> None:
        routed = self.fanout.detach(client)
        for key, symbols in routed or ():
            feed, _, channel = key.partition(":")
            last = [s for s in symbols if not self.fanout.routes.get((key, s))]
            up = self.upstreams.get(feed)
            if last and up is not None:
                await up.unsubscribe(channel, last)

    async def close(self) -> None:
        self.fanout.close_all()
        for up in list(self.upstreams.values()):
            await up.close()
        self.upstreams.clear()


def tick_record(tick: dict[str, Any]) -> Trade | Quote | None:
    """A checked option tick as the canonical Trade or Quote of its contract (None: a value its kind needs
    is missing — never filled in)."""
    cond = tick.get("condition")
    conditions = (str(cond),) if cond else ()
    base = {
        "symbol": str(tick["contract"]),
        "ts": tick["ts"],
        "conditions": conditions,
        "source": tick["source"],
        "feed": tick["feed"],
        "fetched_at": tick["received_at"],
    }
    if tick["type"] == "trade":
        if tick.get("price") is None or tick.get("size") is None:
            return None
        return Trade(price=float(tick["price"]), size=tick["size"], exchange=tick.get("exchange"), **base)
    needed = ("bid_price", "bid_size", "ask_price", "ask_size")
    if any(tick.get(k) is None for k in needed):
        return None
    return Quote(
        bid_price=float(tick["bid_price"]),
        bid_size=tick["bid_size"],
        ask_price=float(tick["ask_price"]),
        ask_size=tick["ask_size"],
        bid_exchange=tick.get("bid_exchange"),
        ask_exchange=tick.get("ask_exchange"),
        **base,
    )


class OptionsLiveStream(LaneStream):
    """The options lane's primary stream: what :class:`~.hub.LiveHub` needs of an upstream stream
    (``start``, reference-counted ``subscribe``/``unsubscribe``, batch handlers, ``health``,
    ``reconnect``, ``close``), served by one client of the shared :class:`OptionsLive`, so ``/v1/stream``
    and the Alpaca-compatible options stream share the feed's one upstream connection.

    References are counted per (channel, contract) and reconciled with backoff (:class:`~.lane.LaneStream`);
    :meth:`health` counts one reconnect per failed attempt or lost connection."""

    kind = "options_live"

    def __init__(
        self, live: OptionsLive, feed: str, *, base_backoff_s: float = 0.2, max_backoff_s: float = 10.0
    ) -> None:
        super().__init__(feed, base_backoff_s=base_backoff_s, max_backoff_s=max_backoff_s)
        self.live = live
        self.feed = feed
        self.client = live.attach(f"v1-stream-{feed}")

    def _held(self) -> set[tuple[str, str]]:
        prefix = f"{self.feed}:"
        return {
            (key[len(prefix) :], s)
            for key, syms in self.client.subscriptions.items()
            if key.startswith(prefix)
            for s in syms
        }

    async def _change(self, channel: str, symbols: list[str], add: bool) -> None:
        await self.live.change(self.client, self.feed, channel, symbols, add=add)

    async def _read(self) -> None:
        while not self._closed:
            _, items = await self.client.next_batch()
            if not items and self.client.closed is not None:
                if self._closed:
                    return
                log.warning("options_live_client_dropped", feed=self.feed, reason=self.client.closed)
                old, self.client = self.client, self.live.attach(f"v1-stream-{self.feed}")
                await self.live.detach(old)
                await self._reconcile()  # fell behind: routed again, nothing else to do
                continue
            await self._deliver([it.record for it in items])  # type: ignore[misc]

    async def _deliver(self, ticks: list[dict[str, Any]]) -> None:
        now = utcnow()
        out: list[StreamMessage] = []
        for tick in ticks:
            rec = tick_record(tick)
            if rec is None:
                self.decode_errors += 1
                STREAM_ERRORS.labels("alpaca_options", MalformedMessage.code).inc()
                log.warning("options_live_tick_incomplete", feed=self.feed, tick=str(tick)[:200])
                continue
            channel = CHANNEL_OF[tick["type"]]
            out.append(StreamMessage(channel, rec))
            self._received(channel, now)
        await self._handle(out)

    async def reconnect(self, reason: str = "requested") -> bool:
        log.warning("options_live_reconnect", feed=self.feed, reason=reason)
        up = self.live.upstreams.get(self.feed)
        return await up.reconnect() if up is not None else False

    def health(self) -> StreamHealth:
        up = self.live.upstreams.get(self.feed)
        connected = up is not None and up.connected and self.error is None
        err = self.error or (up.failure if up is not None and not up.connected else None)
        prefix = f"{self.feed}:"
        stopped = up is not None and up.stopped
        return StreamHealth(
            connected=connected,
            feed=self.feed,
            url=up.url if up is not None else "",
            encoding="msgpack",
            source=up.source if up is not None else "alpaca",
            connected_since=up.connected_since if up is not None else None,
            last_message_at=dict(self.last_message_at),
            messages_received=self.messages,
            messages_by_channel=dict(self.by_channel),
            reconnects=self.failures + (up.losses if up is not None else 0),
            connections=1 if connected else 0,
            errors_by_code={},
            decode_errors=self.decode_errors,
            handler_errors=0,
            subscriptions=self.subscription_counts(),
            server_subscriptions={
                k[len(prefix) :]: sorted(v) for k, v in self.client.subscriptions.items() if k.startswith(prefix) and v
            },
            last_error=err.to_dict() if err is not None else None,
            next_retry_at=None,
            stopped=stopped,
            stop_error=up.failure.to_dict() if stopped and up is not None and up.failure is not None else None,
        )

    async def close(self) -> None:
        self._closed = True
        self.client.close()
        await self._stop_tasks()
        await self.live.detach(self.client)


class OptionsLatest:
    """The options lane's fallback source for :class:`~.poller.FallbackPoller`: the latest trades and
    quotes over REST (``/v1beta1/options/{trades,quotes}/latest``, checked and quarantined by
    :class:`~marketpipe.service.options.OptionsData`), as canonical records of each contract."""

    name = "alpaca_options"

    def __init__(self, options: OptionsData, feed: str) -> None:
        self.options = options
        self.feed = feed

    def supports(self, *_: Any) -> None:
        return None  # serves latest trades and quotes for every contract

    async def latest_trades(self, symbols: list[str]) -> dict[str, Trade]:
        frame = await self.options.latest_trades(symbols, feed=self.feed)
        return {
            r["contract"]: Trade(
                symbol=r["contract"],
                ts=r["trade_ts"],
                price=r["trade_price"],
                size=r["trade_size"],
                exchange=r["trade_exchange"],
                conditions=(r["trade_condition"],) if r["trade_condition"] else (),
                source=r["source"],
                feed=r["feed"],
                fetched_at=r["fetched_at"],
            )
            for r in _rows(frame, "trade_ts", "trade_price", "trade_size")
        }

    async def latest_quotes(self, symbols: list[str]) -> dict[str, Quote]:
        frame = await self.options.latest_quotes(symbols, feed=self.feed)
        return {
            r["contract"]: Quote(
                symbol=r["contract"],
                ts=r["quote_ts"],
                bid_price=r["bid_price"],
                bid_size=r["bid_size"],
                ask_price=r["ask_price"],
                ask_size=r["ask_size"],
                bid_exchange=r["bid_exchange"],
                ask_exchange=r["ask_exchange"],
                conditions=(r["quote_condition"],) if r["quote_condition"] else (),
                source=r["source"],
                feed=r["feed"],
                fetched_at=r["fetched_at"],
            )
            for r in _rows(frame, "quote_ts", "bid_price", "bid_size", "ask_price", "ask_size")
        }


def _rows(frame: pl.DataFrame, *needed: str) -> list[dict[str, Any]]:
    """The rows that carry every ``needed`` value (a contract without a latest trade has none)."""
    import polars as pl

    return frame.filter(pl.all_horizontal(*(pl.col(c).is_not_null() for c in needed))).to_dicts()
