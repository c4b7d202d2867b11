"""How a backfill run ends when something breaks mid-way: the store's disk fills up, a burst of 5xx opens the
circuit, the run is cancelled. Real simulator over HTTP, real DuckDB."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import polars as pl
import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import CircuitPolicy, RetryPolicy
from marketpipe.core.errors import StoreError
from marketpipe.core.tables import BarTables
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.service.backfill import BackfillStats, run_backfill
from marketpipe.service.router import ProviderRouter
from marketpipe.sim.data import SimMarket
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.base import PageWrite
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV, provider_config

CAL = get_calendar()
TF = Timeframe.parse("1Min")
SYMS = ["AAPL", "MSFT", "SPY"]
WEEK = (parse_time("2024-03-04"), parse_time("2024-03-06", end=True))  # 3 sessions, 3,510 bars


def alpaca(url: str, **kw: object) -> AlpacaProvider:
    return AlpacaProvider.from_config(provider_config(url, **kw), env=SIM_ENV)


async def run(p: AlpacaProvider | ProviderRouter, store: DuckDBStore, **kw: object) -> BackfillStats:
    opts: dict[str, object] = {"page_limit": 100, "concurrency": 3, **kw}
    rng = opts.pop("rng", WEEK)
    syms = opts.pop("symbols", SYMS)
    return await run_backfill(p, store, CAL, list(syms), TF, *rng, **opts)  # type: ignore[arg-type, misc]


def rows(store: DuckDBStore, syms: list[str] = SYMS, rng: tuple = WEEK) -> pl.DataFrame:  # type: ignore[type-arg]
    return store.read_bars(syms, "1Min", *rng).drop("fetched_at").sort("symbol", "ts")


def assert_ledger_claims_only_what_is_held(
    store: DuckDBStore,
    reference: pl.DataFrame,
    syms: list[str] = SYMS,
    rng: tuple = WEEK,  # type: ignore[type-arg]
) -> None:
    held = rows(store, syms, rng)
    for sym, a, b in store.coverage(syms, "1Min", *rng).select("symbol", "start", "end").iter_rows():
        claimed = (pl.col("symbol") == sym) & (pl.col("ts") >= a) & (pl.col("ts") < b)
        assert held.filter(claimed).equals(reference.filter(claimed)), (sym, a, b)


@pytest.fixture
async def reference(sim: SimServer, tmp_path: Path) -> pl.DataFrame:
    ref = DuckDBStore(tmp_path / "ref.duckdb")
    p = alpaca(sim.url)
    try:
        stats = await run(p, ref)
        assert stats.ok
        return rows(ref)
    finally:
        await p.aclose()
        ref.close()


# --- the store's disk fills up ----------------------------------------------------------------------------


class DiskFullStore(DuckDBStore):
    """A real DuckDB store whose disk "fills up" after ``room`` pages: the transaction that would go beyond
    fails inside DuckDB's insert with the IOException DuckDB raises on ENOSPC (and every later one too)."""

    def __init__(self, path: Path, room: int) -> None:
        super().__init__(path)
        self.room = room
        self.failed = 0

    def _insert_bars(self, tables: BarTables, pages: list[PageWrite]) -> list[int]:
        if len(pages) > self.room:
            self.failed += 1
            raise duckdb.IOException(f'IO Error: Could not write file "{self.path}.wal": No space left on device')
        self.room -= len(pages)
        return super()._insert_bars(tables, pages)


async def test_disk_full_ends_the_run_with_store_error_and_keeps_what_was_committed(  # type: ignore[no-untyped-def]
    sim, tmp_path: Path, reference: pl.DataFrame
) -> None:
    path = tmp_path / "full.duckdb"
    store = DiskFullStore(path, room=5)
    sim.faults.set([FaultRule(kind="latency", latency_ms=5)])  # the writer keeps pace: pages commit one by one
    p = alpaca(sim.url)
    started = time.monotonic()
    try:
        async with asyncio.timeout(20):  # before the fix the fetchers blocked on the full page queue forever
            with pytest.raises(StoreError) as caught:
                await run(p, store)
    finally:
        await p.aclose()
    assert time.monotonic() - started < 10
    err = caught.value
    assert err.code == "STORE_ERROR"
    assert str(path) in err.message and "No space left on device" in err.message
    assert "nothing of the failed" in err.message and "run the same command again when there is space" in err.message
    assert store.failed == 1, "no write is tried after the first failure"
    # nothing left running: no fetcher, no writer, no retry
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    held = rows(store)
    assert 0 < held.height < reference.height
    assert f"{held.height:,} bars committed before it are kept" in err.message
    assert held.height == store.counts()["ingest_log"] * 100 or held.height <= 5 * 100
    assert_ledger_claims_only_what_is_held(store, reference)
    store.close()

    # the space is back: the same command completes the store
    again = DuckDBStore(path)
    p = alpaca(sim.url)
    try:
        stats = await run(p, again)
    finally:
        await p.aclose()
    assert stats.ok
    assert rows(again).equals(reference)
    again.close()


