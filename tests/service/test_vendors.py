"""Alpaca, Polygon and Yahoo simulator faces over one market: failover across vendors and
cross-vendor reconciliation, through the same code a user runs (config -> router)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date

import polars as pl
import pytest

from marketpipe.core.calendar import get_calendar
from marketpipe.core.config import config_from_dict
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.service.backfill import run_backfill
from marketpipe.service.reconcile import reconcile_symbol
from marketpipe.service.router import ProviderRouter, build_router
from marketpipe.sim.faults import FaultRule
from marketpipe.sim.server import SimServer
from marketpipe.store.duckdb import DuckDBStore
from tests.service.vendors import ENV, FAST

CAL = get_calendar()
WEEK = (parse_time("2024-03-04"), parse_time("2024-03-08", end=True))


pytestmark = pytest.mark.usefixtures("clean_vendors")


@pytest.fixture
async def router(vendors: dict[str, SimServer]) -> AsyncIterator[ProviderRouter]:
    cfg = config_from_dict(
        {
            "providers": {
                "alpaca": {"base_url": vendors["alpaca"].url, "plan": "unlimited", **FAST},
                "polygon": {"base_url": vendors["polygon"].url, **FAST},
                "yahoo": {"base_url": vendors["yahoo"].url, "enabled": True, **FAST},
            }
        }
    )
    r = build_router(cfg, env=ENV)
    yield r
    await r.aclose()


def test_router_built_from_config_in_priority_order(router: ProviderRouter) -> None:
    assert router.names == ["alpaca", "polygon", "yahoo"]


def test_missing_keys_leave_providers_out_with_a_reason(vendors: dict[str, SimServer]) -> None:
    cfg = config_from_dict({"providers": {"yahoo": {"enabled": True, "base_url": vendors["yahoo"].url}}})
    r = build_router(cfg, env={})
    assert r.names == ["yahoo"]
    assert {(a.provider, a.code) for a in r.unavailable} == {
        ("alpaca", "MISSING_CREDENTIALS"),
        ("polygon", "MISSING_CREDENTIALS"),
    }


@pytest.mark.parametrize("kind", ["http_503", "reset", "truncated_json"])
async def test_alpaca_fails_mid_backfill_polygon_serves_the_rest(
    router: ProviderRouter, vendors: dict[str, SimServer], store: DuckDBStore, kind: str
) -> None:
    vendors["alpaca"].faults.set([FaultRule(kind=kind, after=2)])
    stats = await run_backfill(
        router, store, CAL, ["AAPL", "MSFT"], Timeframe.parse("1Min"), *WEEK, page_limit=400, concurrency=1
    )
    assert stats.ok, stats.errors
    rows = store.read_bars(["AAPL", "MSFT"], "1Min", *WEEK)
    assert rows.height == 2 * 5 * 390
    assert set(rows["source"].unique()) == {"sim:alpaca", "sim:polygon"}
    cov = store.coverage(["AAPL", "MSFT"], "1Min", *WEEK)
    assert set(cov["provider"].unique()) == {"alpaca", "polygon"}


async def test_alpaca_and_polygon_down_yahoo_serves_daily(
    router: ProviderRouter, vendors: dict[str, SimServer], store: DuckDBStore
) -> None:
    vendors["alpaca"].faults.set([FaultRule(kind="http_500")])
    vendors["polygon"].faults.set([FaultRule(kind="http_502")])
    stats = await run_backfill(
        router,
        store,
        CAL,
        ["SPY"],
        Timeframe.parse("1Day"),
        parse_time("2024-01-02"),
        parse_time("2024-03-28", end=True),
    )
    assert stats.ok, stats.errors
    rows = store.read_bars(["SPY"], "1Day", parse_time("2024-01-02"), parse_time("2024-03-28", end=True))
    assert rows.height == len(CAL.sessions(parse_time("2024-01-02"), parse_time("2024-03-28", end=True)))
    assert rows["source"].unique().to_list() == ["sim:yahoo"]


async def test_yahoo_is_skipped_where_its_capabilities_end(router: ProviderRouter) -> None:
    old = (parse_time("2024-03-04"), parse_time("2024-03-05", end=True))
    candidates, skipped = router.candidates("bars", Timeframe.parse("1Min"), *old)
    assert [p.name for p in candidates] == ["alpaca", "polygon"]
    assert any(a.provider == "yahoo" and a.code == "UNSUPPORTED" for a in skipped)


async def test_reconcile_finds_injected_disagreements_and_no_others(
    router: ProviderRouter, vendors: dict[str, SimServer], store: DuckDBStore
) -> None:
    vendors["polygon"].face.price_shift_pct = 6.0
    vendors["yahoo"].face.missing_days = {date(2024, 3, 6)}
    report = await reconcile_symbol(router, store, "AAPL", Timeframe.parse("1Day"), *WEEK)
    assert report.reference == "sim:alpaca"
    poly, yahoo = report.comparisons["sim:polygon"], report.comparisons["sim:yahoo"]
    assert poly.counts["mismatch"] == 5 and poly.counts["match"] == 0
    assert yahoo.counts["only_reference"] == 1 and yahoo.counts["match"] == 4
    assert yahoo.counts["mismatch"] == yahoo.counts["warn"] == yahoo.counts["minor"] == 0
    stored = store.reconciliation("AAPL", "1Day", report.run_id)
    assert stored.height == 10
    assert stored.filter(pl.col("status") == "only_reference")["ts"].dt.date().to_list() == [date(2024, 3, 6)]


async def test_reconcile_reports_partial_volume(
    router: ProviderRouter, vendors: dict[str, SimServer], store: DuckDBStore
) -> None:
    vendors["yahoo"].face.volume_ratio = 0.025
    report = await reconcile_symbol(router, store, "MSFT", Timeframe.parse("1Day"), *WEEK)
    yahoo = report.comparisons["sim:yahoo"]
    assert yahoo.counts["match"] == 5 and yahoo.counts["volume_flagged"] == 5
