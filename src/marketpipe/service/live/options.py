"""The options side of the live hub: one upstream options stream per feed, checked and fanned out.

As for stocks, the gateway owns the vendor connection (one per feed, opened when the first client
subscribes) and counts nothing itself twice: a client's subscription is a route in a
:class:`~.fanout.Fanout` (bounded queues, slow clients dropped, never waited for), and the upstream is told
only of a route set going from empty to not, or back. Every tick passes :func:`tick_problem` (bid ≤ ask,
sizes ≥ 0, prices ≥ 0, a parsable OCC contract); a tick that fails is counted in
``marketpipe_option_stream_rejected_total`` and not forwarded. Ticks carry ``source`` and ``feed``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from prometheus_client import Counter

from marketpipe.core.config import Config, alpaca_credentials
from marketpipe.core.errors import InvalidOptionSymbol
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import REGISTRY
from marketpipe.core.options import parse_occ
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_options_stream import OptionsUpstream
from marketpipe.service.live.fanout import WILDCARD, Fanout, FanoutClient, Item
from marketpipe.wire.alpaca_stream import stream_base_url

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
