"""Crypto market data for every interface (``mp.bars("BTC/USD")``, the CLI, ``/v1`` and the
Alpaca-compatible ``/v1beta3/crypto`` routes): :class:`CryptoData`, over the Alpaca crypto adapter.

``mp.bars("BTC/USD")`` and ``marketpipe backfill BTC/USD`` store pairs like stocks (``MarketData.fill``:
this service's provider as the backfill engine's bars source, the crypto tables of the store, the
shared coverage ledger). What this class serves directly is what the compatible routes need: vendor
pages of bars checked row by row (``quality/validate.check_bars`` with the 24/7 calendar's daily-bar
zone; rows that fail are logged and counted, ``ROWS_QUARANTINED``, and left out, never repaired),
trades, quotes, latest values, order books and snapshots. The 24/7 calendar
(``core/calendar.ContinuousCalendar``) scores fetched frames (:meth:`CryptoData.completeness`).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import polars as pl

from marketpipe.core.calendar import ExchangeCalendar, calendar_for
from marketpipe.core.config import Config
from marketpipe.core.log import get_logger
from marketpipe.core.schema import TIME_COLUMN, Bar, Quote, Snapshot, Trade
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.alpaca_config import AlpacaConfig
from marketpipe.providers.alpaca_crypto import AlpacaCryptoProvider, CryptoPage
from marketpipe.quality.completeness import Completeness, assess_frames
from marketpipe.quality.validate import check_bars
from marketpipe.wire.alpaca_crypto import bar_records, quote_records, trade_records

log = get_logger("marketpipe.service.crypto")


class CryptoData:
    """Crypto bars, trades, quotes, latest values, order books and snapshots, from Alpaca."""

    def __init__(
        self, config: Config, *, env: dict[str, str] | None = None, provider: AlpacaCryptoProvider | None = None
    ) -> None:
        self.config = config
        self._env = env
        self._provider = provider

    @property
    def provider(self) -> AlpacaCryptoProvider:
        if self._provider is None:
            self._provider = AlpacaCryptoProvider.from_config(
                self.config.provider("alpaca", AlpacaConfig), env=self._env
            )
        return self._provider

    @property
    def calendar(self) -> ExchangeCalendar:
        return calendar_for("BTC/USD", equities=self.config.calendar, crypto_daily=self.config.crypto_daily_bars)

    def _checked(self, page: CryptoPage, tf: Timeframe, start: datetime, end: datetime) -> pl.DataFrame:
        res = check_bars(page.frame, timeframe=tf, start=start, end=end, now=utcnow(), day_tz=self.calendar.tz)
        if res.quarantine.height:
            log.warning("crypto_bars_rejected", rows=res.quarantine.height, reasons=res.counts, source=page.source)
        return res.good

    async def page(self, kind: str, symbols: list[str] | str, start: datetime, end: datetime, **kw: Any) -> CryptoPage:
        """One page of bars, trades or quotes as the vendor pages them (the compatible API's answer);
        ``kw`` as :meth:`AlpacaCryptoProvider.iter_pages` (timeframe, location, limit, sort, page_token)."""
        async for page in self.provider.iter_pages(kind, symbols, start, end, follow=False, **kw):
            tf = kw.get("timeframe")
            if kind == "bars" and isinstance(tf, Timeframe):
                good = await asyncio.to_thread(self._checked, page, tf, start, end)
                return CryptoPage(good, page.next_page_token, page.source)
            return page
        raise AssertionError("iter_pages yields at least one page")  # pragma: no cover

    async def history(
        self, kind: str, symbols: list[str] | str, start: datetime, end: datetime, *, location: str | None = None
    ) -> pl.DataFrame:
        """Every trade or quote of ``[start, end)``."""
        return await self.provider.history(kind, symbols, start, end, location=location)

    async def latest(self, kind: str, symbols: list[str] | str, *, location: str | None = None) -> pl.DataFrame:
        return await self.provider.latest(kind, symbols, location=location)

    async def snapshots(self, symbols: list[str] | str, *, location: str | None = None) -> dict[str, pl.DataFrame]:
        return await self.provider.snapshots(symbols, location=location)

    async def latest_records(
        self, kind: str, symbols: list[str] | str, *, location: str | None = None
    ) -> dict[str, Trade] | dict[str, Quote] | dict[str, Bar]:
        """The latest ``trade`` / ``quote`` / ``bar`` per pair as canonical records (what
        ``MarketData.latest`` answers for pairs): fractional sizes kept, ``feed`` naming the location.
        A pair the location does not list is left out, as the vendor does."""
        plural = {"trade": "trades", "quote": "quotes", "bar": "bars"}[kind]
        frame = await self.provider.latest(plural, symbols, location=location)
        if plural == "trades":
            return trade_records(frame)
        return quote_records(frame) if plural == "quotes" else bar_records(frame)

    async def snapshot_records(self, symbols: list[str] | str, *, location: str | None = None) -> dict[str, Snapshot]:
        """Snapshots per pair as :class:`~marketpipe.core.schema.Snapshot` records (sizes fractional)."""
        parts = await self.provider.snapshots(symbols, location=location)
        trades, quotes = trade_records(parts["latest_trade"]), quote_records(parts["latest_quote"])
        minute, daily, prev = (bar_records(parts[k]) for k in ("minute_bar", "daily_bar", "prev_daily_bar"))
        out: dict[str, Snapshot] = {}
        for sym in sorted(set(trades) | set(quotes) | set(minute) | set(daily) | set(prev)):
            recs = [r for r in (trades.get(sym), quotes.get(sym), minute.get(sym), daily.get(sym)) if r is not None]
            first = recs[0] if recs else prev[sym]
            out[sym] = Snapshot(
                symbol=sym,
                latest_trade=trades.get(sym),
                latest_quote=quotes.get(sym),
                minute_bar=minute.get(sym),
                daily_bar=daily.get(sym),
                prev_daily_bar=prev.get(sym),
                source=first.source,
                fetched_at=first.fetched_at,
            )
        return out

    def completeness(
        self, bars: pl.DataFrame, symbols: list[str], timeframe: Timeframe, start: datetime, end: datetime
    ) -> dict[str, Completeness]:
        """How complete fetched ``bars`` are on the 24/7 calendar over ``[start, end)`` (the range
        counts as asked for, so a missing minute is a gap). ``bars`` as ``mp.bars`` gives them (time column
        ``timestamp``) or as the service holds them (``ts``)."""
        if TIME_COLUMN in bars.columns and "ts" not in bars.columns:
            bars = bars.rename({TIME_COLUMN: "ts"})
        coverage = pl.DataFrame(
            {"symbol": symbols, "start": [start] * len(symbols), "end": [end] * len(symbols)},
            schema={"symbol": pl.String(), "start": pl.Datetime("us", "UTC"), "end": pl.Datetime("us", "UTC")},
        )
        found = assess_frames(symbols, timeframe, self.calendar, start, end, bars, coverage)
        return {sym: found[sym] for sym in symbols}

    async def aclose(self) -> None:
        if self._provider is not None:
            await self._provider.aclose()
            self._provider = None


__all__ = ["CryptoData"]