# --- a 5xx burst opens the circuit ------------------------------------------------------------------------

MONTH = (parse_time("2024-04-01"), parse_time("2024-06-10", end=True))  # 50 sessions: 50 units of one day
BURST = CircuitPolicy(failure_threshold=5, recovery_seconds=0.3)


@pytest.mark.parametrize("attempts", [5, 8])
async def test_a_5xx_burst_that_opens_the_circuit_waits_for_half_open_and_loses_nothing(  # type: ignore[no-untyped-def]
    sim, tmp_path: Path, attempts: int
) -> None:
    """One request at a time, so the five 500s are five consecutive failures for the breaker too. With 5
    attempts the unit's last retry is the failure that opens the circuit; with 8 its next retry meets the
    open circuit (CIRCUIT_OPEN). Either way the unit waits for half-open and goes on."""
    ref_store = DuckDBStore(tmp_path / "ref.duckdb")
    p = alpaca(sim.url)
    try:
        clean = await run(p, ref_store, symbols=["AAPL"], rng=MONTH, page_limit=400, concurrency=4, circuit_waits=3)
    finally:
        await p.aclose()
    assert clean.ok and clean.units_total == 50
    reference = rows(ref_store, ["AAPL"], MONTH)
    ref_store.close()

    store = DuckDBStore(tmp_path / "burst.duckdb")
    # exactly five consecutive 500s, after the first few units went through
    sim.faults.set([FaultRule(kind="http_500", after=6, times=5)])
    p = alpaca(sim.url, retry=RetryPolicy(attempts=attempts, base_seconds=0.01, max_seconds=0.05), circuit=BURST)
    try:
        async with asyncio.timeout(60):
            stats = await run(p, store, symbols=["AAPL"], rng=MONTH, page_limit=400, concurrency=1, circuit_waits=3)
        breaker = p.resilience.breaker
    finally:
        await p.aclose()
    assert stats.units_total == 50
    assert stats.ok, stats.errors  # before: most units failed CIRCUIT_OPEN at once
    assert breaker.opened_count == 1  # the burst opened it once; the half-open trial closed it
    assert stats.circuit_waits == 1 and stats.retries >= 4
    assert rows(store, ["AAPL"], MONTH).equals(reference)
    assert_ledger_claims_only_what_is_held(store, reference, ["AAPL"], MONTH)
    store.close()


async def test_while_half_open_only_the_trial_goes_and_the_other_workers_wait(  # type: ignore[no-untyped-def]
    sim, tmp_path: Path, reference: pl.DataFrame
) -> None:
    p = alpaca(sim.url, circuit=BURST)
    breaker = p.resilience.breaker
    passed: list[str] = []  # breaker state of every call let through
    allow = breaker.allow

    def watched_allow() -> None:
        state = breaker.state
        allow()
        passed.append(state.value)

    breaker.allow = watched_allow  # type: ignore[method-assign]
    for _ in range(BURST.failure_threshold):  # opened by earlier traffic: every worker meets it at once
        breaker.failure()

    store = DuckDBStore(tmp_path / "w.duckdb")
    sim.faults.set([FaultRule(kind="latency", latency_ms=20)])
    try:
        async with asyncio.timeout(60):
            stats = await run(p, store, concurrency=4, circuit_waits=1)
    finally:
        await p.aclose()
    assert stats.ok, stats.errors  # before: every unit failed CIRCUIT_OPEN at once
    assert passed.count("half_open") == 1  # one trial; the other workers waited for its verdict
    assert stats.circuit_waits >= 4  # each worker waited, none failed
    assert breaker.opened_count == 1
    assert rows(store).equals(reference)
    store.close()


async def test_circuit_waits_is_bounded(sim, store) -> None:  # type: ignore[no-untyped-def]
    """A provider that stays down: the run waits out ``circuit_waits`` openings, then the units fail CIRCUIT_OPEN."""
    sim.faults.set([FaultRule(kind="http_500")])
    p = alpaca(sim.url, retry=RetryPolicy(attempts=2, base_seconds=0.01, max_seconds=0.02), circuit=BURST)
    started = time.monotonic()
    try:
        async with asyncio.timeout(30):
            stats = await run(p, store, concurrency=3, circuit_waits=2)
    finally:
        await p.aclose()
    assert time.monotonic() - started < 15
    assert not stats.ok and stats.units_done == stats.units_total
    assert {e["code"] for e in stats.errors} <= {"CIRCUIT_OPEN", "PROVIDER_UNAVAILABLE"}
    assert "CIRCUIT_OPEN" in {e["code"] for e in stats.errors}
    # opened, waited out twice, opened a third time: no more waiting (the breaker goes on working as before)
    assert p.resilience.breaker.opened_count >= 3
    assert stats.circuit_waits >= 2
    assert store.counts()["bars"] == 0 and store.counts()["coverage"] == 0


