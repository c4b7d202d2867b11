"""Keeping stored series current and complete: ``update`` (incremental / full refresh / smart) and
``repair`` (fetch exactly what completeness says is missing, from fallback vendors where the
primary had nothing). Both go through :func:`run_backfill`, so every page is checked, attributed
and written atomically, and a repeated run fetches nothing that is already held."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
import polars as pl

from marketpipe.core import events
from marketpipe.core.calendar import ExchangeCalendar
from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument, InvalidRange, MarketpipeError
from marketpipe.core.log import get_logger
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import utcnow
from marketpipe.providers.base import BarsProvider
from marketpipe.quality.completeness import Completeness, assess_frames
from marketpipe.service.backfill import BackfillStats, ProgressFn, run_backfill, settings
from marketpipe.service.quality import expected_complete
from marketpipe.service.router import ProviderRouter
from marketpipe.store.base import BarStore

log = get_logger("marketpipe.maintain")
Strategy = Literal["incremental", "full", "smart"]
STRATEGIES = ("incremental", "full", "smart")


@dataclass
class SymbolUpdate:
    symbol: str
    strategy: str  # what was actually done: incremental | full
    start: datetime | None
    end: datetime
    stats: BackfillStats | None = None
    error: dict[str, object] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and (self.stats is None or self.stats.ok)


def symbol_stats(group: BackfillStats, sym: str) -> BackfillStats:
    """One symbol's own numbers out of a run that fetched several together: its received, stored,
    rejected and revised rows and anomalies (``group.per_symbol``) and its errors. Requests, pages,
    retries and failovers were shared by the symbols of a request and stay the group's (rows by provider
    and by rejection reason are not split, so they are left out); rows the run could not split between
    symbols (``group.unattributed``) are carried so a caller can say so."""
    own = group.per_symbol.get(sym, {})
    mine = BackfillStats(
        units_total=group.units_total,
        units_done=group.units_done,
        requests=group.requests,
        pages=group.pages,
        bars_received=own.get("good", 0) + own.get("rejected", 0),
        bars_stored=own.get("stored", 0),
        bars_rejected=own.get("rejected", 0),
        retries=group.retries,
        started=group.started,
        finished=group.finished,
        errors=[e for e in group.errors if sym in _error_symbols(e)],
        failovers=group.failovers,
        skipped_symbols=[s for s in group.skipped_symbols if s == sym],
        anomalies=own.get("anomalies", 0),
        revised=own.get("revised", 0),
    )
    mine.per_symbol[sym].update(own)
    mine.unattributed.update(group.unattributed)
    return mine


def _error(exc: MarketpipeError) -> dict[str, object]:
    return {"code": exc.code, "message": exc.message, **({"details": exc.details} if exc.details else {})}


async def update(
    source: BarsProvider | ProviderRouter,
    store: BarStore,
    cal: ExchangeCalendar,
    config: Config,
    symbols: list[str],
    timeframe: Timeframe,
    *,
    strategy: Strategy = "smart",
    start: datetime | None = None,
    end: datetime | None = None,
    feed: str | None = None,
    now: Callable[[], datetime] = utcnow,
    progress: ProgressFn | None = None,
) -> dict[str, SymbolUpdate]:
    """Bring each symbol up to ``end`` (default now).

    * ``incremental``: from the newest covered point (or ``start`` for a symbol with no history).
    * ``full``: re-fetch ``[start, end)`` whatever is held (``start`` defaults to ``refresh_days``
      before the newest covered point); changed rows become revisions.
    * ``smart``: incremental when the newest covered point is at most ``smart_max_gap_hours`` old,
      otherwise full from ``refresh_days`` before it.

    One symbol's failure never stops the others: it is reported in its :class:`SymbolUpdate`.
    ``progress`` gets each backfill run's stats as pages are committed (as ``run_backfill`` gives them).
    """
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown update strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    t_now = now()
    stop = min(end or t_now, t_now)
    held = store.covered_until(symbols, str(timeframe))
    ucfg = config.update
    results: dict[str, SymbolUpdate] = {}
    groups: dict[tuple[datetime, bool], list[str]] = defaultdict(list)
    for sym in symbols:
        last = held.get(sym)
        if last is None and start is None:
            results[sym] = SymbolUpdate(
                sym,
                strategy,
                None,
                stop,
                error={
                    "code": InvalidArgument.code,
                    "message": f"{sym} has no {timeframe} history yet: give a start (--start) or run backfill first",
                },
            )
            continue
        refresh_from = (last or start or stop) - timedelta(days=ucfg.refresh_days)
        if strategy == "full":
            begin, refresh = (start or refresh_from), True
        elif strategy == "smart" and last is not None and stop - last > timedelta(hours=ucfg.smart_max_gap_hours):
            begin, refresh = refresh_from, True
        else:
            begin, refresh = (last or start), False  # type: ignore[assignment]
        if begin >= stop:
            results[sym] = SymbolUpdate(sym, "incremental", begin, stop, stats=BackfillStats())
            continue
        groups[(begin, refresh)].append(sym)

    for (begin, refresh), syms in sorted(groups.items()):
        try:
            stats = await run_backfill(
                source,
                store,
                cal,
                syms,
                timeframe,
                begin,
                stop,
                feed=feed,
                now=now,
                refresh=refresh,
                progress=progress,
                **settings(config),
            )
        except MarketpipeError as exc:
            log.warning("update_failed", symbols=syms, code=exc.code, error=exc.message)
            for sym in syms:
                results[sym] = SymbolUpdate(sym, "full" if refresh else "incremental", begin, stop, error=_error(exc))
            continue
        failed = {s for err in stats.errors for s in _error_symbols(err)}
        for sym in syms:
            err = next((e for e in stats.errors if sym in _error_symbols(e)), None) if sym in failed else None
            results[sym] = SymbolUpdate(
                sym, "full" if refresh else "incremental", begin, stop, stats=symbol_stats(stats, sym), error=err
            )
    _check_stale(store, cal, symbols, timeframe, t_now, ucfg.stale_after_minutes)
    return {sym: results[sym] for sym in symbols}


def _check_stale(
    store: BarStore, cal: ExchangeCalendar, symbols: list[str], tf: Timeframe, now: datetime, minutes: float
) -> None:
    """During a session, raise ``stale_data`` for symbols whose newest bar is older than ``minutes``."""
    if not tf.is_intraday:
        return
    now_ns = int(now.timestamp() * 1e6) * 1000
    i = int(np.searchsorted(cal.opens, now_ns, side="right")) - 1
    if i < 0 or now_ns >= cal.closes[i] or now_ns - cal.opens[i] < minutes * 60e9:
        return
    opened = datetime.fromtimestamp(cal.opens[i] / 1e9).astimezone(now.tzinfo)
    latest = (
        store.read_bars(symbols, str(tf), opened, now).group_by("symbol").agg(pl.col("ts").max())
        if symbols
        else pl.DataFrame()
    )
    newest = dict(latest.iter_rows()) if latest.height else {}
    for sym in symbols:
        ts = newest.get(sym)
        age = (now - ts).total_seconds() / 60 if ts is not None else None
        if age is None or age > minutes:
            events.emit(
                events.STALE_DATA,
                "warning",
                f"{sym} {tf}: newest bar is "
                + (f"{age:.0f} minutes old" if age is not None else "missing for today's session"),
                symbol=sym,
                timeframe=str(tf),
                newest=ts.isoformat() if ts is not None else None,
            )


# --- repair --------------------------------------------------------------------------------------


@dataclass
class RepairResult:
    before: dict[str, Completeness]
    after: dict[str, Completeness]
    requests: int = 0
    rows_by_provider: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stored: int = 0
    errors: list[dict[str, object]] = field(default_factory=list)
    asked: list[dict[str, object]] = field(default_factory=list)  # which provider was asked for what

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, stats: BackfillStats) -> None:
        self.requests += stats.requests
        self.stored += stats.bars_stored
        for name, n in stats.rows_by_provider.items():
            self.rows_by_provider[name] += n
        self.errors += stats.errors


def completeness(
    store: BarStore,
    cal: ExchangeCalendar,
    symbols: list[str],
    tf: Timeframe,
    start: datetime,
    end: datetime,
    *,
    extended: bool = False,
    now: datetime | None = None,
) -> dict[str, Completeness]:
    if end <= start:
        raise InvalidRange(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    cal.check_bounds(start, end)
    expected = expected_complete(cal, tf, start, end, now or utcnow(), extended)
    bars = store.read_bars(symbols, str(tf), start, end).select("symbol", "ts")
    cov = store.coverage(symbols, str(tf), start, end)
    return assess_frames(symbols, tf, cal, start, end, bars, cov, extended=extended, expected=expected)


def _day_windows(comp: Completeness) -> list[tuple[datetime, datetime]]:
    """Confirmed-empty ranges merged per local day: one request per symbol-day, not per minute."""
    windows: dict[object, tuple[datetime, datetime]] = {}
    for s, e in comp.empties():
        key = s.date() if s.hour >= 4 else (s - timedelta(hours=4)).date()  # UTC date of the US session
        lo, hi = windows.get(key, (s, e))
        windows[key] = (min(lo, s), max(hi, e))
    return sorted(windows.values())


async def repair(
    router: ProviderRouter | Callable[[], ProviderRouter],
    store: BarStore,
    cal: ExchangeCalendar,
    config: Config,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    empties: bool = True,
    feed: str | None = None,
    now: Callable[[], datetime] = utcnow,
    progress: ProgressFn | None = None,
) -> RepairResult:
    """Fetch what is missing in ``[start, end)``:

    1. *gaps* (never fetched, or failed) through the router, best provider first, with failover;
    2. with ``empties``, *confirmed-empty* bars (fetched, nothing there) from each provider that has
       not yet been asked for them, in router order, until they are found or every provider has
       answered. The ledger remembers every answer, so a second run fetches nothing.
    Nothing is ever filled in: what no vendor has stays missing, and is reported as such.
    ``router`` may be a function that builds it: then nothing that needs credentials happens unless
    there is something to fetch."""
    extended = config.quality.extended_hours
    t_now = now()
    end = min(end, t_now)
    before = completeness(store, cal, symbols, timeframe, start, end, extended=extended, now=t_now)
    result = RepairResult(before=before, after=before)
    kw = {"feed": feed, "now": now, "progress": progress, **settings(config)}
    routers: list[ProviderRouter] = []

    def get_router() -> ProviderRouter:
        if not routers:
            routers.append(router if isinstance(router, ProviderRouter) else router())
        return routers[0]

    gap_syms = [s for s, c in before.items() if c.gap]
    if gap_syms:
        lo = min(c.gaps()[0][0] for s, c in before.items() if c.gap)
        hi = max(c.gaps()[-1][1] for s, c in before.items() if c.gap)
        r = get_router()
        source = r if len(r.providers) > 1 else r.providers[0]
        result.asked.append({"provider": "router", "symbols": gap_syms, "start": lo, "end": hi, "kind": "gap"})
        try:
            result.add(await run_backfill(source, store, cal, gap_syms, timeframe, lo, hi, **kw))  # type: ignore[arg-type]
        except MarketpipeError as exc:
            result.errors.append({"symbols": gap_syms, **_error(exc)})
    current = completeness(store, cal, symbols, timeframe, start, end, extended=extended, now=t_now)
    if empties and any(c.confirmed_empty for c in current.values()):
        candidates, _ = get_router().candidates("bars", timeframe, start, end)
        for provider in candidates:
            todo: dict[tuple[datetime, datetime], list[str]] = defaultdict(list)
            for sym, comp in current.items():
                if not comp.confirmed_empty:
                    continue
                for s, e in _day_windows(comp):
                    if not _covered_by(store, sym, timeframe, provider.name, s, e):
                        todo[(s, e)].append(sym)
            for (s, e), syms in sorted(todo.items()):
                result.asked.append({"provider": provider.name, "symbols": syms, "start": s, "end": e, "kind": "empty"})
                try:
                    result.add(await run_backfill(provider, store, cal, syms, timeframe, s, e, **kw))  # type: ignore[arg-type]
                except MarketpipeError as exc:
                    result.errors.append({"symbols": syms, "provider": provider.name, **_error(exc)})
            if todo:
                current = completeness(store, cal, symbols, timeframe, start, end, extended=extended, now=t_now)
    result.after = current
    return result


def _error_symbols(err: dict[str, object]) -> list[str]:
    """The symbols a backfill error record names (its ``symbols`` list)."""
    syms = err.get("symbols")
    return [str(s) for s in syms] if isinstance(syms, list) else []


def _covered_by(store: BarStore, symbol: str, tf: Timeframe, provider: str, s: datetime, e: datetime) -> bool:
    cov = store.coverage([symbol], str(tf), s, e, provider=provider)
    if not cov.height:
        return False
    cursor = s
    for cs, ce in sorted(cov.select("start", "end").iter_rows()):
        if cs > cursor:
            return False
        cursor = max(cursor, ce)
        if cursor >= e:
            return True
    return cursor >= e
