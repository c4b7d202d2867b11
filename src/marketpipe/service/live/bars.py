"""What the stream leaves in the store: its minute bars (and their revisions), the minute bars an
outage missed (gap backfill over REST after a reconnect — fetched, never filled in), and each
symbol's previous session close, so change and change % survive a restart.

A writer belongs to one asset class (one per live-hub lane): a stock's bars go to ``bars`` with
whole-share volumes, a crypto pair's to ``crypto_bars`` with the fractional volume as received
(``CRYPTO_BAR_SCHEMA``), each checked on its own calendar (``MarketData.calendar_of``) and the gap
backfill fetched from that asset class's REST source.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import polars as pl

from marketpipe.core.calendar import get_calendar
from marketpipe.core.errors import MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import BACKLOG, STORE_WRITE_FAILURES, STREAM_BARS_PERSISTED, STREAM_GAP_BACKFILLS
from marketpipe.core.schema import BAR_SCHEMA, CRYPTO_BAR_SCHEMA, Bar
from marketpipe.core.timeframe import Timeframe
from marketpipe.providers.alpaca_stream import Outage
from marketpipe.providers.base import BarPage
from marketpipe.service.backfill import check_page
from marketpipe.service.data import MarketData
from marketpipe.service.gateway import Gateway

log = get_logger("marketpipe.service.live")

MINUTE = Timeframe.parse("1Min")

Spawn = Callable[[Coroutine[Any, Any, None]], None]
BarKey = tuple[str, datetime]


class BarWriter:
    """Buffers the stream's minute bars (``bars``: first versions; ``updated_bars``: revisions) and
    writes them as checked pages; after an outage, backfills the minutes it missed."""

    def __init__(
        self,
        data: MarketData,
        now: Callable[[], datetime],
        spawn: Spawn,
        streamed: Callable[[], list[str]],
        *,
        crypto: bool = False,
    ) -> None:
        self.data = data
        self.crypto = crypto  # a crypto lane's writer: pairs, float volumes, the 24/7 calendar
        self.schema = CRYPTO_BAR_SCHEMA if crypto else BAR_SCHEMA
        self.provider = "alpaca_crypto_stream" if crypto else "alpaca_stream"  # the ingest log's name
        self._now = now
        self._spawn = spawn
        self._streamed = streamed  # the symbols whose minute bars are subscribed upstream
        self.pending: dict[BarKey, Bar] = {}
        self.revised: dict[BarKey, Bar] = {}
        self._lock = asyncio.Lock()
        self.persisted = 0
        self.outages = 0
        self.gap_backfills = 0
        self.gap_bars = 0
        self.last_outage: Outage | None = None

    def add(self, channel: str, bar: Bar) -> None:
        if channel == "bars":
            self.pending[(bar.symbol, bar.ts)] = bar
        elif channel == "updated_bars":
            self.revised[(bar.symbol, bar.ts)] = bar
        self._backlog()

    def _backlog(self) -> None:
        BACKLOG.labels("stream_bars").set(len(self.pending) + len(self.revised))

    async def flush(self) -> int:
        """Write the minute bars received since the last flush (checked like any page). A failed
        write keeps its bars for the next flush (newer versions received meanwhile win)."""
        if not self.pending and not self.revised:
            return 0
        async with self._lock:
            stored = 0
            for refresh in (False, True):
                taken = self.revised if refresh else self.pending
                if not taken:
                    continue
                self._set(refresh, {})
                try:
                    stored += await asyncio.to_thread(self.write, list(taken.values()), refresh)
                except Exception as exc:  # noqa: BLE001 - keep the bars for the next flush, newer versions win
                    self._set(refresh, {**taken, **(self.revised if refresh else self.pending)})
                    STORE_WRITE_FAILURES.labels("stream_bars").inc()
                    log.error("live_bars_not_stored", bars=len(taken), error=repr(exc))
            self._backlog()
            return stored

    def _set(self, refresh: bool, bars: dict[BarKey, Bar]) -> None:
        if refresh:
            self.revised = bars
        else:
            self.pending = bars

    def write(self, bars: list[Bar], refresh: bool) -> int:
        frame = pl.DataFrame(
            [msgspec.structs.astuple(b) for b in bars],  # Bar's fields are BAR_SCHEMA's columns, in order
            schema=self.schema,  # a pair's volume stays the vendor's float: never rounded to a whole number
            orient="row",
        ).sort("symbol", "ts")
        first = bars[0]
        page = BarPage(
            frame=frame,
            symbols=sorted({b.symbol for b in bars}),
            timeframe=MINUTE,
            start=min(b.ts for b in bars),
            end=max(b.ts for b in bars) + timedelta(minutes=1),
            feed=first.feed or "",
            source=first.source,
            request_id=f"stream-{uuid.uuid4().hex[:12]}",
            fetched_at=max(b.fetched_at for b in bars),
            next_page_token=None,
            page_number=0,
        )
        day_tz = self.data.calendar_of(page.symbols).tz  # the asset class's calendar (UTC days for pairs)
        checked = check_page(page, {}, self.provider, self._now(), anomaly=None, refresh=refresh, day_tz=day_tz)
        stored: int = self.data.store.write_pages([checked.write])[0]
        n = checked.write.bars.height
        self.persisted += n
        STREAM_BARS_PERSISTED.labels(first.source).inc(n)
        return stored

    async def on_outage(self, outage: Outage) -> None:
        """Fetch the minute bars the outage missed over REST, for the symbols whose bars are streamed."""
        self.outages += 1
        self.last_outage = outage
        syms = self._streamed()
        if not syms:
            return
        since = outage.last_data_at or outage.disconnected_at
        start = since.replace(second=0, microsecond=0)
        end = outage.reconnected_at.replace(second=0, microsecond=0)  # the current minute is still forming
        if end <= start:
            return
        self._spawn(self._gap_backfill(syms, start, end, outage.reason))

    async def _gap_backfill(self, syms: list[str], start: datetime, end: datetime, reason: str) -> None:
        try:
            stats = await self.data.backfill(syms, start, end, timeframe="1Min")
        except MarketpipeError as exc:
            STREAM_GAP_BACKFILLS.labels("failed").inc()
            log.warning("live_gap_backfill_failed", symbols=syms, start=start, end=end, code=exc.code)
            return
        self.gap_backfills += 1
        self.gap_bars += stats.bars_stored
        STREAM_GAP_BACKFILLS.labels("ok").inc()
        log.info("live_gap_backfill", symbols=syms, start=start, end=end, reason=reason, stored=stats.bars_stored)


class PrevCloses:
    """The previous session's close per symbol: from the store when it is the right session, else
    from a snapshot (with failover), then kept in the store."""

    def __init__(
        self,
        gateway: Gateway,
        calendar: str,
        now: Callable[[], datetime],
        found: Callable[[str, float], None],
        unknown: Callable[[str], None],
    ) -> None:
        self.gateway = gateway
        self.store = gateway.data.store
        self.calendar = calendar
        self._now = now
        self._found = found  # (symbol, close): onto the price board
        self._unknown = unknown  # a symbol no vendor has a snapshot of: its subscribers are told

    def expected_session(self) -> date | None:
        cal = get_calendar(self.calendar)
        now = self._now()
        started = [s for s in cal.sessions(now - timedelta(days=14), now + timedelta(minutes=1)) if s.open <= now]
        return started[-2].day if len(started) >= 2 else None

    async def ensure(self, symbols: list[str]) -> None:
        try:
            want = await asyncio.to_thread(self.expected_session)
            held = await asyncio.to_thread(self.store.prev_closes, symbols)
            missing = [s for s in symbols if s not in held or held[s][0] != want]
            for s, (_session, close, _src) in held.items():
                if s not in missing:
                    self._found(s, close)
            if not missing:
                return
            snaps = await self.gateway.snapshots(missing)
            for s in missing:
                if s not in snaps:
                    self._unknown(s)
            tz = ZoneInfo(get_calendar(self.calendar).tz)
            rows: list[tuple[str, date, float, str]] = []
            for s, snap in snaps.items():
                bar = snap.prev_daily_bar
                if bar is None or not bar.close > 0:
                    continue
                session = bar.ts.astimezone(tz).date()
                rows.append((s, session, float(bar.close), bar.source))
                self._found(s, float(bar.close))
            await asyncio.to_thread(self.store.save_prev_closes, rows)
        except MarketpipeError as exc:
            log.warning("live_prev_close_unavailable", symbols=symbols, code=exc.code, error=exc.message)