@pytest.fixture(scope="module")
def two() -> Iterator[tuple[SimServer, SimServer]]:
    """Two Alpaca-format vendors over one market (same bars, different ``source``)."""
    market = SimMarket()
    with SimServer(market) as primary, SimServer(market) as backup:
        yield primary, backup


def named(url: str, name: str) -> AlpacaProvider:
    p = alpaca(url, retry=RetryPolicy(attempts=3, base_seconds=0.01, max_seconds=0.05), circuit=BURST)
    p.name = name
    p.resilience.name = name
    p.resilience.breaker.name = name
    return p


def open_circuit(p: AlpacaProvider) -> None:
    for _ in range(p.resilience.breaker.policy.failure_threshold):
        p.resilience.breaker.failure()


async def reference_without_source(two: tuple[SimServer, SimServer], tmp_path: Path) -> pl.DataFrame:
    router = ProviderRouter([named(two[0].url, "primary"), named(two[1].url, "backup")])
    ref = DuckDBStore(tmp_path / "ref.duckdb")
    try:
        assert (await run(router, ref)).ok
        return rows(ref).drop("source")
    finally:
        await router.aclose()
        ref.close()


async def test_router_fails_over_when_the_primary_fails_mid_run(  # type: ignore[no-untyped-def]
    two: tuple[SimServer, SimServer], tmp_path: Path
) -> None:
    reference = await reference_without_source(two, tmp_path)
    router = ProviderRouter([named(two[0].url, "primary"), named(two[1].url, "backup")])
    store = DuckDBStore(tmp_path / "r.duckdb")
    two[0].faults.set([FaultRule(kind="http_500", after=3, times=8)])
    try:
        async with asyncio.timeout(60):
            stats = await run(router, store, circuit_waits=3)
    finally:
        two[0].faults.clear()
        await router.aclose()
    assert stats.ok, stats.errors
    assert stats.failovers >= 1 and stats.rows_by_provider["backup"] > 0
    assert rows(store).drop("source").equals(reference)
    store.close()


async def test_router_waits_for_half_open_when_every_circuit_is_open(  # type: ignore[no-untyped-def]
    two: tuple[SimServer, SimServer], tmp_path: Path
) -> None:
    reference = await reference_without_source(two, tmp_path)
    router = ProviderRouter([named(two[0].url, "primary"), named(two[1].url, "backup")])
    for p in router.providers:
        open_circuit(p)  # type: ignore[arg-type]
    store = DuckDBStore(tmp_path / "r.duckdb")
    try:
        async with asyncio.timeout(60):
            stats = await run(router, store, circuit_waits=3)
    finally:
        await router.aclose()
    assert stats.ok, stats.errors  # before: every unit failed ALL_PROVIDERS_FAILED (both skipped, circuit open)
    assert stats.circuit_waits >= 1
    assert rows(store).drop("source").equals(reference)
    store.close()


# --- cancellation -----------------------------------------------------------------------------------------


async def test_cancelling_the_run_ends_every_task_promptly_and_keeps_committed_pages(  # type: ignore[no-untyped-def]
    sim, tmp_path: Path, reference: pl.DataFrame
) -> None:
    store = DuckDBStore(tmp_path / "c.duckdb")
    sim.faults.set([FaultRule(kind="latency", latency_ms=80)])
    p = alpaca(sim.url)
    seen: list[BackfillStats] = []
    committed = asyncio.Event()

    def progress(stats: BackfillStats) -> None:
        seen.append(stats)
        if stats.bars_stored:
            committed.set()

    run_task = asyncio.create_task(run(p, store, concurrency=3, progress=progress))
    try:
        async with asyncio.timeout(30):
            await committed.wait()
        requests = p.requests
        cancelled_at = time.monotonic()
        run_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run_task
        assert time.monotonic() - cancelled_at < 1.0
        await asyncio.sleep(0.3)
        assert p.requests <= requests + 3, "no unit is taken after the cancellation"
    finally:
        await p.aclose()
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    held = rows(store)
    assert 0 < held.height < reference.height and held.height == seen[-1].bars_stored
    assert_ledger_claims_only_what_is_held(store, reference)
    sim.faults.clear()
    p = alpaca(sim.url)
    try:
        assert (await run(p, store)).ok
    finally:
        await p.aclose()
    assert rows(store).equals(reference)
    store.close()
