"""The service layer: the one place that decides store-or-fetch, and the one façade for fetching.

``MarketData`` is what the CLI, ``marketpipe.*`` and the gateway fetch through: bars (store first,
then a backfill of what is missing), historical trades and quotes, latest trades / quotes / bars and
snapshots — all through the router's one failover path (:meth:`ProviderRouter.first`), so every
entry point fails over the same way and every value carries the ``source`` that served it.

``MarketData`` is async. ``SyncMarketData`` runs it on a private event-loop thread so that plain
scripts and notebooks (which already run a loop of their own) can call it synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterator
from concurrent.futures import Future
from datetime import datetime
from typing import Any, Literal, TypeVar

import polars as pl

from marketpipe.core.calendar import ExchangeCalendar, get_calendar
from marketpipe.core.config import Config, load_config
from marketpipe.core.schema import Bar, Quote, Snapshot, Trade, normalize_symbols
from marketpipe.core.timeframe import Timeframe, TimeframeLike
from marketpipe.core.timeutil import TimeInput, parse_range, parse_time
from marketpipe.core.validation import validate_dataset_url, validate_limit
from marketpipe.providers.base import BarsProvider, feed_for
from marketpipe.service.backfill import BackfillStats, ProgressFn, missing_ranges, run_backfill, settings
from marketpipe.service.export import read_dataset
from marketpipe.service.frames import Shape, frame_options, shaped
from marketpipe.service.maintain import RepairResult, Strategy, SymbolUpdate, repair, update
from marketpipe.service.quality import SeriesQuality, analyze
from marketpipe.service.router import CLIENT_ERRORS, ProviderRouter, Served, build_router
from marketpipe.service.scheduler import Job, Scheduler
from marketpipe.store import open_store
from marketpipe.store.base import Store
from marketpipe.wire.alpaca_rest import MAX_LIMIT  # the most rows one vendor page carries

T = TypeVar("T")
TimeLike = TimeInput
LatestKind = Literal["trade", "quote", "bar"]
TickKind = Literal["trades", "quotes"]


def _series(
    symbols: list[str] | str, timeframe: TimeframeLike | Timeframe, start: TimeLike, end: TimeLike | None
) -> tuple[list[str], Timeframe, datetime, datetime]:
    """The checked arguments of a call about stored series, in one order for every such call:
    symbols, then timeframe, then the ``[start, end)`` range."""
    syms = normalize_symbols(symbols)
    tf = Timeframe.parse(timeframe)
    s, e = parse_range(start, end)
    return syms, tf, s, e


parse_series = _series  # the same checks for callers outside the façade (the distributed coordinator)


def _feed(feed: str | None) -> str | None:
    """A feed as the providers name it; None: each provider's configured feed."""
    return feed.lower() if feed else None


