import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from marketpipe.core.calendar import get_calendar
from marketpipe.core.timeframe import Timeframe
from marketpipe.core.timeutil import parse_time
from marketpipe.service.backfill import chunk_interval, estimate_rows, plan, subtract
from marketpipe.store.base import Coverage, IngestRecord, PageWrite
from marketpipe.store.duckdb import DuckDBStore

T = datetime(2024, 3, 4, tzinfo=UTC)
H = timedelta(hours=1)


def test_subtract_intervals() -> None:
    assert subtract(T, T + 10 * H, []) == [(T, T + 10 * H)]
    assert subtract(T, T + 10 * H, [(T + 2 * H, T + 4 * H), (T + 3 * H, T + 5 * H)]) == [
        (T, T + 2 * H),
        (T + 5 * H, T + 10 * H),
    ]
    assert subtract(T, T + 10 * H, [(T - H, T + 11 * H)]) == []
    assert subtract(T, T + 10 * H, [(T + 9 * H, T + 12 * H)]) == [(T, T + 9 * H)]


def test_estimates_follow_the_calendar() -> None:
    cal = get_calendar()
    week = (parse_time("2024-11-25"), parse_time("2024-11-29", end=True))  # Thanksgiving week
    assert estimate_rows(cal, Timeframe.parse("1Min"), *week) == 390 * 3 + 210
    assert estimate_rows(cal, Timeframe.parse("5Min"), *week) == (390 * 3 + 210) // 5
    assert estimate_rows(cal, Timeframe.parse("1Day"), *week) == 4


def test_chunks_tile_the_interval_and_fit_a_page() -> None:
    cal = get_calendar()
    s, e = parse_time("2024-01-02"), parse_time("2024-06-28", end=True)
    pieces = chunk_interval(cal, Timeframe.parse("1Min"), s, e, 10_000)
    assert pieces[0][0] == s and pieces[-1][1] == e
    for (_a, b, n), (c, _, _) in itertools.pairwise(pieces):
        assert b == c  # no gap, no overlap
        assert n <= 10_000
    assert sum(p[2] for p in pieces) == estimate_rows(cal, Timeframe.parse("1Min"), s, e)


def test_plan_packs_symbols_and_skips_covered(tmp_path: Path) -> None:
    cal = get_calendar()
    store = DuckDBStore(tmp_path / "p.duckdb")
    s, e = parse_time("2024-03-04"), parse_time("2024-03-04", end=True)
    syms = [f"S{i}" for i in range(60)]
    units, done = plan(store, cal, syms, Timeframe.parse("1Min"), s, e, provider="alpaca", feed="sip")
    assert done == []
    assert [len(u.symbols) for u in units] == [25, 25, 10]  # 390 bars each: 25 per 10,000-row page
    import polars as pl

    from marketpipe.core.schema import BAR_SCHEMA

    store.write_pages(
        [
            PageWrite(
                pl.DataFrame(schema=BAR_SCHEMA),
                pl.DataFrame(),
                [Coverage("S0", "1Min", "alpaca", "sim", "sip", s, e, 0, "r", s)],
                IngestRecord("alpaca", "sim", "sip", "bars", "1Min", ["S0"], s, e, "r", 1, s, 0),
            )
        ]
    )
    units, done = plan(store, cal, syms, Timeframe.parse("1Min"), s, e, provider="alpaca", feed="sip")
    assert done == ["S0"]
    assert sum(len(u.symbols) for u in units) == 59
    # another feed is not covered by the SIP ledger entry
    units, done = plan(store, cal, ["S0"], Timeframe.parse("1Min"), s, e, provider="alpaca", feed="iex")
    assert done == [] and len(units) == 1
    store.close()
