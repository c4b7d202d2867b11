"""Fallback polling: while the router has failed over, the latest trades and quotes of the symbols
clients want are polled over REST from the first fallback vendor that answers (Polygon, …; Alpaca's
REST API only when no other vendor serves latest trades), checked like the stream's and published as
delayed data. While the stream serves, the same poll now and then cross-checks the stream's prices.
The crypto lane polls its own source instead (``sources``: the crypto REST latest values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marketpipe.core.errors import MarketpipeError
from marketpipe.core.schema import Quote, Trade
from marketpipe.core.timeutil import utcnow
from marketpipe.quality.stream_checks import StreamChecker
from marketpipe.service.gateway import Gateway
from marketpipe.service.live.board import PriceBoard
from marketpipe.service.stream_router import FALLBACK, DataSourceRouter

PRIMARY_VENDOR = "alpaca"  # the stream's vendor: its REST API is the fallback of last resort


class FallbackPoller:
    def __init__(
        self,
        gateway: Gateway,
        router: DataSourceRouter,
        checker: StreamChecker,
        board: PriceBoard,
        publish: Callable[[Trade | Quote], None],
        sources: Callable[[], list[Any]] | None = None,
    ) -> None:
        self.gateway = gateway
        self.router = router
        self.checker = checker
        self.board = board
        self.publish = publish  # a polled record onto the board and to the clients, as delayed data
        self._sources = sources  # what to poll instead of the gateway's stock providers
        self.polling = False
        self.polls = 0
        self.updates = 0

    def providers(self) -> list[Any]:
        if self._sources is not None:
            return self._sources()
        usable, _ = self.gateway.candidates("latest_trade")  # the ones whose supports() serves it, best first
        others = [p for p in usable if p.name != PRIMARY_VENDOR]
        return others or usable

    async def poll(self, symbols: list[str], cross_check_only: bool = False) -> None:
        """Latest trades and quotes from the first fallback vendor that answers."""
        if not symbols:
            return
        self.polling = True
        try:
            errors: list[str] = []
            now = utcnow()
            for p in self.providers():
                try:
                    trades: dict[str, Trade] = await p.latest_trades(symbols)
                    quotes: dict[str, Quote] = (
                        await p.latest_quotes(symbols)
                        if p.supports("latest_quote", None, None, None, now) is None
                        else {}
                    )
                except MarketpipeError as exc:
                    errors.append(f"{p.name}: {exc.code}")
                    continue
                if not trades and not quotes:
                    errors.append(f"{p.name}: no data for {', '.join(symbols)}")
                    continue
                self.polls += 1
                if cross_check_only:
                    for sym, t in trades.items():
                        res = self.checker.cross_check(sym, t.price, t.source)
                        if res is not None:
                            self.board.set_disagrees(sym, res.warned)
                    return
                self.router.fallback_ok()
                if self.router.active_source != FALLBACK:
                    return  # the primary took over meanwhile
                self.apply(trades, quotes)
                return
            if not cross_check_only:
                self.router.fallback_failed("; ".join(errors) or "no fallback provider")
        finally:
            self.polling = False

    def apply(self, trades: dict[str, Trade], quotes: dict[str, Quote]) -> None:
        """Publish what a poll brought that is new: quotes first, then trades, checked."""
        for sym in sorted(set(trades) | set(quotes)):
            quote, trade = quotes.get(sym), trades.get(sym)
            if quote is not None:
                self._offer(quote)
            if trade is not None:
                res = self.checker.cross_check(sym, trade.price, trade.source)
                if res is not None:
                    self.board.set_disagrees(sym, res.warned)
                if self.checker.check_trade(sym, trade.price, trade.size, trade.ts, trade.fetched_at, trade.source):
                    continue
                self._offer(trade)

    def _offer(self, rec: Trade | Quote) -> None:
        if not self.board.is_new(rec):
            return  # nothing new since the last poll
        self.updates += 1
        self.publish(rec)
