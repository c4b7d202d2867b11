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
from datetime import date, datetime
from typing import Any, Literal, TypeVar, cast
from zoneinfo import ZoneInfo

import polars as pl

from marketpipe.core import events
from marketpipe.core.calendar import ContinuousCalendar, ExchangeCalendar, calendar_for, get_calendar
from marketpipe.core.config import Config, load_config
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import Bar, Quote, Snapshot, Trade, is_crypto, normalize_symbols
from marketpipe.core.timeframe import Timeframe, TimeframeLike
from marketpipe.core.timeutil import TimeInput, parse_range, parse_time, utcnow
from marketpipe.core.validation import validate_dataset_url, validate_limit
from marketpipe.providers.alpaca_crypto import AlpacaCryptoProvider
from marketpipe.providers.base import BarsProvider, feed_for
from marketpipe.quality.adjust import parse_adjustment, scale_steps
from marketpipe.service.actions import ATTR as ADJUSTMENT_ATTR
from marketpipe.service.actions import Actions, adjustment_of, parse_as_of, validate_types
from marketpipe.service.backfill import BackfillStats, ProgressFn, missing_ranges, run_backfill, settings
from marketpipe.service.crypto import CryptoData
from marketpipe.service.export import read_dataset
from marketpipe.service.frames import Shape, frame_options, shaped
from marketpipe.service.maintain import RepairResult, Strategy, SymbolUpdate, repair, update
from marketpipe.service.options import OptionsData
from marketpipe.service.quality import SeriesQuality, analyze
from marketpipe.service.router import CLIENT_ERRORS, ProviderRouter, Served, build_router
from marketpipe.service.scheduler import Job, Scheduler
from marketpipe.store import open_store
from marketpipe.store.base import ScaledBarStore, Store
from marketpipe.wire.alpaca_crypto import validate_location
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


def _equities_only(syms: list[str], what: str) -> list[str]:
    """``syms`` when none is a crypto pair; else INVALID_ARGUMENT saying where pairs are served (the
    stock records hold whole-share sizes, a coin's fractions would not fit)."""
    pairs = [s for s in syms if is_crypto(s)]
    if pairs:
        raise InvalidArgument(
            f"{what} of crypto pairs ({', '.join(pairs)}) are served by MarketData.crypto "
            "(latest, snapshots, history) and the gateway's /v1beta3/crypto routes, with fractional sizes",
            details={"param": "symbols", "symbols": pairs},
        )
    return syms


