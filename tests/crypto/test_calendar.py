"""The 24/7 calendar: crypto expects every minute, weekends included; equities keep the exchange's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from marketpipe.core.calendar import ContinuousCalendar, calendar_for, get_calendar
from marketpipe.core.config import Config
from marketpipe.core.errors import InvalidArgument
from marketpipe.core.schema import BAR_SCHEMA, crypto_pair_hint, is_crypto, normalize_symbol
from marketpipe.core.timeframe import Timeframe
from marketpipe.quality.completeness import expected_stamps
from marketpipe.service.backfill import chunk_interval, estimate_rows, plan
from marketpipe.service.data import MarketData
from marketpipe.store.base import Coverage, IngestRecord, PageWrite
from marketpipe.store.duckdb import DuckDBStore

SAT = datetime(2024, 3, 2, tzinfo=UTC)  # a weekend: Saturday 2 and Sunday 3 March 2024
MON = datetime(2024, 3, 4, tzinfo=UTC)
DAY = timedelta(days=1)


def test_symbols_tell_their_asset_class() -> None:
    assert normalize_symbol("btc/usd") == "BTC/USD" and normalize_symbol("eth-btc") == "ETH/BTC"
    assert is_crypto("BTC/USD") and not is_crypto("AAPL") and not is_crypto("BRK.B")
    assert normalize_symbol("BRK/B") == "BRK.B"  # a share class keeps its canonical dot
    assert crypto_pair_hint("btcusd") == "BTC/USD" and crypto_pair_hint("AAPL") is None
    assert calendar_for("BTC/USD").name == "24/7 UTC"
    assert calendar_for("AAPL").name == "XNYS"


def test_a_weekend_expects_every_minute() -> None:
    cal = calendar_for("BTC/USD")
    assert isinstance(cal, ContinuousCalendar)
    assert cal.regular_minutes(SAT, MON) == 2 * 1440
    stamps, _ = expected_stamps(cal, Timeframe.parse("1Min"), SAT, MON)
    assert len(stamps) == 2880 and np.all(np.diff(stamps) == 60_000_000_000)
    hours, _ = expected_stamps(cal, Timeframe.parse("1Hour"), SAT, MON)
    assert len(hours) == 48
    days, _ = expected_stamps(cal, Timeframe.parse("1Day"), SAT, MON)
    assert [datetime.fromtimestamp(d / 1e9, UTC) for d in days] == [SAT, SAT + DAY]
    # the exchange calendar expects nothing on the same weekend
    assert get_calendar("XNYS").regular_minutes(SAT, MON) == 0


def test_chicago_alignment_stamps_daily_bars_at_chicago_midnight() -> None:
    cal = calendar_for("BTC/USD", crypto_daily="America/Chicago")
    days, _ = expected_stamps(cal, Timeframe.parse("1Day"), SAT, MON)
    stamps = [datetime.fromtimestamp(d / 1e9, UTC) for d in days]
    # CST is UTC-6; Friday's Chicago day runs into Saturday 06:00Z, but its bar is stamped before the range
    assert stamps == [datetime(2024, 3, d, 6, tzinfo=UTC) for d in (2, 3)]
    # across the DST change (10 March 2024) the day is 23 hours long and midnight moves to 05:00Z
    days, _ = expected_stamps(
        cal, Timeframe.parse("1Day"), datetime(2024, 3, 10, 6, tzinfo=UTC), datetime(2024, 3, 12, tzinfo=UTC)
    )
    assert [datetime.fromtimestamp(d / 1e9, UTC).hour for d in days] == [6, 5]
    with pytest.raises(InvalidArgument):
        ContinuousCalendar("Europe/Paris")


def test_estimates_and_chunks_follow_the_continuous_calendar() -> None:
    cal = calendar_for("BTC/USD")
    week = (MON, MON + 7 * DAY)
    assert estimate_rows(cal, Timeframe.parse("1Min"), *week) == 7 * 1440
    assert estimate_rows(cal, Timeframe.parse("1Day"), *week) == 7
    pieces = chunk_interval(cal, Timeframe.parse("1Min"), *week, 10_000)
    assert [p[2] for p in pieces] == [6 * 1440, 1440]  # cut at UTC midnight, each fits a page
    assert pieces[0][1] == MON + 6 * DAY


def _cover(store: DuckDBStore, sym: str, s: datetime, e: datetime) -> None:
    store.write_pages(
        [
            PageWrite(
                pl.DataFrame(schema=BAR_SCHEMA),
                pl.DataFrame(),
                [Coverage(sym, "1Min", "alpaca", "sim", "us", s, e, 0, "r", s)],
                IngestRecord("alpaca", "sim", "us", "bars", "1Min", [sym], s, e, "r", 1, s, 0),
            )
        ]
    )


def test_a_backfill_across_a_weekend_asks_only_for_what_is_missing(tmp_path: Path) -> None:
    store = DuckDBStore(tmp_path / "c.duckdb")
    cal = calendar_for("BTC/USD")
    fri, tue = SAT - DAY, MON + DAY
    _cover(store, "BTC/USD", fri, SAT)  # Friday held
    _cover(store, "BTC/USD", MON, tue)  # Monday held
    units, done = plan(store, cal, ["BTC/USD"], Timeframe.parse("1Min"), fri, tue, provider=None, feed=None)
    assert done == []
    assert [(u.start, u.end, u.est_rows) for u in units] == [(SAT, MON, 2880)]
    store.close()


def test_one_request_holds_one_asset_class(tmp_path: Path) -> None:
    data = MarketData(Config())
    assert data.calendar_of(["BTC/USD", "ETH/USD"]).name == "24/7 UTC"
    assert data.calendar_of(["AAPL"]).name == "XNYS"
    with pytest.raises(InvalidArgument, match="separately"):
        data.calendar_of(["BTC/USD", "AAPL"])


def test_market_status_and_closes_follow_the_asset_class() -> None:
    from marketpipe.service.gateway import Gateway

    gw = Gateway(MarketData(Config()))
    noon_sat = SAT + timedelta(hours=12)
    assert gw.is_market_hours(noon_sat, ["BTC/USD"]) and not gw.is_market_hours(noon_sat, ["AAPL"])
    assert gw.last_close(noon_sat, ["BTC/USD"]) == SAT  # the last midnight: older crypto data is final
    assert gw.last_close(noon_sat) == datetime(2024, 3, 1, 21, tzinfo=UTC)  # Friday's NYSE close
