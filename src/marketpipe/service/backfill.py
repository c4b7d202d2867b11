"""Backfill: fetch what the coverage ledger says is missing, check it, store it page by page.

Plan: for each symbol, ``[start, end)`` minus the ranges the ledger already holds for this provider
and feed. Each missing interval is cut at session boundaries into chunks the calendar expects to
fit one page; chunks of different symbols over the same window are packed into one multi-symbol
request up to the page limit (the vendor's limit counts rows across symbols), because on the free
plan the requests-per-minute budget, not the CPU, is the wall.

Run: ``concurrency`` requests in flight (the provider's rate limiter paces them); pages are checked
off the event loop and handed to a single writer that commits every page — its bars, quarantined
rows, coverage and ingest-log row — atomically, all the pages queued while it committed the last
batch (up to ``WRITER_ROWS`` bars) in one transaction.
A ``kill -9`` at any moment therefore loses at most uncommitted pages, which the next run's plan
fetches again; the anti-join insert makes re-delivered rows harmless.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from marketpipe.core.calendar import ContinuousCalendar, ExchangeCalendar
from marketpipe.core.config import AnomalyConfig, Config
from marketpipe.core.errors import (
    UNSUPPORTED,
    AuthFailed,
    CircuitOpen,
    DataInvalid,
    InvalidArgument,
    InvalidRange,
    MarketpipeError,
    MissingCredentials,
    ProviderBadRequest,
    ProviderError,
    StoreError,
)
from marketpipe.core.log import get_logger
from marketpipe.core.metrics import STORE_WRITE_FAILURES
from marketpipe.core.resilience import CircuitState, counts_against_health
from marketpipe.core.timeframe import Timeframe, Unit
from marketpipe.core.timeutil import NY, utcnow
from marketpipe.providers.base import BarPage, BarsProvider, feed_for
from marketpipe.quality.anomaly import detect, quarantine_findings
from marketpipe.quality.validate import check_bars
from marketpipe.service.router import Attempt, ProviderRouter
from marketpipe.store.base import BarStore, Coverage, IngestRecord, PageWrite

log = get_logger("marketpipe.backfill")
MAX_SYMBOLS_PER_REQUEST = 200
# A commit takes the pages queued up to this many bars. Measured on the backfill bench's pages: DuckDB's
# checkpoint (run when the WAL fills, and on close) cost 0.5-0.7 us/bar more with commits of 80-250 k
# rows than with commits of ~320 k rows or more, which it writes to the file as it inserts them (the
# CPU of insert + checkpoint fell ~30 %). A crash still loses only uncommitted pages, which the next
# run's plan fetches again.
WRITER_ROWS = 320_000
FATAL = (AuthFailed, MissingCredentials)


@dataclass(frozen=True, slots=True)
class WorkUnit:
    symbols: tuple[str, ...]
    start: datetime
    end: datetime
    est_rows: int


@dataclass
class BackfillStats:
    units_total: int = 0
    units_done: int = 0
    est_rows: int = 0
    requests: int = 0
    pages: int = 0
    bars_received: int = 0
    bars_stored: int = 0
    bars_rejected: int = 0
    retries: int = 0
    bytes_received: int = 0
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    # symbol -> good / rejected rows received, and its exact share of stored / revised rows and anomalies
    per_symbol: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    unattributed: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # see _attribute
    rejected_by_reason: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[dict[str, object]] = field(default_factory=list)
    failovers: int = 0
    rows_by_provider: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skipped_symbols: list[str] = field(default_factory=list)  # already fully covered
    anomalies: int = 0  # findings recorded at ingest
    revised: int = 0  # rows a refresh found changed at the vendor
    circuit_waits: int = 0  # times a worker waited for an open circuit instead of failing its unit
    circuit_wait_seconds: float = 0.0  # summed over workers

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def bars_per_second(self) -> float:
        return self.bars_received / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


ProgressFn = Callable[[BackfillStats], None]


def _attribute(stats: BackfillStats, c: CheckedPage) -> None:
    """Each symbol's share of what a committed page left: ``stored``, ``revised`` and ``anomalies`` in
    ``stats.per_symbol``. The store counts a page's stored and revised rows as a whole; they belong to
    one symbol exactly when the page holds one symbol, or when every row (none) of it was stored
    (revised). A page of several symbols that was stored in part cannot be split without guessing: its
    rows go to ``stats.unattributed`` (stored, revised) instead."""
    good = {s: n for s, n in c.good_by_symbol.items() if n}
    for key, n in (("stored", c.write.stored), ("revised", c.write.revised)):
        if len(good) == 1:
            stats.per_symbol[next(iter(good))][key] += n
        elif n == sum(good.values()) or n == 0:
            for sym, k in good.items():
                stats.per_symbol[sym][key] += k if n else 0
        else:
            stats.unattributed[key] += n
    if c.write.anomalies is not None and c.write.anomalies.height:
        for sym, n in c.write.anomalies.group_by("symbol").len().iter_rows():
            stats.per_symbol[sym]["anomalies"] += n


# --- planning ----------------------------------------------------------------------------------


def _merge(intervals: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def subtract(
    start: datetime, end: datetime, covered: list[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """``[start, end)`` minus the union of ``covered``: the missing intervals, in order."""
    missing: list[tuple[datetime, datetime]] = []
    cursor = start
    for s, e in _merge(covered):
        if e <= cursor or s >= end:
            continue
        if s > cursor:
            missing.append((cursor, min(s, end)))
        cursor = max(cursor, e)
        if cursor >= end:
            break
    if cursor < end:
        missing.append((cursor, end))
    return missing


def missing_ranges(
    store: BarStore,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    provider: str | None,
    feed: str | None,
) -> dict[str, list[tuple[datetime, datetime]]]:
    """Per symbol, what the ledger lacks. ``provider``/``feed`` None: coverage by any counts."""
    cov = store.coverage(symbols, str(timeframe), start, end, provider=provider, feed=feed)
    by_symbol: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for sym, s, e in cov.select("symbol", "start", "end").iter_rows():
        by_symbol[sym].append((s, e))
    return {sym: subtract(start, end, by_symbol.get(sym, [])) for sym in symbols}


def estimate_rows(cal: ExchangeCalendar, tf: Timeframe, start: datetime, end: datetime) -> int:
    """Bars the calendar expects in ``[start, end)`` (regular hours; extended hours only add pages)."""
    continuous = isinstance(cal, ContinuousCalendar)  # crypto: 24 hours, 7 days a week
    if tf.unit is Unit.MINUTE:
        return -(-cal.regular_minutes(start, end) // tf.amount)
    if tf.unit is Unit.HOUR:
        return len(cal.sessions(start, end)) * -(-(25 if continuous else 7) // tf.amount)
    n = len(cal.sessions(start, end))
    if tf.unit is Unit.DAY:
        return n
    if tf.unit is Unit.WEEK:
        return -(-n // (7 if continuous else 5))
    return -(-n // ((28 if continuous else 21) * tf.amount))


def _ny_midnight(ts: datetime) -> datetime:
    local = ts.astimezone(NY)
    return datetime(local.year, local.month, local.day, tzinfo=NY).astimezone(UTC)


def chunk_interval(
    cal: ExchangeCalendar, tf: Timeframe, start: datetime, end: datetime, limit: int
) -> list[tuple[datetime, datetime, int]]:
    """Cut ``[start, end)`` at New York midnights (a continuous calendar's: its own) so each piece is
    expected to fit one page."""
    total = estimate_rows(cal, tf, start, end)
    if total <= limit or not tf.is_intraday:
        return [(start, end, total)]
    pieces: list[tuple[datetime, datetime, int]] = []
    cursor, acc = start, 0
    for session in cal.sessions(start, end):
        o, c = max(session.open, start), min(session.close, end)
        n = -(-int((c - o).total_seconds() // 60) // (tf.seconds // 60 or 1))
        if acc and acc + n > limit:
            cut = session.open if isinstance(cal, ContinuousCalendar) else _ny_midnight(session.open)
            if cut > cursor:
                pieces.append((cursor, cut, acc))
                cursor, acc = cut, 0
        acc += n
    pieces.append((cursor, end, acc))
    return pieces


def plan(
    store: BarStore,
    cal: ExchangeCalendar,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    provider: str | None,
    feed: str | None,
    page_limit: int = 10_000,
    refresh: bool = False,
) -> tuple[list[WorkUnit], list[str]]:
    """Work units for what is missing (everything, for a refresh), and the symbols already covered."""
    if refresh:
        missing = {sym: [(start, end)] for sym in symbols}
    else:
        missing = missing_ranges(store, symbols, timeframe, start, end, provider=provider, feed=feed)
    by_window: dict[tuple[datetime, datetime, int], list[str]] = defaultdict(list)
    done: list[str] = []
    for sym in symbols:
        if not missing[sym]:
            done.append(sym)
            continue
        for s, e in missing[sym]:
            for cs, ce, est in chunk_interval(cal, timeframe, s, e, page_limit):
                by_window[(cs, ce, est)].append(sym)
    units: list[WorkUnit] = []
    for (s, e, est), syms in sorted(by_window.items()):
        per = max(1, min(MAX_SYMBOLS_PER_REQUEST, page_limit // max(est, 1)))
        for i in range(0, len(syms), per):
            group = tuple(syms[i : i + per])
            units.append(WorkUnit(group, s, e, est * len(group)))
    return units, done


def plan_for(
    source: BarsProvider | ProviderRouter,
    store: BarStore,
    cal: ExchangeCalendar,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    feed: str | None,
    page_limit: int = 10_000,
    refresh: bool = False,
) -> tuple[list[WorkUnit], list[str]]:
    """:func:`plan` as a run from ``source`` sees it: through a router, coverage by any provider counts;
    from one provider, only its own (for its feed). The distributed coordinator plans with this too."""
    name, plan_feed = None, feed
    if not isinstance(source, ProviderRouter):
        name, plan_feed = source.name, feed or getattr(getattr(source, "config", None), "feed", None)
    return plan(
        store,
        cal,
        symbols,
        timeframe,
        start,
        end,
        provider=name,
        feed=plan_feed,
        page_limit=page_limit,
        refresh=refresh,
    )


# --- running -----------------------------------------------------------------------------------


def settings(config: Config) -> dict[str, Any]:
    """The configured keyword arguments of :func:`run_backfill` (page size, concurrency, anomaly
    rules at ingest): every caller that fetches bars passes the same ones."""
    return {
        "page_limit": config.backfill.page_limit,
        "concurrency": config.backfill.concurrency,
        "anomaly": config.quality.anomaly,
    }


@dataclass(slots=True)
class CheckedPage:
    """A page ready for the store, with the counts the run summary needs (computed here, in the
    worker thread, so the writer only adds numbers)."""

    write: PageWrite
    good_by_symbol: dict[str, int]
    rejected_by_symbol: dict[str, int]
    rejected_by_reason: dict[str, int]


def check_page(
    page: BarPage,
    unit_known: dict[str, datetime],
    provider: str,
    now: datetime,
    anomaly: AnomalyConfig | None = None,
    refresh: bool = False,
    day_tz: str = "America/New_York",
) -> CheckedPage:
    """Check one page and describe everything it leaves in the store. Runs in a worker thread.
    ``day_tz``: the calendar's zone, whose midnight stamps daily bars (UTC for crypto pairs)."""
    assert page.timeframe is not None
    checked = check_bars(
        page.frame,
        timeframe=page.timeframe,
        start=page.start,
        end=page.end,
        now=now,
        request_id=page.request_id,
        day_tz=day_tz,
    )
    findings = None
    if anomaly is not None and checked.good.height > 1:
        findings = detect(checked.good, page.timeframe, anomaly)
        if anomaly.on_high == "quarantine" and findings.height:
            checked = quarantine_findings(checked, findings, page.request_id)
    rows_by_symbol = dict(page.frame.group_by("symbol").len().iter_rows()) if page.frame.height else {}
    coverage: list[Coverage] = []
    for sym, through in page.complete_through.items():
        since = unit_known.get(sym, page.start)
        if through > since:
            coverage.append(
                Coverage(
                    symbol=sym,
                    timeframe=str(page.timeframe),
                    provider=provider,
                    source=page.source,
                    feed=page.feed,
                    start=since,
                    end=through,
                    rows=int(rows_by_symbol.get(sym, 0)),
                    request_id=page.request_id,
                    fetched_at=page.fetched_at,
                )
            )
            unit_known[sym] = through
    write = PageWrite(
        bars=checked.good,
        quarantine=checked.quarantine,
        anomalies=findings,
        refresh=refresh,
        coverage=coverage,
        ingest=IngestRecord(
            provider=provider,
            source=page.source,
            feed=page.feed,
            kind="bars",
            timeframe=str(page.timeframe),
            symbols=page.symbols,
            start=page.start,
            end=page.end,
            request_id=page.request_id,
            page=page.page_number,
            fetched_at=page.fetched_at,
            rows_received=page.frame.height,
            rows_rejected=checked.rejected,
        ),
    )
    if checked.good.height == page.frame.height:  # nothing rejected: the same rows, counted once
        good = dict(rows_by_symbol)
    else:
        good = dict(checked.good.group_by("symbol").len().iter_rows()) if checked.good.height else {}
    q = checked.quarantine
    rejected = {sym or "?": n for sym, n in q.group_by("symbol").len().iter_rows()} if q.height else {}
    return CheckedPage(write, good, rejected, checked.counts)


async def run_backfill(
    provider: BarsProvider | ProviderRouter,
    store: BarStore,
    cal: ExchangeCalendar,
    symbols: list[str],
    timeframe: Timeframe,
    start: datetime,
    end: datetime,
    *,
    feed: str | None = None,
    page_limit: int = 10_000,
    concurrency: int = 4,
    progress: ProgressFn | None = None,
    now: Callable[[], datetime] = utcnow,
    anomaly: AnomalyConfig | None = None,
    refresh: bool = False,
    circuit_waits: int = 0,
) -> BackfillStats:
    """Backfill from one provider, or through a router with failover.

    ``anomaly``: run anomaly detection on every page (findings stored with the page; high severity
    quarantined when the config says so). ``refresh``: fetch the whole range again whatever the
    ledger holds; changed rows are stored as revisions.

    With a router, a unit that fails on one provider mid-way continues on the next from where each
    symbol's committed pages end (partial-range failover); every page's rows carry the source that
    served them and the ledger records which provider covered which range. Coverage by any provider
    counts when planning. With a single provider, only its own coverage (for the feed) counts and
    bad credentials or a rejected request stop the run.

    ``circuit_waits`` (``[backfill] circuit_waits``; 0: never wait): a circuit that opens mid-run does
    not fail the units it stops. A unit fails over to the next candidate first (a router leaves out
    providers whose circuit is open, and ``CIRCUIT_OPEN`` is a failover reason like any provider
    error); when no candidate is left — one provider, or every circuit open — the worker waits until
    a circuit is half-open and continues the unit from where its committed pages end. While
    half-open only the trial call reaches the vendor; the other workers wait for its verdict. Each
    time a provider's circuit opens counts once against ``circuit_waits``; past that, units fail with
    ``CIRCUIT_OPEN`` (or ``ALL_PROVIDERS_FAILED``) as before.

    How a run ends early: a failed store write (disk full, ...) ends it at once with ``STORE_ERROR``
    — the fetchers are cancelled, pages committed before stay, nothing of the failed batch is kept.
    A fatal provider error, or cancellation (Ctrl-C, SIGTERM), stops every worker at once (none
    takes another unit; requests in flight and retries sleeping in backoff are cancelled) and lets
    the writer commit the pages already checked, then re-raises. Either way the ledger claims only
    what the store holds, and the next run fetches the rest.
    """
    if not symbols:
        raise InvalidArgument("no symbols given", details={"parameter": "symbols"})
    if end <= start:
        raise InvalidRange(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    end = min(end, now())
    if end <= start:
        raise InvalidRange("the whole range lies in the future", details={"start": start.isoformat()})
    cal.check_bounds(start, end)

    router = provider if isinstance(provider, ProviderRouter) else None
    sources: list[BarsProvider] = router.providers if router else [provider]  # type: ignore[list-item]
    units, done = plan_for(
        provider, store, cal, symbols, timeframe, start, end, feed=feed, page_limit=page_limit, refresh=refresh
    )

    stats = BackfillStats()
    stats.units_total, stats.skipped_symbols = len(units), done
    stats.est_rows = sum(u.est_rows for u in units)
    log.info("backfill_plan", units=len(units), est_rows=stats.est_rows, covered=len(done))
    if progress:
        progress(stats)
    if not units:
        stats.finished = time.perf_counter()
        return stats

    queue: asyncio.Queue[WorkUnit] = asyncio.Queue()
    for u in units:
        queue.put_nowait(u)
    # room for a commit's worth of pages, so the fetchers do not stop while the writer commits
    pages: asyncio.Queue[CheckedPage | None] = asyncio.Queue(
        maxsize=max(4, concurrency * 2, min(64, WRITER_ROWS // max(page_limit, 1) + concurrency))
    )
    retries_before = {p.name: p.resilience.retries for p in sources}
    opened_before = {p.name: p.resilience.breaker.opened_count for p in sources}
    stop = asyncio.Event()  # the run ends early: no worker takes another unit

    async def fetch(
        source: BarsProvider, syms: list[str], from_: datetime, unit: WorkUnit, need: dict[str, datetime]
    ) -> None:
        known = dict.fromkeys(syms, from_)
        fd = feed_for(source, "bars", feed)
        async for page in source.iter_bars(syms, timeframe, from_, unit.end, feed=fd, limit=page_limit):
            stats.requests += 1
            stats.pages += 1
            stats.bytes_received += page.nbytes
            stats.rows_by_provider[source.name] += page.frame.height
            write = await asyncio.to_thread(check_page, page, known, source.name, now(), anomaly, refresh, cal.tz)
            for sym, through in page.complete_through.items():
                if through > need.get(sym, from_):
                    need[sym] = through
            await pages.put(write)

    async def fetch_pending(source: BarsProvider, unit: WorkUnit, need: dict[str, datetime]) -> None:
        """Fetch what the unit still lacks: each symbol from where its pages handed to the writer end."""
        by_start: dict[datetime, list[str]] = defaultdict(list)
        for sym in unit.symbols:
            if need[sym] < unit.end:
                by_start[need[sym]].append(sym)
        for from_, syms in sorted(by_start.items()):
            await fetch(source, syms, from_, unit, need)

    def may_wait(p: BarsProvider) -> bool:
        """``p``'s circuit stops calls now, and the run has not yet waited out ``circuit_waits`` openings."""
        breaker = p.resilience.breaker
        opened = breaker.opened_count - opened_before[p.name]
        return breaker.state is not CircuitState.CLOSED and opened <= circuit_waits

    async def wait_for_circuit(blocked: list[BarsProvider], unit: WorkUnit) -> None:
        """Until the first of ``blocked`` lets a call go (half-open, or closed again by another's trial)."""
        began = time.perf_counter()
        stats.circuit_waits += 1
        retry_in = [p.resilience.breaker.retry_in() for p in blocked]
        log.info(
            "backfill_circuit_wait",
            providers=[p.name for p in blocked],
            symbols=list(unit.symbols),
            retry_in=[None if r is None else round(r, 3) for r in retry_in],
        )
        waits = [asyncio.create_task(p.resilience.breaker.wait_until_allowed()) for p in blocked]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            stats.circuit_wait_seconds += time.perf_counter() - began

    async def one_provider(unit: WorkUnit, need: dict[str, datetime]) -> None:
        source = sources[0]
        while True:
            try:
                await fetch_pending(source, unit, need)
                return
            except ProviderError as exc:
                circuit = isinstance(exc, CircuitOpen) or counts_against_health(exc)
                if not (circuit and may_wait(source)):
                    raise
                log.warning("backfill_circuit_open", provider=source.name, code=exc.code, symbols=list(unit.symbols))
            await wait_for_circuit([source], unit)

    async def failover(unit: WorkUnit, need: dict[str, datetime]) -> None:
        """The unit through the router's one failover path: each candidate continues from where the
        unit's pages handed to the writer end (``need``). When every candidate has failed or was
        left out and open circuits are why, wait for the first to let a call go and run the
        candidates again."""
        assert router is not None

        def pending() -> list[str]:
            return [s for s in unit.symbols if need[s] < unit.end]

        async def again(attempts: list[Attempt]) -> bool:
            unsupported = {a.provider for a in attempts if a.code == UNSUPPORTED}
            blocked = [p for p in sources if p.name not in unsupported and may_wait(p)]
            if not blocked:
                return False
            await wait_for_circuit(blocked, unit)
            return True

        def counted(p: BarsProvider, exc: ProviderError) -> None:
            stats.failovers += 1

        await router.first(
            "bars",
            lambda source: fetch_pending(source, unit, need),
            timeframe=timeframe,
            start=unit.start,
            end=unit.end,
            symbols=pending,
            again=again,
            on_failure=counted,
        )

    async def worker() -> None:
        while not stop.is_set():
            try:
                unit = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            need = dict.fromkeys(unit.symbols, unit.start)
            try:
                if router is None:
                    await one_provider(unit, need)
                else:
                    await failover(unit, need)
            except FATAL:
                if router is None:
                    raise
            except (MarketpipeError, pl.exceptions.PolarsError) as exc:
                code = exc.code if isinstance(exc, MarketpipeError) else DataInvalid.code
                err: dict[str, object] = {
                    "symbols": list(unit.symbols),
                    "start": unit.start.isoformat(),
                    "end": unit.end.isoformat(),
                    "code": code,
                    "message": str(exc),
                }
                if isinstance(exc, MarketpipeError) and "attempts" in exc.details:
                    err["attempts"] = exc.details["attempts"]
                stats.errors.append(err)
                log.warning("backfill_unit_failed", symbols=list(unit.symbols), code=code, error=str(exc))
                if router is None and isinstance(exc, ProviderBadRequest | InvalidArgument):
                    # The same parameters would be rejected for every unit: stop early.
                    raise
            finally:
                stats.units_done += 1
                stats.retries = sum(p.resilience.retries - retries_before[p.name] for p in sources)
                if progress:
                    progress(stats)

    async def run_workers() -> None:
        # A TaskGroup cancels the other workers as soon as one raises (fatal errors only: the
        # worker records and skips everything else).
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, min(concurrency, len(units)))):
                tg.create_task(worker())
        await pages.put(None)

    async def writer() -> None:
        # Group commit: each transaction takes every page checked while the last one committed, up to
        # WRITER_ROWS bars (a writer that keeps pace commits page by page).
        while True:
            first = await pages.get()
            if first is None:
                return
            batch, rows = [first], first.write.ingest.rows_received
            while rows < WRITER_ROWS:
                try:
                    nxt = pages.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    await _commit(batch)
                    return
                batch.append(nxt)
                rows += nxt.write.ingest.rows_received
            await _commit(batch)

    async def _commit(batch: list[CheckedPage]) -> None:
        try:
            await asyncio.to_thread(store.write_pages, [c.write for c in batch])
        except StoreError as exc:
            raise _write_failed(exc, store, len(batch), stats.bars_stored) from exc
        except OSError as exc:  # a store that does not wrap its own I/O errors
            raise _write_failed(StoreError(str(exc)), store, len(batch), stats.bars_stored) from exc
        for c in batch:
            stats.bars_received += c.write.ingest.rows_received
            stats.bars_stored += c.write.stored
            stats.bars_rejected += c.write.ingest.rows_rejected
            stats.revised += c.write.revised
            if c.write.anomalies is not None:
                stats.anomalies += c.write.anomalies.height
            for sym, n in c.good_by_symbol.items():
                stats.per_symbol[sym]["good"] += n
            _attribute(stats, c)
            for sym, n in c.rejected_by_symbol.items():
                stats.per_symbol[sym]["rejected"] += n
            for reason, n in c.rejected_by_reason.items():
                stats.rejected_by_reason[reason] += n
        if progress:
            progress(stats)

    writer_task = asyncio.create_task(writer(), name="backfill-writer")
    workers_task = asyncio.create_task(run_workers(), name="backfill-workers")
    try:
        await asyncio.wait({writer_task, workers_task}, return_when=asyncio.FIRST_COMPLETED)
        if not workers_task.done():
            # The writer ends before the workers only when a write failed (it waits for the workers'
            # end-of-pages mark otherwise): nothing more can be kept, so the fetchers — perhaps blocked
            # handing it pages — are stopped at once and the store's error ends the run.
            stop.set()
            await _stop(workers_task)
            writer_task.result()
            raise StoreError("the store writer ended before the last page", details={"path": _path(store)})
        try:
            workers_task.result()
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        await writer_task
    except BaseException:
        # Failure or cancellation: one path that ends every task. No worker takes another unit, the
        # requests in flight and the retries sleeping in backoff are cancelled, and the writer commits
        # what was already checked (at most the queue's few pages; a second cancellation stops it too).
        stop.set()
        await _stop(workers_task)
        await _drain_writer(writer_task, pages)
        raise
    finally:
        stats.finished = time.perf_counter()
        if progress:
            progress(stats)
    return stats


def _path(store: BarStore) -> str:
    return str(getattr(store, "path", "?"))


def _write_failed(exc: StoreError, store: BarStore, pages: int, kept: int) -> StoreError:
    """The error that ends a run whose store write failed: where, why, what was kept, what to do."""
    STORE_WRITE_FAILURES.labels("backfill").inc()
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    text = str(getattr(cause, "message", None) or cause)
    no_space = "no space left on device" in text.lower() or getattr(cause, "errno", None) == errno.ENOSPC
    path = str(exc.details.get("path") or _path(store))
    reason = "No space left on device" if no_space else text
    when = "when there is space" if no_space else "once the store can be written"
    log.error("backfill_store_failed", path=path, pages=pages, bars_kept=kept, error=text)
    return StoreError(
        f"could not write to the store at {path}: {reason}; nothing of the failed {pages} page(s) was kept, "
        f"{kept:,} bars committed before it are kept; run the same command again {when} to fetch the rest",
        details={"path": path, "cause": text, "bars_kept": kept},
    )


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has ended (its own error, if any, is not this caller's)."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _drain_writer(writer_task: asyncio.Task[None], pages: asyncio.Queue[CheckedPage | None]) -> None:
    """Once no worker is left: let the writer commit the pages already checked (each complete and
    correct), then end. The caller re-raises what stopped the run; a write failing now is logged by
    the writer. Cancelled while waiting (a second Ctrl-C), the writer is cancelled with it."""
    if writer_task.done():
        return
    try:
        await pages.put(None)  # the writer is alive and nobody else puts: there is room soon
        await asyncio.wait({writer_task})
    except asyncio.CancelledError:
        await _stop(writer_task)
        raise


__all__ = ["BackfillStats", "WorkUnit", "missing_ranges", "plan", "plan_for", "run_backfill", "subtract"]
