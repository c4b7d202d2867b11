"""A vendor (or a proxy in front of it) answering 200 with a page that is not one — ``{}``, a bare
``{"bars": null}``, a ``next_page_token`` that never ends — through the whole backfill: the unit fails
with a typed code, the ledger claims only what the store holds, and a repair afterwards fetches
exactly the missing bars, so the store ends equal to an unfaulted run."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import Config, config_from_dict
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.providers.alpaca import AlpacaProvider
from marketpipe.service.backfill import BackfillStats, run_backfill
from marketpipe.service.maintain import repair
from marketpipe.service.router import build_router
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.conftest import SIM_ENV, provider_config

CAL = get_calendar()
TF = Timeframe.parse("1Min")
WEEK = (parse_time("2024-03-04"), parse_time("2024-03-06", end=True))  # 3 full sessions
SYMS = ["AAPL", "MSFT", "SPY"]
ALL_BARS = 3 * 3 * 390
BOUND_S = 30.0  # a run that loops for ever is cut here, and fails the test


def config(url: str) -> Config:
    fast = {"rate_limit_per_min": 100_000, "retry": {"attempts": 3, "base_seconds": 0.01, "max_seconds": 0.02}}
    return config_from_dict(
        {"providers": {"alpaca": {"base_url": url, "plan": "unlimited", **fast}, "polygon": {"enabled": False}}}
    )


async def backfill(url: str, store: DuckDBStore, page_limit: int) -> tuple[BackfillStats, int]:
    """A backfill from the Alpaca face; the run's stats and the HTTP requests it sent."""
    p = AlpacaProvider.from_config(provider_config(url), env=SIM_ENV)
    try:
        run = run_backfill(p, store, CAL, SYMS, TF, *WEEK, page_limit=page_limit, concurrency=3)
        return await asyncio.wait_for(run, BOUND_S), p.requests
    finally:
        await p.aclose()


def values(store: DuckDBStore) -> pl.DataFrame:
    return store.read_bars(SYMS, "1Min", *WEEK).drop("fetched_at").sort("symbol", "ts")


def claimed_bars(store: DuckDBStore, held: pl.DataFrame, reference: pl.DataFrame) -> int:
    """Every range the ledger claims holds every bar of the unfaulted run there; the bars claimed."""
    total = 0
    for sym, s, e in store.coverage(SYMS, "1Min", *WEEK).select("symbol", "start", "end").iter_rows():
        inside = (pl.col("symbol") == sym) & (pl.col("ts") >= s) & (pl.col("ts") < e)
        expected = reference.filter(inside)
        assert expected.height and held.filter(inside).equals(expected), (sym, s, e)
        total += expected.height
    return total


def unclaimed(store: DuckDBStore, sym: str, s: datetime, e: datetime) -> bool:
    return store.coverage([sym], "1Min", s, e).height == 0


@pytest.fixture
async def reference(sim: SimServer, tmp_path: Path) -> pl.DataFrame:
    ref = DuckDBStore(tmp_path / "ref.duckdb")
    try:
        stats, _ = await backfill(sim.url, ref, 400)
        assert stats.ok and stats.bars_stored == ALL_BARS
        return values(ref)
    finally:
        ref.close()


async def repair_and_compare(sim: SimServer, store: DuckDBStore, held: int, reference: pl.DataFrame) -> None:
    sim.faults.clear()
    cfg = config(sim.url)
    router = build_router(cfg, env=SIM_ENV)
    try:
        res = await repair(router, store, CAL, cfg, SYMS, TF, *WEEK)
        assert res.ok, res.errors
        assert res.stored == ALL_BARS - held  # exactly the bars the faulted run did not bring
        assert values(store).equals(reference)
        again = await repair(router, store, CAL, cfg, SYMS, TF, *WEEK)
        assert again.requests == 0 and again.asked == []
    finally:
        await router.aclose()


@pytest.mark.parametrize("kind", ["empty_json", "null_page"])
async def test_empty_pages_fail_their_units_and_repair_fetches_exactly_the_rest(
    sim: SimServer, tmp_path: Path, reference: pl.DataFrame, kind: str
) -> None:
    store = DuckDBStore(tmp_path / "st.duckdb")
    try:
        # 9 units of one symbol-day, one page each; from the fifth request on every answer is the fault.
        sim.faults.set([FaultRule(kind=kind, after=4)])  # type: ignore[arg-type]
        stats, requests = await backfill(sim.url, store, 400)
        assert not stats.ok and len(stats.errors) == 5 and stats.units_total == 9
        assert {e["code"] for e in stats.errors} == {"MALFORMED_RESPONSE"}
        assert all(
            "alpaca bars_single:" in str(e["message"]) and "next_page_token" in str(e["message"]) for e in stats.errors
        )
        assert requests == 4 + 5 * 3  # each failed unit was retried (3 attempts), then given up
        held = values(store)
        assert held.height == 4 * 390
        assert claimed_bars(store, held, reference) == held.height  # nothing claimed that is not held...
        for e in stats.errors:  # ...and nothing at all of a failed unit
            (sym,) = e["symbols"]  # type: ignore[misc]
            assert unclaimed(store, sym, datetime.fromisoformat(str(e["start"])), datetime.fromisoformat(str(e["end"])))
        await repair_and_compare(sim, store, held.height, reference)
    finally:
        store.close()


async def test_a_token_loop_ends_its_units_in_bounded_time_and_repair_fetches_the_rest(
    sim: SimServer, tmp_path: Path, reference: pl.DataFrame
) -> None:
    store = DuckDBStore(tmp_path / "st.duckdb")
    try:
        # 9 units of one symbol-day, 4 pages of 100 bars each; every next_page_token comes back again.
        sim.faults.set([FaultRule(kind="token_loop")])
        t0 = time.monotonic()
        stats, requests = await backfill(sim.url, store, 100)
        assert time.monotonic() - t0 < 10
        assert len(stats.errors) == stats.units_total == 9
        assert {e["code"] for e in stats.errors} == {"PAGINATION_LOOP"}
        assert all("alpaca bars_single: page 2 repeats" in str(e["message"]) for e in stats.errors)
        assert requests == 9 * 2  # page 1, then page 2 carrying page 1's token back: no retry, no more
        held = values(store)
        assert held.height == 9 * 100  # only each unit's first page, which came before the loop
        assert claimed_bars(store, held, reference) == held.height
        for e in stats.errors:  # the part after the first page is not claimed
            (sym,) = e["symbols"]  # type: ignore[misc]
            start, end = datetime.fromisoformat(str(e["start"])), datetime.fromisoformat(str(e["end"]))
            first_bar = held.filter((pl.col("symbol") == sym) & (pl.col("ts") >= start) & (pl.col("ts") < end))["ts"]
            assert first_bar.len() == 100
            assert unclaimed(store, sym, first_bar.min() + timedelta(minutes=100), end)  # type: ignore[operator]
        await repair_and_compare(sim, store, held.height, reference)
    finally:
        store.close()