equities_only = _equities_only  # for the Alpaca-compatible stock routes: their records are the stock ones


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
        self._users_lock = threading.Lock()  # the count and the release timer, from any thread
        self._release: threading.Timer | None = None
        self._provider = provider
        self._router: ProviderRouter | None = None
        self._crypto: CryptoData | None = None
        self._env = env
        self._pinned: str | None = None
        self._actions: Actions | None = None
        self.events_on_bus = False  # a gateway's bus publisher relays core.events (set by the gateway)
        self._options: OptionsData | None = None

    @property
    def options(self) -> OptionsData:
        """The options service (Alpaca's options data, checked; built on first use)."""
        if self._options is None:
            self._options = OptionsData(
                self.config, env=self._env, store=lambda: self.store, stored=lambda: self._stored()
            )
        return self._options

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
    def crypto(self) -> CryptoData:
        """Crypto pairs (``BTC/USD``): bars, trades, quotes, latest values, order books, snapshots."""
        if self._crypto is None:
            self._crypto = CryptoData(self.config, env=self._env)
        return self._crypto

    def crypto_source(self, provider: str | None = None) -> AlpacaCryptoProvider:
        """Where crypto bars are fetched for the store: Alpaca's crypto data, the one vendor in
        marketpipe that serves pairs (so pairs have no failover); another ``provider`` is INVALID_ARGUMENT."""
        if provider not in (None, AlpacaCryptoProvider.name):
            raise InvalidArgument(
                f"crypto pairs are served by alpaca only, not {provider!r} (no other vendor in marketpipe has them)",
                details={"param": "provider"},
            )
        return self.crypto.provider

    def _crypto_bars_source(self, provider: str | None = None) -> BarsProvider:
        """:meth:`crypto_source` as the backfill engine's source: a bars-only provider (its
        ``supports`` refuses every other kind, so their methods, which it lacks, are never called)."""
        return cast(BarsProvider, self.crypto_source(provider))

    def fetching(
        self, symbols: list[str], provider: str | None, feed: str | None
    ) -> tuple[BarsProvider | ProviderRouter, str | None]:
        """The bars source of these symbols' asset class and the feed to plan with: for pairs the
        crypto provider and its location (the ledger's feed of a pair), for equities :meth:`bars_source`."""
        if isinstance(self.calendar_of(symbols), ContinuousCalendar):
            source = self._crypto_bars_source(provider)
            return source, validate_location(feed, "feed") if feed else self.crypto.provider.location
        return self.bars_source(provider), feed

    @property
    def calendar(self) -> ExchangeCalendar:
        """The equities' exchange calendar (config ``calendar``)."""
        return get_calendar(self.config.calendar)

    def calendar_of(self, symbols: list[str]) -> ExchangeCalendar:
        """The calendar of these symbols' asset class: continuous for crypto pairs, the exchange
        calendar for equities. One request holds one asset class (INVALID_ARGUMENT otherwise), since
        what is expected, and when, differs between them."""
        kinds = {is_crypto(s) for s in symbols}
        if len(kinds) > 1:
            raise InvalidArgument(
                "crypto pairs and equities in one request: ask for them separately "
                f"(crypto: {', '.join(s for s in symbols if is_crypto(s))})",
                details={"param": "symbols"},
            )
        if kinds == {True}:
            return calendar_for(symbols[0], equities=self.config.calendar, crypto_daily=self.config.crypto_daily_bars)
        return self.calendar

    def pairs_checked(self, symbols: list[str], parts: frozenset[str], as_of: object) -> bool:
        """Whether ``symbols`` are crypto pairs (stored and fetched like stocks, on the 24/7 calendar);
        an adjustment or ``as_of`` for pairs is INVALID_ARGUMENT: they have no corporate actions."""
        if not isinstance(self.calendar_of(symbols), ContinuousCalendar):
            return False
        if parts or as_of is not None:
            raise InvalidArgument(
                "adjustment and as_of apply to stocks: crypto pairs have no corporate actions",
                details={"parameter": "adjustment" if parts else "as_of"},
            )
        return True

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
        parsed): from ``provider`` alone when named, else through the router with failover. Crypto
        pairs are fetched from Alpaca's crypto data (``feed``: the location) and planned on the 24/7
        calendar; they are stored in the crypto tables with their fractional volumes."""
        source, feed = self.fetching(symbols, provider, feed)
        return await run_backfill(
            source,
            self.store,
            self.calendar_of(symbols),
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
            analyze, self.store, self.calendar_of(syms), syms, tf, s, e, self.config.quality, save=save
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
        source, fd = self.fetching(syms, None, _feed(feed))
        return await update(
            source,
            self.store,
            self.calendar_of(syms),
            self.config,
            syms,
            Timeframe.parse(timeframe),
            strategy=strategy,
            start=s,
            end=e,
            feed=fd,
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
        pairs = isinstance(self.calendar_of(syms), ContinuousCalendar)
        return await repair(
            (lambda: ProviderRouter([self._crypto_bars_source()])) if pairs else (lambda: self.router),
            self.store,
            self.calendar_of(syms),
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
    def holding_store(self, linger: float = 0.0) -> Iterator[None]:
        """Keep the store open while in use and close it when the last user is done, so that between
        scheduled runs other processes (``marketpipe store runs``, a backfill) can open the file.
        ``linger``: close it only after that many idle seconds, so calls that follow each other (a loop
        of ``mp.bars``) do not each pay for opening the file (~10-20 ms)."""
        with self._users_lock:
            self._store_users += 1
            if self._release is not None:
                self._release.cancel()
                self._release = None
        try:
            yield
        finally:
            with self._users_lock:
                self._store_users -= 1
                if self._store_users == 0:
                    if linger > 0:
                        self._release = threading.Timer(linger, self._release_idle)
                        self._release.daemon = True
                        self._release.start()
                    else:
                        self._close_owned_store()

    def _release_idle(self) -> None:
        with self._users_lock:
            if self._store_users == 0 and self._release is not None:
                self._release = None
                self._close_owned_store()

    def _close_owned_store(self) -> None:
        if self._store is not None and self._owns_store:
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
        adjustment: str = "raw",
        as_of: TimeLike | None = None,
    ) -> pl.DataFrame:
        """Bars for ``[start, end)``: from the store where covered, otherwise fetched, checked, stored.

        A range the ledger covers (by any provider) is read without building a provider, so reading
        what is already held needs no credentials; only a gap leads to a backfill, which plans it.
        ``source="parquet://PATH"`` or ``"s3://BUCKET/prefix"`` reads the Parquet cold tier written by
        ``marketpipe export`` instead (nothing fetched, no store opened): the same frame a store read gives.

        ``adjustment`` (``raw|split|dividend|spin-off|all``, Alpaca's values, comma-combinable): raw bars
        adjusted on read for corporate actions (``service/actions``), with the actions known by
        ``as_of`` (a day; default: everything known now). An adjusted frame carries what was
        applied: :func:`marketpipe.service.actions.adjustment_of`. Both are checked before anything
        is read or fetched."""
        parts = parse_adjustment(adjustment)
        known = parse_as_of(as_of)
        syms, tf, s, e = _series(symbols, timeframe, start, end)
        if self.pairs_checked(syms, parts, known) and feed:
            validate_location(feed, "feed")  # a pair's feed names the vendor location (us, eu-1, ...)
        if source is not None:  # the cold tier holds raw bars; an adjustment applies to them the same way
            url = validate_dataset_url(source)
            frame = await asyncio.to_thread(read_dataset, url, self.config, syms, tf, s, e, env=self._env)
        else:
            if fetch and any(missing_ranges(self.store, syms, tf, s, e, provider=None, feed=None).values()):
                await self.backfill(syms, s, e, timeframe=tf, feed=feed)
            store = self.store if fetch else self._stored()
            if parts and len(syms) == 1 and isinstance(store, ScaledBarStore):
                # one symbol from a store that scales while it reads: the factors first, then one read
                tables, info = await self.actions.plan(syms, s, parts, adjustment, as_of=known, fetch=fetch)
                steps = scale_steps(tables[syms[0]])
                if steps:
                    frame = await asyncio.to_thread(store.read_bars_scaled, syms[0], str(tf), s, e, steps)
                else:
                    frame = await asyncio.to_thread(store.read_bars, syms, str(tf), s, e)
                setattr(frame, ADJUSTMENT_ATTR, info)
                return frame
            frame = await asyncio.to_thread(store.read_bars, syms, str(tf), s, e)
        if not parts and known is None:
            return frame
        frame, info = await self.actions.adjust(frame, syms, s, parts, adjustment, as_of=known, fetch=fetch)
        setattr(frame, ADJUSTMENT_ATTR, info)
        return frame

    @property
    def actions(self) -> Actions:
        """Corporate actions: fetch, store, adjust (:mod:`marketpipe.service.actions`)."""
        if self._actions is None:

            async def daily(symbol: str, lo: date, hi: date, fetch: bool) -> pl.DataFrame:
                return await self.bars([symbol], lo, hi, timeframe="1Day", fetch=fetch)

            self._actions = Actions(lambda: self.store, lambda: self.router, daily, publish=self._publish_events)
        return self._actions

    async def _publish_events(self, evs: list[events.Event]) -> None:
        """New corporate actions onto the bus when ``[bus]`` is configured, unless a gateway's publisher
        relays every ``core.events`` event already (``events_on_bus``); de-duplicated by ``Nats-Msg-Id``."""
        if self.events_on_bus or not self.config.bus.target():
            return
        from marketpipe.bus.client import publish_events

        await publish_events(self.config.bus, evs)

    async def corporate_actions(
        self,
        symbols: list[str] | str,
        start: TimeLike,
        end: TimeLike | None = None,
        *,
        types: list[str] | str | None = None,
        as_of: TimeLike | None = None,
        fetch: bool = True,
        provider: str | None = None,
        refresh: bool = False,
    ) -> pl.DataFrame:
        """Corporate actions of ``symbols`` whose adjustment date (ex, else effective, else process
        date) lies in ``[start, end]`` (days; end default today), newest version each, fetched
        first where the actions ledger lacks them (``refresh``: fetched again, so corrections and
        withdrawals are seen; withdrawn actions are left out); ``types`` narrows (canonical names),
        ``as_of`` keeps those known by that day, ``provider`` reads (and fetches) one vendor's only."""
        syms = normalize_symbols(symbols)
        zone = ZoneInfo(str(self.calendar.tz))
        s = parse_time(start, name="start").astimezone(zone).date()
        e = parse_time(end, name="end").astimezone(zone).date() if end is not None else None
        kinds = validate_types(types.split(",") if isinstance(types, str) else types)
        e = e or utcnow().astimezone(zone).date()
        if e < s:
            raise InvalidArgument("end must not be before start", details={"parameter": "end"})
        return await self.actions.read(
            syms, s, e, types=kinds, as_of=parse_as_of(as_of), fetch=fetch, provider=provider, refresh=refresh
        )

    # --- latest values, snapshots, historical ticks: the first provider that serves them and answers ---

    async def latest_served(
        self, kind: LatestKind, symbols: list[str] | str, *, feed: str | None = None
    ) -> Served[dict[str, Any]]:
        """Latest trade / quote / minute bar per symbol, with the provider that served them and the
        attempts before it. A refused request (bad parameters, unknown symbol) is not failed over."""
        syms = _equities_only(normalize_symbols(symbols), f"latest {kind}s")
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
        """Latest values per symbol; crypto pairs from :attr:`crypto` (``feed`` is their location), the
        rest from the first stock provider that serves them."""
        syms = normalize_symbols(symbols)
        stocks, pairs = [s for s in syms if not is_crypto(s)], [s for s in syms if is_crypto(s)]
        out = (await self.latest_served(kind, stocks, feed=feed)).value if stocks else {}
        if pairs:
            out = {**out, **await self.crypto.latest_records(kind, pairs, location=feed)}
        return out

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
        """Snapshots per symbol; crypto pairs from :attr:`crypto` (``feed``: their location)."""
        every = normalize_symbols(symbols)
        pairs = [s for s in every if is_crypto(s)]
        crypto = await self.crypto.snapshot_records(pairs, location=feed) if pairs else {}
        syms = [s for s in every if not is_crypto(s)]
        if not syms:
            return crypto
        return {**await self._stock_snapshots(syms, feed=feed), **crypto}

    async def _stock_snapshots(self, syms: list[str], *, feed: str | None = None) -> dict[str, Snapshot]:

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
        syms = _equities_only(normalize_symbols(symbols), f"historical {kind}")

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
        with self._users_lock:
            if self._release is not None:
                self._release.cancel()
                self._release = None
        if self._options is not None:
            await self._options.aclose()
            self._options = None
        if self._crypto is not None:
            await self._crypto.aclose()
            self._crypto = None
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
    """Synchronous facade over :class:`MarketData` (what ``marketpipe.bars(...)`` uses).

    Each call holds the store while it runs and for ``STORE_LINGER_SECONDS`` after
    (``MarketData.holding_store``): a notebook that has called ``mp.bars`` does not keep the file
    locked, so ``marketpipe serve``, a backfill or another notebook can open it between calls, while
    calls in a loop keep it open. A store passed in (``store=``) stays open: its owner closes it."""

    STORE_LINGER_SECONDS = 0.25  # well below a new process's start-up (a CLI command takes longer to reach its store)

    def __init__(self, data: MarketData | None = None, **kw: Any) -> None:
        self._portal = _Portal()
        self.data = data or MarketData(**kw)

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        with self.data.holding_store(linger=self.STORE_LINGER_SECONDS):
            return self._portal.run(call)

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
        zone, sh = frame_options(tz, shape, lambda: self.data.calendar_of(normalize_symbols(symbols)).tz)
        frame = self._run(self.data.bars(symbols, start, end, timeframe=timeframe, **kw))
        out = shaped(frame, Timeframe.parse(timeframe), zone, sh)
        info = adjustment_of(frame)
        if info is not None:  # the shaped frame says what it was adjusted with, too
            if hasattr(out, "attrs"):
                out.attrs[ADJUSTMENT_ATTR] = info
            else:
                setattr(out, ADJUSTMENT_ATTR, info)
        return out

    def corporate_actions(
        self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any
    ) -> pl.DataFrame:
        return self._run(self.data.corporate_actions(symbols, start, end, **kw))

    def backfill(
        self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any
    ) -> BackfillStats:
        return self._run(self.data.backfill(symbols, start, end, **kw))

    def latest_trade(self, symbol: str, **kw: Any) -> Trade | None:
        return self._run(self.data.latest_trade(symbol, **kw))

    def latest_quote(self, symbol: str, **kw: Any) -> Quote | None:
        return self._run(self.data.latest_quote(symbol, **kw))

    def quality(self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any) -> Any:
        return self._run(self.data.quality(symbols, start, end, **kw))

    def update(self, symbols: list[str] | str, **kw: Any) -> dict[str, SymbolUpdate]:
        return self._run(self.data.update(symbols, **kw))

    def repair(self, symbols: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any) -> Any:
        return self._run(self.data.repair(symbols, start, end, **kw))

    def snapshots(self, symbols: list[str] | str, **kw: Any) -> dict[str, Snapshot]:
        return self._run(self.data.snapshots(symbols, **kw))

    def option_chain(self, underlying: str, **kw: Any) -> pl.DataFrame:
        return self._run(self.data.options.chain(underlying, **kw))

    def option_snapshots(self, contracts: list[str] | str, **kw: Any) -> pl.DataFrame:
        return self._run(self.data.options.snapshots(contracts, **kw))

    def option_quotes(self, contracts: list[str] | str, **kw: Any) -> pl.DataFrame:
        return self._run(self.data.options.latest_quotes(contracts, **kw))

    def option_bars(
        self, contracts: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any
    ) -> pl.DataFrame:
        return self._run(self.data.options.bars(contracts, start, end, **kw))

    def option_trades(
        self, contracts: list[str] | str, start: TimeLike, end: TimeLike | None = None, **kw: Any
    ) -> pl.DataFrame:
        return self._run(self.data.options.trades(contracts, start, end, **kw))

    def option_contracts(self, underlyings: list[str] | str, **kw: Any) -> pl.DataFrame:
        return self._run(self.data.options.contracts(underlyings, **kw))

    def option_chain_history(self, underlying: str | None = None, **kw: Any) -> pl.DataFrame:
        return self._run(self.data.options.history(underlying, **kw))

    def option_quarantine(self, underlying: str | None = None, **kw: Any) -> pl.DataFrame:
        return self._run(self.data.options.quarantined(underlying, **kw))

    def close(self) -> None:
        self._portal.run(self.data.aclose())
        self._portal.close()

    def __enter__(self) -> SyncMarketData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