class MarketData:
    def __init__(
        self,
        config: Config | None = None,
        *,
        store: Store | None = None,
        provider: BarsProvider | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``provider``: fetch from this one provider instead of the configured ones."""
        self.config = config or load_config()
        self._store = store
        self._owns_store = store is None
        self._store_users = 0
        self._provider = provider
        self._router: ProviderRouter | None = None
        self._env = env
        self._pinned: str | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.config)
        return self._store

    def _stored(self) -> Store:
        """The store for a call that only reads: ``StoreError`` "no store at PATH" when there is none yet,
        rather than an empty answer from a newly created file."""
        if self._store is None:
            self._store = open_store(self.config, create=False)
        return self._store

    @property
    def router(self) -> ProviderRouter:
        """Every enabled provider with credentials, built on first use so that reading from the
        store never needs credentials."""
        if self._router is None:
            if self._provider is not None:
                self._router = ProviderRouter([self._provider])
            else:
                self._router = build_router(self.config, env=self._env)
            self._router.pinned = self._pinned
        return self._router

    @property
    def pinned(self) -> str | None:
        """The provider tried first whenever it is usable (``None``: health order). Kept across
        :meth:`reset_providers`."""
        return self._pinned

    @pinned.setter
    def pinned(self, name: str | None) -> None:
        self._pinned = name
        if self._router is not None:
            self._router.pinned = name

    def bars_source(self, provider: str | None = None) -> BarsProvider | ProviderRouter:
        """The named provider alone, or: one provider, its own ledger and strict errors; several,
        failover through the router."""
        router = self.router
        if provider is not None:
            return router.get(provider)
        return router if len(router.providers) > 1 else router.providers[0]

    async def reset_providers(self) -> None:
        """Close every provider client; the next use builds them again from the config (new
        connections, fresh circuits). The pinned provider stays pinned."""
        old, self._router, self._provider = self._router, None, None
        if old is not None:
            await old.aclose()

    @property
    def calendar(self) -> ExchangeCalendar:
        return get_calendar(self.config.calendar)

    async def backfill(
        self,
        symbols: list[str] | str,
        start: TimeLike,
        end: TimeLike | None = None,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        feed: str | None = None,
        progress: ProgressFn | None = None,
    ) -> BackfillStats:
        syms, tf, s, e = _series(symbols, timeframe, start, end)
        return await self.fill(
            syms,
            tf,
            s,
            e,
            feed=_feed(feed),
            progress=progress,
            circuit_waits=self.config.backfill.circuit_waits,  # a batch job may wait out an open circuit
        )

    async def fill(
        self,
        symbols: list[str],
        timeframe: Timeframe,
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        provider: str | None = None,
        progress: ProgressFn | None = None,
        circuit_waits: int = 0,
    ) -> BackfillStats:
        """Fetch, check and store what the ledger lacks in ``[start, end)`` (arguments already
        parsed): from ``provider`` alone when named, else through the router with failover."""
        return await run_backfill(
            self.bars_source(provider),
            self.store,
            self.calendar,
            symbols,
            timeframe,
            start,
            end,
            feed=feed,
            progress=progress,
            circuit_waits=circuit_waits,
            **settings(self.config),
        )

    async def quality(
        self,
        symbols: list[str] | str,
        start: TimeLike,
        end: TimeLike | None = None,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        save: bool = True,
    ) -> list[SeriesQuality]:
        """Completeness, anomalies and quality scores of stored data (nothing is fetched)."""
        syms, tf, s, e = _series(symbols, timeframe, start, end)
        return await asyncio.to_thread(
            analyze, self.store, self.calendar, syms, tf, s, e, self.config.quality, save=save
        )

    async def update(
        self,
        symbols: list[str] | str,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        strategy: Strategy = "smart",
        start: TimeLike | None = None,
        end: TimeLike | None = None,
        feed: str | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, SymbolUpdate]:
        syms = normalize_symbols(symbols)
        s = parse_time(start, name="start") if start is not None else None
        e = parse_time(end, name="end", end=True) if end is not None else None
        return await update(
            self.bars_source(),
            self.store,
            self.calendar,
            self.config,
            syms,
            Timeframe.parse(timeframe),
            strategy=strategy,
            start=s,
            end=e,
            feed=_feed(feed),
            progress=progress,
        )

    async def repair(
        self,
        symbols: list[str] | str,
        start: TimeLike,
        end: TimeLike | None = None,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        empties: bool = True,
        feed: str | None = None,
        progress: ProgressFn | None = None,
    ) -> RepairResult:
        syms, tf, s, e = _series(symbols, timeframe, start, end)
        return await repair(
            lambda: self.router,
            self.store,
            self.calendar,
            self.config,
            syms,
            tf,
            s,
            e,
            empties=empties,
            feed=_feed(feed),
            progress=progress,
        )

    def scheduler(self, jobs: list[Job], *, concurrency: int | None = None) -> Scheduler:
        """A scheduler whose jobs update through this service and log their runs to its store."""

        async def one(job: Job, symbol: str) -> SymbolUpdate:
            with self.holding_store():
                res = await self.update([symbol], timeframe=job.timeframe, strategy=job.strategy, feed=job.feed)  # type: ignore[arg-type]
            return res[symbol]

        def log_runs(rows: list[dict[str, object]]) -> None:
            with self.holding_store():
                self.store.log_job_runs(rows)

        return Scheduler(jobs, one, log_runs, concurrency=concurrency or self.config.backfill.concurrency)

    @contextlib.contextmanager
    def holding_store(self) -> Iterator[None]:
        """Keep the store open while in use and close it when the last user is done, so that between
        scheduled runs other processes (``marketpipe store runs``, a backfill) can open the file."""
        self._store_users += 1
        try:
            yield
        finally:
            self._store_users -= 1
            if self._store_users == 0 and self._store is not None and self._owns_store:
                self._store.close()
                self._store = None

    async def bars(
        self,
        symbols: list[str] | str,
        start: TimeLike,
        end: TimeLike | None = None,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        feed: str | None = None,
        fetch: bool = True,
        source: str | None = None,
    ) -> pl.DataFrame:
        """Bars for ``[start, end)``: from the store where covered, otherwise fetched, checked, stored.

        A range the ledger covers (by any provider) is read without building a provider, so reading
        what is already held needs no credentials; only a gap leads to a backfill, which plans it.
        ``source="parquet://PATH"`` or ``"s3://BUCKET/prefix"`` reads the Parquet cold tier written by
        ``marketpipe export`` instead (nothing fetched, no store opened): the same frame a store read gives."""
        syms, tf, s, e = _series(symbols, timeframe, start, end)
        if source is not None:
            url = validate_dataset_url(source)
            return await asyncio.to_thread(read_dataset, url, self.config, syms, tf, s, e, env=self._env)
        if not fetch:
            return await asyncio.to_thread(self._stored().read_bars, syms, str(tf), s, e)
        if any(missing_ranges(self.store, syms, tf, s, e, provider=None, feed=None).values()):
            await self.backfill(syms, s, e, timeframe=tf, feed=feed)
        return await asyncio.to_thread(self.store.read_bars, syms, str(tf), s, e)

    # --- latest values, snapshots, historical ticks: the first provider that serves them and answers ---

    async def latest_served(
        self, kind: LatestKind, symbols: list[str] | str, *, feed: str | None = None
    ) -> Served[dict[str, Any]]:
        """Latest trade / quote / minute bar per symbol, with the provider that served them and the
        attempts before it. A refused request (bad parameters, unknown symbol) is not failed over."""
        syms = normalize_symbols(symbols)
        key = f"latest_{kind}"

        async def call(p: BarsProvider) -> dict[str, Any]:
            f = feed_for(p, key, feed)
            if kind == "trade":
                return await p.latest_trades(syms, feed=f)
            if kind == "quote":
                return await p.latest_quotes(syms, feed=f)
            return await p.latest_bars(syms, feed=f)

        return await self.router.first(key, call, symbols=syms, refused=CLIENT_ERRORS)

    async def latest(self, kind: LatestKind, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Any]:
        return (await self.latest_served(kind, symbols, feed=feed)).value

    async def latest_trades(self, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Trade]:
        return await self.latest("trade", symbols, feed=feed)

    async def latest_quotes(self, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Quote]:
        return await self.latest("quote", symbols, feed=feed)

    async def latest_bars(self, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Bar]:
        return await self.latest("bar", symbols, feed=feed)

    async def latest_trade(self, symbol: str, *, feed: str | None = None) -> Trade | None:
        sym = normalize_symbols(symbol)[0]
        return (await self.latest_trades([sym], feed=feed)).get(sym)

    async def latest_quote(self, symbol: str, *, feed: str | None = None) -> Quote | None:
        sym = normalize_symbols(symbol)[0]
        return (await self.latest_quotes([sym], feed=feed)).get(sym)

    async def snapshots(self, symbols: list[str] | str, *, feed: str | None = None) -> dict[str, Snapshot]:
        syms = normalize_symbols(symbols)

        async def call(p: BarsProvider) -> dict[str, Snapshot]:
            return await p.snapshots(syms, feed=feed_for(p, "snapshot", feed))

        return (await self.router.first("snapshot", call, symbols=syms, refused=CLIENT_ERRORS)).value

    async def ticks(
        self,
        kind: TickKind,
        symbols: list[str] | str,
        start: datetime,
        end: datetime,
        *,
        feed: str | None = None,
        limit: int = 1000,
        page_token: str | None = None,
        sort: str = "asc",
    ) -> tuple[pl.DataFrame, str | None, str]:
        """One page of historical trades or quotes from the first provider that serves them:
        ``(frame, next_page_token, provider)``. The vendor's page token is passed through, so a
        continuation goes to the first candidate only (it is the same provider while that one is
        healthy): another vendor could not read the token."""
        validate_limit(limit, 1, MAX_LIMIT)
        syms = normalize_symbols(symbols)

        async def call(p: BarsProvider) -> tuple[pl.DataFrame, str | None]:
            f = feed_for(p, kind, feed)
            opened = p.iter_trades if kind == "trades" else p.iter_quotes
            pages = opened(syms, start, end, feed=f, limit=limit, sort=sort, page_token=page_token)
            try:
                page = await anext(pages, None)
            finally:
                if isinstance(pages, AsyncGenerator):
                    await pages.aclose()  # one page only: end the vendor pagination here
            return (page.frame, page.next_page_token) if page is not None else (pl.DataFrame(), None)

        served = await self.router.first(
            kind,
            call,
            start=start,
            end=end,
            symbols=syms,
            what=f"historical {kind}",
            refused=CLIENT_ERRORS,
            at_most=1 if page_token else None,
        )
        frame, token = served.value
        return frame, token, served.source

    async def aclose(self) -> None:
        if self._router is not None:
            await self._router.aclose()
        elif self._provider is not None:
            await self._provider.aclose()
        self._router = None
        if self._store is not None:
            self._store.close()
            self._store = None


class _Portal:
    """A private event loop on a daemon thread; coroutines are submitted to it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="marketpipe-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class SyncMarketData:
    """Synchronous facade over :class:`MarketData` (what ``marketpipe.bars(...)`` uses)."""

    def __init__(self, data: MarketData | None = None, **kw: Any) -> None:
        self._portal = _Portal()
        self.data = data or MarketData(**kw)

    def bars(
        self,
        symbols: list[str] | str,
        start: TimeLike,
        end: TimeLike | None = None,
        *,
        timeframe: TimeframeLike | Timeframe = "1Min",
        tz: str | None = None,
        shape: Shape = "long",
        **kw: Any,
    ) -> Any:
        """:meth:`MarketData.bars`, shaped for a notebook. ``tz``: ``None`` keeps UTC, ``"exchange"`` is
        the calendar's zone (America/New_York for XNYS), or any IANA name. ``shape``: ``"long"`` (the
        polars frame), ``"alpaca"`` (alpaca-py's ``BarSet.df``: pandas, index (symbol, timestamp), UTC
        unless ``tz``) or ``"wide"`` (``yfinance.download``'s frame: columns (Price, Ticker), exchange
        time unless ``tz``; NaN where a symbol has no bar at a time another has one: pandas' outer
        alignment, nothing filled). Both are checked before anything is read or fetched."""
        zone, sh = frame_options(tz, shape, lambda: self.data.calendar.tz)
        frame = self._portal.run(self.data.bars(symbols, start, end, timeframe=timeframe, **kw))
        return shaped(frame, Timeframe.parse(timeframe), zone, sh)

    def backfill(
        self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any
    ) -> BackfillStats:
        return self._portal.run(self.data.backfill(symbols, start, end, **kw))

    def latest_trade(self, symbol: str, **kw: Any) -> Trade | None:
        return self._portal.run(self.data.latest_trade(symbol, **kw))

    def latest_quote(self, symbol: str, **kw: Any) -> Quote | None:
        return self._portal.run(self.data.latest_quote(symbol, **kw))

    def quality(self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any) -> Any:
        return self._portal.run(self.data.quality(symbols, start, end, **kw))

    def update(self, symbols: list[str] | str, **kw: Any) -> dict[str, SymbolUpdate]:
        return self._portal.run(self.data.update(symbols, **kw))

    def repair(self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any) -> Any:
        return self._portal.run(self.data.repair(symbols, start, end, **kw))

    def snapshots(self, symbols: list[str] | str, **kw: Any) -> dict[str, Snapshot]:
        return self._portal.run(self.data.snapshots(symbols, **kw))

    def close(self) -> None:
        self._portal.run(self.data.aclose())
        self._portal.close()

    def __enter__(self) -> SyncMarketData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
